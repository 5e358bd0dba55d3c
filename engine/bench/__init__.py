"""Benchmark support: request datasets shared by the offline and serving benchmarks."""

from engine.bench.datasets import SampleRequest, load_sharegpt, sample_random, sample_sharegpt

__all__ = ["SampleRequest", "load_sharegpt", "sample_random", "sample_sharegpt"]
