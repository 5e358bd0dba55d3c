"""Benchmark support: request datasets shared by the offline and serving benchmarks, and
`engine bench serve`, the open-loop load generator for OpenAI-compatible servers.

One module per piece: `datasets` (what to send), `arrivals` (when), `client` (one timed streaming
request), `serve` (a run), `metrics` (records to vLLM-named figures, shared with the simulator),
`server_metrics` (the server's own Prometheus view), `report` and `plots` (output), `cli` (flags),
`workload` (the requests the dataset flags of `serve` and `simulate` ask for), `retrieval_tasks`
(long-context retrieval prompts with answers to score: passkey, needle in a haystack, key-value).
"""

from engine.bench.datasets import SampleRequest, load_sharegpt, sample_random, sample_sharegpt

__all__ = ["SampleRequest", "load_sharegpt", "sample_random", "sample_sharegpt"]
