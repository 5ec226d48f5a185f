"""Scheduling policies, one per file; importing this package registers them by name."""

from inlaid_ray.sched.policies.mlfq import MlfqConfig, MlfqPolicy
from inlaid_ray.sched.policies.srtf_cost import SrtfCostConfig, SrtfCostPolicy, SrtfFifoBoundPolicy, SrtfTaskCapPolicy

__all__ = ["MlfqConfig", "MlfqPolicy", "SrtfCostConfig", "SrtfCostPolicy", "SrtfFifoBoundPolicy", "SrtfTaskCapPolicy"]
