"""`make_policy`: the scheduling policy a SchedulerConfig names.

It lives apart from policy.py because it imports every policy, and the policies in mlfq.py and
slo_policy.py import the interface in policy.py: beside the interface it would close a cycle.
"""

from __future__ import annotations

from engine.config import SchedulerConfig
from engine.scheduler.cost_model import StepCostModel
from engine.scheduler.elastic_choice import ElasticChoice
from engine.scheduler.mlfq import MLFQPolicy
from engine.scheduler.policy import FCFSPolicy, PriorityPolicy, SchedulingPolicy
from engine.scheduler.slo_policy import SLOPolicy


def make_policy(config: SchedulerConfig | str, cost_model: StepCostModel | None = None,
                choice: ElasticChoice | None = None) -> SchedulingPolicy:
    """The policy a SchedulerConfig names (or a bare name, with default settings).  `choice`: the
    elastic settings of auto requests, for the slo policy (the others run them at the full level)."""
    if isinstance(config, str):
        config = SchedulerConfig(policy=config)
    if config.policy == "fcfs":
        return FCFSPolicy()
    if config.policy == "priority":
        return PriorityPolicy()
    if config.policy == "mlfq":
        return MLFQPolicy(config.mlfq)
    if config.policy == "slo":
        if cost_model is None:
            raise ValueError("the slo policy needs a step cost model")
        return SLOPolicy(config.slo, cost_model, max_budget=config.max_num_batched_tokens,
                         max_num_seqs=config.max_num_seqs, choice=choice)
    raise ValueError(f"unknown scheduling policy {config.policy!r}")
