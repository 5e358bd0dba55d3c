"""The `engine bench` argparse wiring: subcommands, the lazily found `simulate`, flag parsing."""

from __future__ import annotations

import argparse
import math
import sys
import types
from typing import Any

import pytest

from engine.bench import cli as bench_cli
from engine.bench.workload import sample_requests


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine")
    bench_cli.add_bench_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_serve_flags_parse_like_vllm_bench_serve() -> None:
    args = _parser().parse_args([
        "bench", "serve", "--base-url", "http://h:1", "--endpoint", "/v1/chat/completions", "--dataset-name", "prefix",
        "--request-rates", "0.5,1,inf", "--burstiness", "0.5", "--max-concurrency", "4", "--slo-ttft-ms", "200"])
    assert args.handler is bench_cli.serve_main
    assert (args.dataset, args.request_rates, args.burstiness) == ("prefix", [0.5, 1.0, math.inf], 0.5)
    assert (args.max_concurrency, args.slo_ttft_ms, args.slo_tpot_ms) == (4, 200.0, None)
    assert math.isinf(_parser().parse_args(["bench", "serve"]).request_rate)


@pytest.mark.parametrize("bad", [["--request-rate", "0"], ["--request-rates", "1,-2"], ["--dataset", "sonnet"]])
def test_serve_refuses_bad_flags(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "serve", *bad])


def test_simulate_is_absent_without_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "engine.bench.simulate", None)  # import raises ImportError
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "simulate"])
    assert _parser().parse_args(["bench", "plot", "a.json", "-o", "b.png"]).handler is bench_cli.plot_main


def test_simulate_is_registered_from_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    module = types.ModuleType("engine.bench.simulate")
    module.add_arguments = lambda parser: parser.add_argument("--num-requests", type=int)  # type: ignore[attr-defined]
    module.main = calls.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "engine.bench.simulate", module)
    args = _parser().parse_args(["bench", "simulate", "--num-requests", "7"])
    args.handler(args)
    assert calls[0].num_requests == 7


def test_sample_requests_caps_random_outputs(tokenizer: Any) -> None:
    args = _parser().parse_args(["bench", "serve", "--dataset", "random", "--random-input-len", "20",
                                 "--random-output-len", "50", "--random-range-ratio", "0.5", "--max-output-tokens", "30"])
    requests = sample_requests(args, tokenizer, 40, max_model_len=2048)
    assert all(r.expected_output_len <= 30 for r in requests) and max(r.expected_output_len for r in requests) == 30
    long_args = _parser().parse_args(["bench", "serve", "--dataset", "long", "--long-input-len", "2000"])
    with pytest.raises(ValueError, match="--long-input-len"):
        sample_requests(long_args, tokenizer, 1, max_model_len=2048)
