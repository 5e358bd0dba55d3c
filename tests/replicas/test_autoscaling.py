"""The autoscaling policy reads the engines' own load (running + waiting requests, KV use)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from ray.serve.config import AutoscalingContext  # noqa: E402

from engine.replicas.app import scaling_options  # noqa: E402
from engine.replicas.autoscaling import engine_load_policy  # noqa: E402


def context(metrics: dict, current: int = 2) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=None, deployment_name="EngineReplica", app_name="elastic-engine", current_num_replicas=current,
        target_num_replicas=current, running_replicas=[], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=None, config=None)


def test_replicas_follow_the_engines_queue_and_kv_use():
    idle = {"engine_running": {"a": 0.0, "b": 0.0}, "engine_waiting": {"a": 0.0, "b": 0.0},
            "engine_kv_usage": {"a": 0.0, "b": 0.0}}
    assert engine_load_policy(context(idle))[0] == 1
    queued = {**idle, "engine_running": {"a": 16.0, "b": 16.0}, "engine_waiting": {"a": 20.0, "b": 0.0}}
    assert engine_load_policy(context(queued))[0] == 4  # 52 requests at 16 a replica
    kv_bound = {**idle, "engine_kv_usage": {"a": 0.95, "b": 0.9}}
    assert engine_load_policy(context(kv_bound))[0] == 3  # 1.85 of KV at 0.75 a replica
    assert engine_load_policy(context({}, current=3))[0] == 3  # no report yet: keep


def test_max_replicas_turns_on_the_engine_load_policy():
    assert scaling_options(2, None) == {"num_replicas": 2}
    config = scaling_options(1, 3)["autoscaling_config"]
    assert config.min_replicas == 1 and config.max_replicas == 3 and config.initial_replicas == 1
    assert config.policy.policy_function == "engine.replicas.autoscaling:engine_load_policy"
