"""Scheduling policies (which requests run each step), shared by the engine and the simulator
(`inlaid_ray.bench.simulator`)."""

from inlaid_ray.sched.policy import (
    FifoPolicy,
    SchedulableRequest,
    SchedulingPolicy,
    StepBudget,
    make_policy,
    register_policy,
)
from inlaid_ray.sched.admission import StepPlan, plan_step
from inlaid_ray.sched.cost_model import StepCostModel, StepSample, fit_cost_model
from inlaid_ray.sched.policies import MlfqConfig, MlfqPolicy, SrtfCostConfig, SrtfCostPolicy, SrtfTaskCapPolicy

# The output-length predictor (inlaid_ray.sched.predictor) needs torch + transformers and is
# imported from its module, so that importing the policies stays dependency-free.

__all__ = [
    "FifoPolicy",
    "SrtfCostConfig",
    "SrtfCostPolicy",
    "SrtfTaskCapPolicy",
    "MlfqConfig",
    "MlfqPolicy",
    "SchedulableRequest",
    "SchedulingPolicy",
    "StepBudget",
    "StepCostModel",
    "StepPlan",
    "StepSample",
    "fit_cost_model",
    "make_policy",
    "plan_step",
    "register_policy",
]
