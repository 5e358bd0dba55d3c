"""Ray Serve's replica count from the engines' own load: requests running and waiting, and KV use.

Each replica reports `record_autoscaling_stats` (engine/replicas/replica.py); Ray aggregates them
over its look-back window and calls this policy, then applies min/max replicas and the up/down
delays of the deployment's autoscaling_config around its answer.
"""

from __future__ import annotations

import math

from ray.serve.config import AutoscalingContext

TARGET_REQUESTS_PER_REPLICA = 16  # running + waiting; past it a step's batch grows slow
TARGET_KV_USAGE = 0.75  # of each replica's KV cache; past it preemptions start


def engine_load_policy(ctx: AutoscalingContext) -> tuple[int, dict]:
    metrics = ctx.aggregated_metrics or {}
    requests = sum(metrics.get("engine_running", {}).values()) + sum(metrics.get("engine_waiting", {}).values())
    kv_usage = sum(metrics.get("engine_kv_usage", {}).values())
    if not metrics:  # no report yet: keep what there is
        return ctx.target_num_replicas, {}
    wanted = max(math.ceil(requests / TARGET_REQUESTS_PER_REPLICA), math.ceil(kv_usage / TARGET_KV_USAGE), 1)
    return wanted, {}
