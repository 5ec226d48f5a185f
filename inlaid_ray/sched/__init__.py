"""Scheduling policies (which requests run each step), shared by the engine and the simulator."""

from inlaid_ray.sched.policy import (
    FifoPolicy,
    SchedulableRequest,
    SchedulingPolicy,
    StepBudget,
    make_policy,
    register_policy,
)

__all__ = [
    "FifoPolicy",
    "SchedulableRequest",
    "SchedulingPolicy",
    "StepBudget",
    "make_policy",
    "register_policy",
]
