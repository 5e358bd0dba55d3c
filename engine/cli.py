"""The `engine` command: `engine serve`, `engine generate`, `engine bench ...`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from engine.capabilities import CapabilityError, cpu_features
from engine.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    KV_CACHE_DTYPES,
    WEIGHT_FORMATS,
    ConfigError,
    ModelFileError,
)


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--weight-format", default="auto", choices=WEIGHT_FORMATS)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", type=float, default=2.0, help="GiB for the KV cache")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="K and V as stored: auto (the model's dtype) or int8 (a scale per row)")
    parser.add_argument("--scheduling-policy", default="fcfs")
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)


def _generate(args: argparse.Namespace) -> None:
    from engine import LLM, SamplingParams

    try:
        llm = LLM(args.model, dtype=args.dtype, weight_format=args.weight_format, max_model_len=args.max_model_len,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                  block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                  kv_cache_dtype=args.kv_cache_dtype, scheduling_policy=args.scheduling_policy,
                  attention_backend=args.attention_backend, tensor_parallel_size=args.tensor_parallel_size)
    except (ConfigError, ModelFileError) as error:
        raise SystemExit(f"engine generate: {error}") from None
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate([args.prompt], params, use_tqdm=False)
    print(outputs[0].outputs[0].text)


def _elastify(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from engine.elastic.elastify import THOROUGH, ElastifyConfig, elastify

    config = ElastifyConfig() if args.quick else THOROUGH
    print(f"calibration: {config.num_importance_sequences} sequences for importance, {config.num_recovery_sequences} "
          f"for recovery, at most {config.max_seq_len} tokens each ({'quick' if args.quick else 'thorough'})")
    if args.levels is not None:
        try:
            config = replace(config, level_values=tuple(int(v) for v in args.levels.split(",")))
        except ValueError as error:
            raise SystemExit(f"engine elastify: --levels: {error}") from None
    try:
        result = elastify(args.model, config, force=args.force)
    except ModelFileError as error:
        raise SystemExit(f"engine elastify: {error}") from None
    print(f"elastic checkpoint: {result.directory} ({result.seconds:.0f} s)")
    print(f"anchor layers: {list(result.spec.anchor_layers)}")
    for value, fraction in result.flop_fractions().items():
        print(f"level {value:3d}: {fraction:.3f} of the full model's multiply-adds per token "
              f"({result.spec.flop_fraction(value, 512):.3f} at 512 tokens of context)")
    if args.distill:
        from engine.elastic.distill import DistillConfig, distill_checkpoint

        given = {"compute": args.distill_compute, "budget_s": args.distill_budget_s}
        options = {name: value for name, value in given.items() if value is not None}
        distill_checkpoint(args.model, result.directory, DistillConfig(**options))


def _add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    """`engine serve`'s scale-out flags (engine/replicas/launch.py takes them; each replica gets the rest)."""
    parser.add_argument("--replicas", type=int, default=None,
                        help="engines behind one prefix-aware router, on Ray Serve (engine/replicas/); "
                             "default: one engine in this process, no Ray")
    parser.add_argument("--max-replicas", type=int, default=None,
                        help="with --replicas: autoscale between --replicas and this on the engines' queue and KV use")


def _serve_replicas(args: argparse.Namespace) -> None:
    try:
        from engine.replicas.launch import serve_replicas
    except ImportError as error:
        raise SystemExit(f"engine serve: --replicas needs Ray Serve ({error}): pip install -e '.[replicas]'") from None
    serve_replicas(args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="engine", description="Elastic Engine: an LLM serving engine")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate a completion for one prompt, offline")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                          help="ranks that each hold a shard of the model (several nodes: start each with torchrun)")
    _add_engine_arguments(generate)
    generate.set_defaults(handler=_generate)

    elastify = commands.add_parser("elastify", help="make a model elastic once (importance, permutation, recovery)")
    elastify.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2)")
    elastify.add_argument("--levels", default=None, help="comma-separated, descending from 100 (default "
                          "100,90,80,70,55,40)")
    elastify.add_argument("--force", action="store_true", help="recompute every stage, cached or not")
    elastify.add_argument("--quick", action="store_true", help="the first `engine serve`'s calibration sizes "
                          "(~1 minute) instead of the thorough ones (~6 minutes; better levels)")
    elastify.add_argument("--distill", action="store_true", help="then distil each level's recovery terms from the "
                          "full model (logit KL, resumable: finished levels are kept)")
    elastify.add_argument("--distill-budget-s", type=float, default=None, help="wall-clock seconds per level, at "
                          "most (default 300)")
    elastify.add_argument("--distill-compute", choices=("fp32", "bf16", "auto"), default=None,
                          help="the submodel's forward and backward in fp32, under bf16 autocast, or (auto, the "
                               "default) bf16 where the CPU has bf16 dot products, else fp32")
    elastify.set_defaults(handler=_elastify)

    try:
        from engine.api.server import add_serve_arguments, run_server
    except ImportError:  # the server's optional pieces are missing
        pass
    else:
        serve = commands.add_parser("serve", help="start the OpenAI-compatible HTTP server")
        add_serve_arguments(serve)
        _add_replica_arguments(serve)
        serve.set_defaults(handler=lambda args: run_server(args) if args.replicas is None else _serve_replicas(args))

    from engine.bench.cli import add_bench_commands

    add_bench_commands(commands)

    args = parser.parse_args(argv)
    try:
        cpu_features()  # a bad ELASTIC_ENGINE_CPU_ISA is a one-line error, before anything loads
    except CapabilityError as error:
        raise SystemExit(f"engine: {error}") from None
    if args.command in ("serve", "generate") and "RANK" in os.environ:
        args.handler = _handler_under_launcher(args.handler)
    args.handler(args)


def _handler_under_launcher(handler: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Under torchrun every rank runs this command: rank 0 runs it (the engine and the server, whose
    TensorParallelRunner takes the others as its ranks); the other ranks become those ranks."""
    from engine.distributed.launch import LaunchedRank

    launched = LaunchedRank.from_env()
    if launched is None:
        return handler

    def run_rank(args: argparse.Namespace) -> None:
        try:
            launched.check_size(args.tensor_parallel_size)
        except ConfigError as error:
            raise SystemExit(f"engine {args.command}: {error}") from None
        if launched.rank == 0:
            return handler(args)
        from engine.allocator import reexec_on_fast_allocator
        from engine.worker.tensor_parallel import run_launched_rank

        reexec_on_fast_allocator()
        run_launched_rank(launched, getattr(args, "device", "cpu"))

    return run_rank


if __name__ == "__main__":
    sys.exit(main())
