"""The demo task registry: four generated tasks with clearly different output-length profiles
(one token, ~20, ~25 and ~90-170 tokens), chosen by name."""

from __future__ import annotations

from inlaid_ray.demo.task_base import SPLITS, DemoTask, example_id, make_record, split_of
from inlaid_ray.demo.task_email import EmailTask
from inlaid_ray.demo.task_extract import ExtractTask
from inlaid_ray.demo.task_rewrite import RewriteTask
from inlaid_ray.demo.task_sentiment import SentimentTask
from inlaid_ray.errors import TaskNotFound

# Ordered from the shortest to the longest output.
DEMO_TASKS: dict[str, DemoTask] = {
    task.name: task for task in (SentimentTask(), ExtractTask(), RewriteTask(), EmailTask())
}


def get_task(name: str) -> DemoTask:
    """The demo task called `name`; raises TaskNotFound naming the known tasks."""
    try:
        return DEMO_TASKS[name]
    except KeyError:
        raise TaskNotFound(f"unknown demo task {name!r}; known: {sorted(DEMO_TASKS)}") from None


__all__ = ["DEMO_TASKS", "SPLITS", "DemoTask", "example_id", "get_task", "make_record", "split_of"]
