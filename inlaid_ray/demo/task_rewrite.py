"""`rewrite`: turn a generated passage of two or three active-voice sentences into the passive voice.

Output profile: medium (~25-55 tokens, growing with the number of sentences). Exercises
agreement (was/were), irregular participles, article capitalisation and keeping the adverb,
time and place phrases in order:
"Yesterday, Anna carefully repaired the old bicycles in the garage."
-> "Yesterday, the old bicycles were carefully repaired by Anna in the garage."
"""

from __future__ import annotations

import random
from typing import Any

from inlaid_ray.demo.metrics import exact_match, rouge_l
from inlaid_ray.demo.task_base import DemoTask
from inlaid_ray.demo.words import FIRST_NAMES

PEOPLE = (
    "chef", "teacher", "engineer", "farmer", "nurse", "pilot", "student", "neighbour", "mechanic",
    "artist", "driver", "doctor", "gardener", "baker", "librarian",
)
PERSON_ADJECTIVES = ("young", "old", "tired", "careful", "friendly", "new", "clever", "quiet")
# (singular, plural)
OBJECTS = (
    ("box", "boxes"), ("car", "cars"), ("window", "windows"), ("letter", "letters"),
    ("bicycle", "bicycles"), ("painting", "paintings"), ("key", "keys"), ("table", "tables"),
    ("basket", "baskets"), ("book", "books"), ("lamp", "lamps"), ("door", "doors"),
    ("fence", "fences"), ("package", "packages"), ("chair", "chairs"), ("map", "maps"),
)
OBJECT_ADJECTIVES = ("old", "red", "heavy", "broken", "wooden", "small", "blue", "dusty", "expensive", "green")
# (simple past, past participle)
VERBS = (
    ("painted", "painted"), ("moved", "moved"), ("washed", "washed"), ("cleaned", "cleaned"),
    ("repaired", "repaired"), ("sold", "sold"), ("bought", "bought"), ("found", "found"),
    ("lost", "lost"), ("carried", "carried"), ("opened", "opened"), ("delivered", "delivered"),
    ("dropped", "dropped"), ("stole", "stolen"), ("broke", "broken"), ("hid", "hidden"),
    ("took", "taken"), ("chose", "chosen"), ("threw", "thrown"), ("kept", "kept"),
    ("inspected", "inspected"), ("wrapped", "wrapped"), ("borrowed", "borrowed"), ("drew", "drawn"),
)
ADVERBS = ("carefully", "quickly", "quietly", "finally", "secretly", "proudly")
TIMES = ("Yesterday", "Last week", "This morning", "On Monday", "After lunch", "Before the storm")
PLACES = (
    "in the garage", "at the station", "near the river", "in the kitchen", "behind the school",
    "at the market", "in the old barn", "on the top floor",
)
COUNT_WORDS = ("two", "three", "four", "five")


def _article(adjective: str) -> str:
    return "an" if adjective[0] in "aeiou" else "a"


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


class RewriteTask(DemoTask):
    """Active -> passive voice; metrics: exact match and ROUGE-L."""

    name = "rewrite"
    description = "rewrite a short active-voice passage in the passive voice"
    primary_metric = "exact_match"
    max_new_tokens = 96
    prompt_templates = (
        "Rewrite this text in the passive voice:\n{passage}",
        "Convert every sentence to passive voice.\n\nText: {passage}",
        "Change the following sentences from active to passive voice: {passage}",
        'Passive voice, please: "{passage}"',
        "{passage}\nRewrite the text above so that it uses the passive voice.",
        "Make these sentences passive, keeping all of their details.\n{passage}",
    )

    def _sample(self, rng: random.Random) -> dict[str, Any]:
        return {"clauses": tuple(self._sample_clause(rng) for _ in range(rng.randint(2, 3)))}

    @staticmethod
    def _sample_clause(rng: random.Random) -> dict[str, Any]:
        return {
            "subject": rng.choice(FIRST_NAMES) if rng.random() < 0.35 else
            f"the {rng.choice(PERSON_ADJECTIVES)} {rng.choice(PEOPLE)}",
            "verb": rng.randrange(len(VERBS)),
            "object": rng.randrange(len(OBJECTS)),
            "object_adjective": rng.choice(OBJECT_ADJECTIVES),
            "determiner": rng.choice(("the", "a", "count")),
            "count": rng.choice(COUNT_WORDS),
            "plural": rng.random() < 0.5,
            "adverb": rng.choice(ADVERBS) if rng.random() < 0.4 else "",
            "time": rng.choice(TIMES) if rng.random() < 0.6 else "",
            "place": rng.choice(PLACES) if rng.random() < 0.7 else "",
        }

    @staticmethod
    def _object_phrase(fields: dict[str, Any]) -> tuple[str, bool]:
        """('the old boxes', plural?) with the determiner made consistent with number."""
        singular, plural_noun = OBJECTS[fields["object"]]
        adjective = fields["object_adjective"]
        determiner, plural = fields["determiner"], fields["plural"]
        if determiner == "count":
            return f"{fields['count']} {adjective} {plural_noun}", True
        if determiner == "a":
            return f"{_article(adjective)} {adjective} {singular}", False
        return f"the {adjective} {plural_noun if plural else singular}", plural

    @staticmethod
    def _join(time: str, clause: str, place: str) -> str:
        sentence = f"{time}, {clause}" if time else _capitalize(clause)
        return f"{sentence} {place}." if place else f"{sentence}."

    def _active(self, fields: dict[str, Any]) -> str:
        past, _ = VERBS[fields["verb"]]
        obj, _ = self._object_phrase(fields)
        verb = f"{fields['adverb']} {past}" if fields["adverb"] else past
        return self._join(fields["time"], f"{fields['subject']} {verb} {obj}", fields["place"])

    def _passive(self, fields: dict[str, Any]) -> str:
        _, participle = VERBS[fields["verb"]]
        obj, plural = self._object_phrase(fields)
        aux = "were" if plural else "was"
        verb = f"{aux} {fields['adverb']} {participle}" if fields["adverb"] else f"{aux} {participle}"
        return self._join(fields["time"], f"{obj} {verb} by {fields['subject']}", fields["place"])

    def _prompt_fields(self, fields: dict[str, Any], rng: random.Random) -> dict[str, str]:
        return {"passage": " ".join(self._active(clause) for clause in fields["clauses"])}

    def _completion(self, fields: dict[str, Any]) -> str:
        return " ".join(self._passive(clause) for clause in fields["clauses"])

    def content_key(self, fields: dict[str, Any]) -> str:
        return self._prompt_fields(fields, random.Random(0))["passage"]

    def score(self, prediction: str, reference: str) -> dict[str, float]:
        return {"exact_match": exact_match(prediction, reference), "rouge_l": rouge_l(prediction, reference)}
