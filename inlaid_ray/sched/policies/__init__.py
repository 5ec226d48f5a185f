"""Scheduling policies, one per file; importing this package registers them by name."""

from inlaid_ray.sched.policies.inlaid import InlaidConfig, InlaidPolicy
from inlaid_ray.sched.policies.mlfq import MlfqConfig, MlfqPolicy

__all__ = ["InlaidConfig", "InlaidPolicy", "MlfqConfig", "MlfqPolicy"]
