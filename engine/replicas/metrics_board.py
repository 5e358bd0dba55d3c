"""Every replica's Prometheus exposition, merged into one with a `replica` label, for the router's
/metrics (Ray Serve gives the router no way to call one chosen replica).

Each replica posts its own /metrics text every POST_INTERVAL_S to one named actor; the router reads
the latest of each replica that posted within MAX_AGE_S (a replica that died drops out, its
restarted successor comes in under a new label).
"""

from __future__ import annotations

import time

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

BOARD_NAME = "elastic-engine-metrics-board"
BOARD_NAMESPACE = "elastic-engine"
POST_INTERVAL_S = 1.0
MAX_AGE_S = 10.0


@ray.remote(num_cpus=0)
class MetricsBoard:
    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, str]] = {}  # replica -> (posted at, exposition)

    def post(self, replica: str, exposition: str) -> None:
        self._latest[replica] = (time.monotonic(), exposition)

    def current(self) -> dict[str, str]:
        now = time.monotonic()
        return {replica: text for replica, (posted, text) in self._latest.items() if now - posted <= MAX_AGE_S}


def metrics_board():
    """The one board (created by whichever replica or router asks first; detached: it outlives
    them, and `engine serve --replicas` removes it when it stops)."""
    return MetricsBoard.options(name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True,
                                lifetime="detached").remote()


def merged_exposition(by_replica: dict[str, str]) -> bytes:
    """One exposition: each family once, every sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(by_replica.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={"replica": replica, **sample.labels}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
