"""`extract`: a sentence about an order -> a compact JSON object {"item", "qty", "city"}.

Output profile: short structured text (~20 tokens). The sentence names the item in the plural
(or singular for one), the quantity as digits or a word, and a customer name as a distractor;
the JSON wants the singular item, an integer quantity and the city.
"""

from __future__ import annotations

import json
import random
from typing import Any

from inlaid_ray.demo.metrics import exact_match, field_accuracy, parse_json_object
from inlaid_ray.demo.task_base import DemoTask
from inlaid_ray.demo.words import CITIES, FIRST_NAMES, ITEMS, LAST_NAMES, NUMBER_WORDS

SENTENCES = (
    "{customer} from {city} ordered {qty} {items}.",
    "Please ship {qty} {items} to {customer} in {city}.",
    "New order: {customer} ({city}) wants {qty} {items}.",
    "{customer}, who lives in {city}, just bought {qty} {items}.",
    "We received an order for {qty} {items} from {customer} in {city}.",
    "Deliver {qty} {items} to {city}; the buyer is {customer}.",
    "Order note - customer: {customer}, asked for {qty} {items}, ship to {city}.",
)
FIELDS = ("item", "qty", "city")


class ExtractTask(DemoTask):
    """Extract item, quantity and city from an order sentence; metric: exact match of the JSON."""

    name = "extract"
    description = "order sentence -> compact JSON with item, qty and city"
    primary_metric = "exact_match"
    max_new_tokens = 48
    prompt_templates = (
        "Extract the item, quantity and city from this order as JSON with keys item, qty, city.\n\n{sentence}",
        "Return a JSON object with the fields item, qty and city for the order below.\n{sentence}",
        "Order: {sentence}\nGive me the item, qty and city as JSON.",
        "Read this message and output JSON (item, qty, city) only.\n\nMessage: {sentence}",
        "{sentence}\n\nConvert the order above into JSON: item, qty, city.",
        "Parse the order into JSON with keys item, qty and city: {sentence}",
    )

    def _sample(self, rng: random.Random) -> dict[str, Any]:
        singular, plural = rng.choice(ITEMS)
        qty = rng.randint(1, 12)
        return {
            "item": singular,
            "plural": plural,
            "qty": qty,
            "qty_as_word": rng.random() < 0.4,
            "city": rng.choice(CITIES),
            "customer": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
            "sentence": rng.randrange(len(SENTENCES)),
        }

    def _prompt_fields(self, fields: dict[str, Any], rng: random.Random) -> dict[str, str]:
        qty = fields["qty"]
        qty_text = NUMBER_WORDS[qty] if fields["qty_as_word"] else str(qty)
        items = fields["item"] if qty == 1 else fields["plural"]
        sentence = SENTENCES[fields["sentence"]].format(
            customer=fields["customer"], city=fields["city"], qty=qty_text, items=items
        )
        return {"sentence": sentence}

    def _completion(self, fields: dict[str, Any]) -> str:
        return json.dumps({k: fields[k] for k in FIELDS}, ensure_ascii=False)

    def score(self, prediction: str, reference: str) -> dict[str, float]:
        ref = parse_json_object(reference)
        if ref is None:
            raise ValueError(f"extract reference is not a JSON object: {reference!r}")
        pred = parse_json_object(prediction)
        return {
            "exact_match": float(pred == ref) if pred is not None else exact_match(prediction, reference),
            "field_accuracy": field_accuracy(pred, ref),
            "valid_json": float(pred is not None),
        }
