"""`email`: write a templated order-confirmation email from an order summary.

Output profile: long (~90-170 tokens), growing with the number of items (2-8) and an extra
sentence for express shipping, so output length varies within the task as well as across tasks.
"""

from __future__ import annotations

import random
from typing import Any

from inlaid_ray.demo.metrics import exact_match, rouge_l
from inlaid_ray.demo.task_base import DemoTask
from inlaid_ray.demo.words import CITIES, FIRST_NAMES, ITEMS, LAST_NAMES, WEEKDAYS

EXPRESS_SENTENCE = " Because you chose express shipping, your parcel has priority in our warehouse."
# One string so the layout is visible; the long line is the email's own paragraph.
EMAIL_TEMPLATE = """Dear {first},

Thank you for your order #{number}. We are happy to confirm that it contains the following items:
{item_lines}

Your parcel will be delivered to {city} on {day}.{express} You will receive a tracking link as soon as it leaves our warehouse.

If anything is wrong with your order, simply reply to this email and we will fix it.

Kind regards,
The Customer Care Team"""


class EmailTask(DemoTask):
    """Order summary -> confirmation email; metrics: ROUGE-L and exact match."""

    name = "email"
    description = "order summary -> templated order-confirmation email (long output)"
    primary_metric = "rouge_l"
    max_new_tokens = 200
    prompt_templates = (
        "Write an order confirmation email.\nCustomer: {name}\nOrder number: {number}\n"
        "Items: {items_x}\nDelivery: {day}, {city}\nShipping: {shipping}",
        "Compose the confirmation email for order {number} placed by {name}. "
        "Items: {items_paren}. It ships {shipping} to {city} and arrives on {day}.",
        "Order #{number} | {name} | {city} | {day} | {shipping} shipping\nItems: {items_x}\n"
        "Please draft the confirmation email for this order.",
        "Customer {name} ordered {items_paren} (order {number}). Delivery to {city} on {day} "
        "with {shipping} shipping. Write the email confirming the order.",
        "Draft an email confirming this order.\n\n- customer: {name}\n- order: {number}\n"
        "- items: {items_x}\n- shipping: {shipping}, arriving {day} in {city}",
    )

    def _sample(self, rng: random.Random) -> dict[str, Any]:
        n_items = rng.randint(2, 8)
        return {
            "first": rng.choice(FIRST_NAMES),
            "last": rng.choice(LAST_NAMES),
            "number": rng.randint(1000, 9999),
            "items": tuple((rng.randint(1, 6), singular) for singular, _ in rng.sample(ITEMS, n_items)),
            "city": rng.choice(CITIES),
            "day": rng.choice(WEEKDAYS),
            "express": rng.random() < 0.4,
        }

    def _prompt_fields(self, fields: dict[str, Any], rng: random.Random) -> dict[str, str]:
        items = fields["items"]
        return {
            "name": f"{fields['first']} {fields['last']}",
            "number": str(fields["number"]),
            "items_x": ", ".join(f"{qty} x {item}" for qty, item in items),
            "items_paren": ", ".join(f"{item} ({qty})" for qty, item in items),
            "city": fields["city"],
            "day": fields["day"],
            "shipping": "express" if fields["express"] else "standard",
        }

    def _completion(self, fields: dict[str, Any]) -> str:
        return EMAIL_TEMPLATE.format(
            first=fields["first"],
            number=fields["number"],
            item_lines="\n".join(f"- {qty} x {item}" for qty, item in fields["items"]),
            city=fields["city"],
            day=fields["day"],
            express=EXPRESS_SENTENCE if fields["express"] else "",
        )

    def score(self, prediction: str, reference: str) -> dict[str, float]:
        return {"rouge_l": rouge_l(prediction, reference), "exact_match": exact_match(prediction, reference)}
