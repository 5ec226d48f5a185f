"""Entry points run with `ray job submit`: dynamic task onboarding (`onboard_task`,
`onboard_tasks`, `inlaid-ray onboard`) and task administration (`inlaid-ray tasks list|show|retire`).

Names are re-exported lazily (PEP 562) so that building the CLI parser does not import torch,
Ray or Redis until a command runs.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "OnboardOptions": "inlaid_ray.jobs.onboard_args",
    "OnboardReport": "inlaid_ray.jobs.onboard",
    "OnboardingFailed": "inlaid_ray.jobs.onboard",
    "TaskSpec": "inlaid_ray.jobs.onboard",
    "onboard_task": "inlaid_ray.jobs.onboard",
    "onboard_tasks": "inlaid_ray.jobs.onboard",
    "add_onboard_parser": "inlaid_ray.jobs.cli",
    "add_tasks_parser": "inlaid_ray.jobs.cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'inlaid_ray.jobs' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
