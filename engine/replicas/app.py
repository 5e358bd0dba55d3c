"""The Ray Serve application: a Router in front of `replicas` EngineReplicas.

    serve run engine.replicas.app:build replicas=2 serve_args="--max-num-seqs 64"

`build` is Ray Serve's application builder (its arguments come from `serve run` key=value pairs
or a config file's `args:`, see docker/ray-serve.yaml); `engine serve --replicas N` calls it too.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from engine.allocator import find_allocator
from engine.replicas.ingress import Router
from engine.replicas.replica import EngineReplica
from engine.replicas.routing import PrefixOrLeastLoadedRouter

# The load gap (requests queued at a replica) past which prefix affinity gives way to the
# least loaded of two (power of two choices).
IMBALANCE_THRESHOLD = 1
# The share of a prompt (characters) that must match an earlier one's for affinity to count; below
# it, power of two choices (engine/replicas/routing.py).  Ray's default, 0.1, let distinct ShareGPT
# prompts that open alike ("Write a ...") pile onto one replica (49 of 64).
MIN_PREFIX_MATCH = 0.5
MAX_ONGOING_REQUESTS = 1024  # per replica: its engine batches and queues them itself


def build(args: dict[str, Any]) -> serve.Application:
    """args: replicas (int, default 1), max_replicas (int: autoscale from replicas up to it),
    serve_args (`engine serve` flags for every replica, a string), threads (torch threads a replica)."""
    replicas = int(args.get("replicas", 1))
    max_replicas = args.get("max_replicas")
    serve_argv = shlex.split(args.get("serve_args", "")) if isinstance(args.get("serve_args", ""), str) \
        else list(args["serve_args"])
    threads = int(args.get("threads") or max(1, (os.cpu_count() or 1) // replicas))
    engines = serve.deployment(EngineReplica, name="EngineReplica").options(
        max_ongoing_requests=MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": _replica_env()}},
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixOrLeastLoadedRouter,
            request_router_kwargs={"imbalanced_threshold": IMBALANCE_THRESHOLD,
                                   "match_rate_threshold": MIN_PREFIX_MATCH}),
        **scaling_options(replicas, max_replicas),
    ).bind(serve_argv, threads)
    router = serve.deployment(Router, name="Router").options(max_ongoing_requests=4 * MAX_ONGOING_REQUESTS,
                                                             ray_actor_options={"num_cpus": 0})
    return router.bind(engines, replicas)


def scaling_options(replicas: int, max_replicas: Any) -> dict[str, Any]:
    """The engine deployment's replica count: fixed, or autoscaled on the engines' own load."""
    if max_replicas is None or int(max_replicas) <= replicas:
        return {"num_replicas": replicas}
    policy = AutoscalingPolicy(policy_function="engine.replicas.autoscaling:engine_load_policy")
    return {"autoscaling_config": AutoscalingConfig(min_replicas=replicas, max_replicas=int(max_replicas),
                                                    initial_replicas=replicas, policy=policy)}


def _replica_env() -> dict[str, str]:
    """tcmalloc for the replicas' processes, as `engine serve` re-executes itself on (engine/allocator.py)."""
    library = find_allocator()
    return {"LD_PRELOAD": str(library)} if library is not None else {}
