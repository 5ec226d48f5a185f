"""`sentiment`: one-word (positive/negative) classification of a generated product review.

Output profile: a single token. Some reviews mix a complaint and a verdict ("..., but overall
I recommend it"), where the verdict decides the label, so the task is not pure keyword spotting.
"""

from __future__ import annotations

import random
import re
from typing import Any

from inlaid_ray.demo.task_base import DemoTask

PRODUCTS = (
    "blender", "backpack", "laptop stand", "coffee grinder", "desk lamp", "rain jacket",
    "phone case", "water bottle", "office chair", "toaster", "headphones", "yoga mat", "kettle",
    "keyboard", "umbrella", "frying pan", "bike light", "tent", "wallet", "smart watch",
    "vacuum cleaner", "teapot", "sleeping bag", "monitor", "hair dryer",
)
OPENERS = (
    "I bought this {product} {when}.", "Got the {product} {when}.",
    "We ordered the {product} for our new flat.", "This is my second {product} from this brand.",
    "Review of the {product}:", "Honest opinion on this {product}.", "",
)
WHEN = ("last month", "two weeks ago", "for my sister", "on sale", "after reading many reviews", "as a gift")
CLAUSES = {
    "positive": (
        "it works perfectly", "the quality is excellent", "it arrived quickly and well packed",
        "I use it every day and love it", "it was worth every penny", "the design is beautiful",
        "setup took two minutes", "it exceeded my expectations", "my whole family is happy with it",
        "it feels sturdy and well made", "customer service was very helpful",
        "it is much better than my old one", "it is quiet and easy to clean",
        "I would happily buy it again", "it still looks new after months",
    ),
    "negative": (
        "it stopped working after a week", "the quality is very poor", "it arrived late and damaged",
        "it is a waste of money", "the instructions were useless", "it feels cheap and flimsy",
        "customer service never answered", "it is much worse than my old one",
        "it is loud and hard to clean", "I had to send it back", "it broke the first time I used it",
        "it looks nothing like the photos", "I regret buying it", "several parts were missing",
        "it smells strange and the paint peels",
    ),
}
VERDICTS = {
    "positive": ("I am very happy with it", "I recommend it", "it is a great buy", "I love it"),
    "negative": ("I am disappointed", "I would not recommend it", "it is not worth it", "I want a refund"),
}
STARS = {"positive": ("4/5 stars.", "5/5 stars.", "Five stars."), "negative": ("1/5 stars.", "2/5 stars.", "One star.")}
LABELS = ("positive", "negative")
_LABEL_WORD = re.compile(r"\b(?:positive|negative)\b")


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def normalize_label(text: str) -> str:
    """'Positive.' / ' "negative"' -> 'positive' / 'negative'; other text lower-cased and stripped."""
    return re.sub(r"[^a-z ]", "", text.strip().lower()).strip()


class SentimentTask(DemoTask):
    """Classify a generated review as positive or negative; metric: accuracy."""

    name = "sentiment"
    description = "one-word sentiment (positive/negative) of a generated product review"
    primary_metric = "accuracy"
    max_new_tokens = 8
    prompt_templates = (
        "Classify the sentiment of this review as positive or negative.\n\nReview: {review}",
        "Is the following customer review positive or negative? Answer with one word.\n{review}",
        'Review: "{review}"\nSentiment (positive or negative)?',
        "Read the review and reply with its sentiment, positive or negative.\n\n{review}",
        "What is the sentiment of this product review (positive/negative)?\n{review}",
        "Sentiment label for: {review}",
    )

    def _sample(self, rng: random.Random) -> dict[str, Any]:
        label = rng.choice(LABELS)
        other = LABELS[1 - LABELS.index(label)]
        product = rng.choice(PRODUCTS)
        opener = rng.choice(OPENERS).format(product=product, when=rng.choice(WHEN))
        shape = rng.choice(("one", "two", "mixed"))
        if shape == "one":
            body = _sentence(rng.choice(CLAUSES[label])) + "."
        elif shape == "two":
            first, second = rng.sample(CLAUSES[label], 2)
            body = f"{_sentence(first)} and {second}."
        else:  # a complaint (or praise) followed by the overall verdict that sets the label
            body = f"{_sentence(rng.choice(CLAUSES[other]))}, but overall {rng.choice(VERDICTS[label])}."
        stars = rng.choice(STARS[label]) if rng.random() < 0.3 else ""
        review = " ".join(part for part in (opener, body, stars) if part)
        return {"review": review, "label": label}

    def _prompt_fields(self, fields: dict[str, Any], rng: random.Random) -> dict[str, str]:
        return {"review": fields["review"]}

    def _completion(self, fields: dict[str, Any]) -> str:
        return fields["label"]

    def content_key(self, fields: dict[str, Any]) -> str:
        return fields["review"]

    def score(self, prediction: str, reference: str) -> dict[str, float]:
        # `accuracy` wants the bare label; `label_mentioned` forgives prose around it ("This review
        # is positive."), separating a wrong judgement from a wrong format.
        first = _LABEL_WORD.search(prediction.lower())
        return {
            "accuracy": float(normalize_label(prediction) == normalize_label(reference)),
            "label_mentioned": float(first is not None and first.group(0) == normalize_label(reference)),
        }
