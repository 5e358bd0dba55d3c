"""`engine serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn).

The routes translate: decode and validate the body (protocol.py), map it to engine requests
(serving_*.py), and hand the outputs back as JSON or server-sent events.  All engine state lives
behind `AsyncEngine`; a client that disconnects has its requests aborted.
"""

from __future__ import annotations

import argparse
import gc
import hmac
import logging
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from engine.allocator import allocator_in_use, reexec_on_fast_allocator
from engine.api.async_engine import AsyncEngine
from engine.api.errors import APIError
from engine.api.http_protocol import protocol_with_read_deadline
from engine.api.limits import add_limit_arguments, limits_from_args
from engine.api.metrics import EngineMetrics
from engine.api.openapi import VersionResponse, install_openapi
from engine.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorInfo,
                                 ErrorResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
                                 DetokenizeResponse, decode_request, encode)
from engine.api.serving_chat import chat_prompt_token_ids, create_chat_completion
from engine.api.serving_elastic import model_aliases
from engine.api.serving_common import check_model, check_prompt_token_ids, run_until_disconnected
from engine.api.serving_completions import create_completion
from engine.config import ATTENTION_BACKENDS, DTYPES, ELASTIC_MODES, KV_CACHE_DTYPES, SCHEDULING_POLICIES, WEIGHT_FORMATS, CacheConfig, ConfigError, EngineConfig, \
    MLFQConfig, ModelConfig, ModelFileError, ParallelConfig, PromptPruningConfig, RunnerConfig, SchedulerConfig, SLOConfig
from engine.elastic.spec import FULL_LEVEL
from engine.prompt_pruning import parse_prune_layers
from engine.scheduler.elastic_choice import KEEP_LADDER

logger = logging.getLogger("engine.api")

try:
    VERSION = version("elastic-engine")
except PackageNotFoundError:
    VERSION = "0.0.0+unknown"


def error_response(error: APIError) -> Response:
    body = ErrorResponse(ErrorInfo(error.message, error.type, error.param, error.code))
    return Response(encode(body), status_code=error.status, media_type="application/json", headers=error.headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) anything over max_bytes before reading it all."""
    too_large = APIError(f"Request body exceeds {max_bytes} bytes.", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(engine: AsyncEngine, metrics: EngineMetrics | None = None, api_keys: Sequence[str] = (),
              engine_on_own_thread: bool = True, allowed_origins: Sequence[str] = ()) -> FastAPI:
    """`api_keys`: /v1 needs `Authorization: Bearer <one of them>` (none: open).  `allowed_origins`:
    browsers on these origins may call the API (CORS); none (the default): no CORS headers at all."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start(own_thread=engine_on_own_thread)
        yield
        engine.shutdown()

    app = FastAPI(title="Elastic Engine", version=VERSION, lifespan=lifespan)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _add_error_handlers(app)
    app.include_router(_openai_routes(engine, api_keys))
    app.include_router(_server_routes(engine, metrics))
    install_openapi(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(_: Request, error: APIError) -> Response:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, error: StarletteHTTPException) -> Response:
        return error_response(APIError(str(error.detail), status=error.status_code, code=_slug(str(error.detail))))

    @app.exception_handler(Exception)
    async def on_bug(_: Request, error: Exception) -> Response:
        logger.exception("Unhandled error")
        return error_response(APIError(f"Internal server error: {type(error).__name__}", status=500,
                                       type="server_error"))


def _slug(text: str) -> str:
    return text.lower().replace(" ", "_")


def _openai_routes(engine: AsyncEngine, api_keys: Sequence[str]) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(api_keys))])
    max_bytes = engine.limits.max_body_bytes

    @router.get("/models")
    async def models() -> Response:
        card = ModelCard(id=engine.model_name, max_model_len=engine.max_model_len, root=engine.model_name)
        aliases = [ModelCard(id=alias, max_model_len=engine.max_model_len, root=engine.model_name)
                   for alias in model_aliases(engine)]
        return Response(encode(ModelList([card, *aliases])), media_type="application/json")

    @router.post("/completions")
    async def completions(raw: Request) -> Response:
        arrival_time = time.time()  # before reading, parsing and tokenizing: the client's clock starts here
        request = decode_request(await read_body(raw, max_bytes), CompletionRequest)
        return await run_until_disconnected(raw, create_completion(request, engine, arrival_time))

    @router.post("/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        arrival_time = time.time()
        request = decode_request(await read_body(raw, max_bytes), ChatCompletionRequest)
        return await run_until_disconnected(raw, create_chat_completion(request, engine, arrival_time))

    return router


def _api_key_check(api_keys: Sequence[str]) -> Callable[[Request], None]:
    """Constant time in the key's content: every key is compared (hmac.compare_digest), none
    short-circuits, so timing tells nothing of which key or how much of one matched.  Keys are
    never logged."""
    expected = [f"Bearer {key}".encode() for key in api_keys]

    async def check(request: Request) -> None:  # async: a sync dependency would run on a thread pool
        if not expected:
            return
        given = request.headers.get("authorization", "").encode()
        matches = [hmac.compare_digest(given, key) for key in expected]
        if not any(matches):
            raise APIError("Missing or invalid API key: send `Authorization: Bearer <key>`.", status=401,
                           code="invalid_api_key")

    return check


def _server_routes(engine: AsyncEngine, metrics: EngineMetrics | None) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        body = metrics.render() if metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @router.get("/version")
    async def server_version() -> Response:
        return Response(encode(VersionResponse(VERSION)), media_type="application/json")

    max_bytes = engine.limits.max_body_bytes

    @router.post("/tokenize")
    async def tokenize(raw: Request) -> Response:
        request = decode_request(await read_body(raw, max_bytes), TokenizeRequest)
        check_model(request.model, engine)
        if (request.prompt is None) == (request.messages is None):
            raise APIError("Give exactly one of prompt and messages.", param="prompt")
        if request.messages is not None:
            token_ids = chat_prompt_token_ids(request.messages, engine, request.add_generation_prompt)
        else:
            token_ids = engine.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        body = TokenizeResponse(len(token_ids), engine.max_model_len, token_ids)
        return Response(encode(body), media_type="application/json")

    @router.post("/detokenize")
    async def detokenize(raw: Request) -> Response:
        request = decode_request(await read_body(raw, max_bytes), DetokenizeRequest)
        check_model(request.model, engine)
        if request.tokens:
            check_prompt_token_ids(request.tokens, engine, param="tokens")
        text = engine.tokenizer.decode(request.tokens, skip_special_tokens=False) if request.tokens else ""
        return Response(encode(DetokenizeResponse(text)), media_type="application/json")

    return router


# ---- command line ----

def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `engine serve`, named like `vllm serve`'s."""
    parser.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--served-model-name", default=None, help="model name in the API (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", action="append", default=[],
                        help="require `Authorization: Bearer <key>` on /v1 (repeat for several keys)")
    parser.add_argument("--api-key-file", default=None,
                        help="a file of API keys, one a line (blank lines and # comments ignored); adds to --api-key")
    parser.add_argument("--allowed-origins", default="",
                        help="comma-separated origins browsers may call the API from (CORS); default none: CORS off")
    parser.add_argument("--dtype", default=ModelConfig.dtype, choices=DTYPES,
                        help="auto: bf16 on CUDA and on CPUs with bf16 dot products, else float32")
    parser.add_argument("--weight-format", default=ModelConfig.weight_format, choices=WEIGHT_FORMATS,
                        help="auto: a GGUF file's quantized blocks through the C++ linear where it runs, "
                             "else dequantized; dequantized, native, int8")
    parser.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    add_elastic_arguments(parser)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=ParallelConfig.tensor_parallel_size,
                        help="processes that each hold a shard of every weight and of the KV heads "
                             "(torch.distributed: gloo on CPU, NCCL on CUDA); spawned on this node, or "
                             "started on several nodes by torchrun (README)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens)
    parser.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    add_cache_arguments(parser)
    parser.add_argument("--scheduling-policy", default=SchedulerConfig.policy, choices=SCHEDULING_POLICIES)
    add_policy_arguments(parser)
    add_reliability_arguments(parser)
    parser.add_argument("--attention-backend", default=RunnerConfig.attention_backend, choices=ATTENTION_BACKENDS,
                        help="auto: Triton kernels on CUDA; on CPU the C++ decode kernel where it builds, else the torch path")
    parser.add_argument("--disable-log-stats", action="store_true", help="no periodic throughput log line")
    parser.add_argument("--check-invariants", action="store_true",
                        help="debug: check the KV block bookkeeping whenever the engine goes idle "
                             "(engine:invariant_violations_total; benchmarks/soak.py)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug", "trace"))


def add_elastic_arguments(parser: argparse.ArgumentParser) -> None:
    """Elastic submodels and prompt pruning: what a request runs when it names neither."""
    parser.add_argument("--elastic", default=ModelConfig.elastic, choices=ELASTIC_MODES,
                        help="elastic submodels: on builds the model's elastic checkpoint on first use (cached); "
                             "auto: on for the default model")
    parser.add_argument("--elastic-checkpoint", default=None, help="elastic checkpoint directory (default: the cache's)")
    parser.add_argument("--elastic-level", type=int, default=ModelConfig.elastic_level,
                        help="elastic level of requests that name none (100: the full model)")
    parser.add_argument("--elastic-auto", action="store_true",
                        help="requests that name no elastic level or prompt_keep leave both to the slo policy, "
                             "which picks the best quality their latency targets allow under the current load")
    parser.add_argument("--prompt-keep", type=float, default=PromptPruningConfig.default_keep,
                        help="fraction of a long prompt the layers past the prune layer compute, for requests "
                             "that name none (1: no pruning; elastic.prompt_keep per request)")
    parser.add_argument("--prune-layers", type=parse_prune_layers, default=None,
                        help="prompt pruning's prune layers, ascending, e.g. 9,15 (one layer: one stage; "
                             "default: the engine's measured ones)")
    parser.add_argument("--prompt-pruning-min-tokens", type=int, default=PromptPruningConfig.min_prompt_tokens,
                        help="prompts shorter than this are never pruned")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The paged KV cache: its blocks, their memory and format, prefix sharing."""
    parser.add_argument("--block-size", type=int, default=CacheConfig.block_size)
    parser.add_argument("--kv-cache-memory", type=float, default=CacheConfig.kv_cache_memory, help="GiB")
    parser.add_argument("--kv-cache-dtype", default=CacheConfig.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                        help="K and V as stored: auto (the model's dtype) or int8 (one int8 a value and an fp32 "
                             "scale a row: ~1.8x the blocks in the same memory; answer perplexity +0.2%% here)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=CacheConfig.enable_prefix_caching,
                        help="share the KV of identical prompt prefixes (--no-enable-prefix-caching or "
                             "--no-prefix-caching turns it off)")
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                        help=argparse.SUPPRESS)


def add_reliability_arguments(parser: argparse.ArgumentParser) -> None:
    """Queue bound, timeouts, shutdown and per-request limits (engine/api/limits.py)."""
    parser.add_argument("--max-waiting-requests", type=int, default=None,
                        help="refuse new requests (429 with Retry-After) while this many wait (default: no limit)")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="end a request with a 408 error (an error event when streaming) this many seconds "
                             "after it arrived (default: no timeout)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM or SIGINT, seconds running requests may take to finish; new ones get 503 "
                             "meanwhile, the rest end with an error, then the server exits 0 (a second signal: now)")
    parser.add_argument("--timeout-keep-alive", type=float, default=5.0,
                        help="close an idle keep-alive connection after this many seconds")
    parser.add_argument("--timeout-request-read", type=float, default=30.0,
                        help="close a connection whose client takes longer than this many seconds to send a whole "
                             "request (headers and body) after connecting or after its previous response: slow "
                             "or silent clients cannot hold connections")
    add_limit_arguments(parser)


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """Settings of the mlfq and slo scheduling policies (see engine/scheduler/mlfq.py, slo_policy.py)."""
    mlfq = MLFQConfig()
    parser.add_argument("--mlfq-num-levels", type=int, default=mlfq.num_levels,
                        help="queues; queue i has quantum base * 2**i decode steps, the last unbounded")
    parser.add_argument("--mlfq-base-quantum", type=int, default=mlfq.base_quantum,
                        help="quantum of the top queue, in decode steps")
    parser.add_argument("--mlfq-prefill-tokens-per-unit", type=int, default=mlfq.prefill_tokens_per_unit,
                        help="prefill tokens that cost one decode step (skip-join placement, service)")
    parser.add_argument("--mlfq-starvation-s", type=float, default=mlfq.starvation_s,
                        help="a request unscheduled this long is promoted to the top queue")
    parser.add_argument("--slo-ttft-ms", type=float, default=None,
                        help="default TTFT target for requests without `slo` (the slo policy)")
    parser.add_argument("--slo-tpot-ms", type=float, default=None,
                        help="default TPOT target for requests without `slo` (the slo policy)")
    parser.add_argument("--slo-best-effort", action="store_true",
                        help="serve requests whose TTFT target is out of reach last instead of refusing them (429)")


def policy_configs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """SchedulerConfig keyword arguments for the policy settings of `add_policy_arguments`."""
    return {"mlfq": MLFQConfig(num_levels=args.mlfq_num_levels, base_quantum=args.mlfq_base_quantum,
                               prefill_tokens_per_unit=args.mlfq_prefill_tokens_per_unit,
                               starvation_s=args.mlfq_starvation_s),
            "slo": SLOConfig(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms, best_effort=args.slo_best_effort)}


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, weight_format=args.weight_format,
                          max_model_len=args.max_model_len, served_model_name=args.served_model_name,
                          elastic=args.elastic, elastic_checkpoint=args.elastic_checkpoint,
                          elastic_level=args.elastic_level, elastic_auto=args.elastic_auto),
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                          enable_prefix_caching=args.enable_prefix_caching, kv_cache_dtype=args.kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, policy=args.scheduling_policy,
                                  **policy_configs_from_args(args)),
        runner=RunnerConfig(attention_backend=args.attention_backend),
        prompt_pruning=PromptPruningConfig(default_keep=args.prompt_keep, prune_layers=args.prune_layers,
                                           min_prompt_tokens=args.prompt_pruning_min_tokens),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size))


def run_server(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        config = checked_server_config(args)
    except (ConfigError, ValueError, OSError) as e:
        raise SystemExit(f"engine serve: {e}") from None
    reexec_on_fast_allocator()  # before torch loads; returns at once in the re-executed process
    logger.info("Memory allocator: %s", allocator_in_use())
    try:
        llm_engine, engine, app = build_server(config, args, engine_on_own_thread=False)
    except ModelFileError as e:
        raise SystemExit(f"engine serve: {e}") from None
    logger.info("Serving %s on http://%s:%d%s", llm_engine.model_name, args.host, args.port,
                f" ({len(api_keys)} API keys)" if (api_keys := api_keys_from_args(args)) else "")
    try:
        serve_http_beside_engine(engine, uvicorn.Config(app, host=args.host, port=args.port,
                                                        log_level=args.uvicorn_log_level,
                                                        timeout_keep_alive=args.timeout_keep_alive,
                                                        http=protocol_with_read_deadline(args.timeout_request_read),
                                                        timeout_graceful_shutdown=GRACEFUL_HTTP_CLOSE_S),
                                 args.shutdown_timeout)
    finally:
        _stop_ranks(llm_engine)


def checked_server_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's config from `engine serve`'s flags; raises ConfigError / ValueError naming a bad one."""
    config = engine_config_from_args(args)
    limits_from_args(args)
    api_keys_from_args(args)
    for name in ("max_waiting_requests", "request_timeout", "shutdown_timeout", "timeout_keep_alive",
                 "timeout_request_read"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise ConfigError(f"{name} must be non-negative, got {value}")
    if not args.timeout_request_read > 0:  # 0 would close every connection before its request
        raise ConfigError(f"timeout_request_read must be positive, got {args.timeout_request_read}")
    return config


def build_server(config: EngineConfig, args: argparse.Namespace, engine_on_own_thread: bool):
    """(LLMEngine, AsyncEngine, the FastAPI app) of one server: `engine serve`'s, or one Ray Serve
    replica's (engine/replicas/)."""
    from engine.llm_engine import LLMEngine  # deferred: loading torch and the model is slow
    from engine.model.gguf_loader import release_gguf_readers

    llm_engine = LLMEngine(config)
    release_gguf_readers()  # a server loads its model once; the parsed file would stay resident
    disable_created_metrics()  # no `*_created` series: like vLLM, and half the /metrics size
    metrics = EngineMetrics(llm_engine.model_name, llm_engine.max_model_len, config.scheduler.max_num_batched_tokens,
                            llm_engine.elastic_levels or (FULL_LEVEL,), sorted({1.0, *KEEP_LADDER}, reverse=True))
    metrics.stat_logger.enabled = not args.disable_log_stats
    engine = AsyncEngine(llm_engine, metrics, args.max_waiting_requests, args.request_timeout, limits_from_args(args),
                         check_invariants=args.check_invariants)
    origins = [origin.strip() for origin in args.allowed_origins.split(",") if origin.strip()]
    app = build_app(engine, metrics, api_keys_from_args(args), engine_on_own_thread=engine_on_own_thread,
                    allowed_origins=origins)
    logger.info("Froze %d start-up objects out of the garbage collector's reach", freeze_startup_heap())
    return llm_engine, engine, app


def freeze_startup_heap() -> int:
    """Collects once, then moves every object alive now (the model's modules, the tokenizer's
    tables, the server's routes: ~800k tracked objects for SmolLM2) into Python's permanent
    generation, out of every later collection's traversal; returns how many were frozen.

    PERF: a full collection traversed them all and took ~210 ms on the 2-vCPU EPYC, a stall of
    whichever decode step it landed in: some 8 steps' worth of a tight TPOT target.  What the
    server allocates per request after this is collected as before.  vLLM freezes its start-up
    heap the same way.  Call it once a process has built what it keeps for its lifetime.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _stop_ranks(llm_engine) -> None:
    """Tensor-parallel ranks stop with the server (after a dead engine loop, as far as they can)."""
    try:
        llm_engine.shutdown()
    except Exception:  # noqa: BLE001 - a rank already gone: exiting is all that is left
        logger.warning("tensor-parallel ranks did not stop cleanly", exc_info=True)


def api_keys_from_args(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key)
    if args.api_key_file is not None:
        lines = Path(args.api_key_file).read_text().splitlines()
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if any(not key or any(c.isspace() for c in key) for key in keys):
        raise ValueError("API keys must be non-empty and hold no whitespace")
    return keys


# After the engine loop ends every request is answered; uvicorn gets this long to flush and close.
GRACEFUL_HTTP_CLOSE_S = 5
GIL_SWITCH_INTERVAL_S = 0.0005


def serve_http_beside_engine(engine: AsyncEngine, config: uvicorn.Config, shutdown_timeout_s: float = 30.0) -> None:
    """uvicorn's event loop on a thread of its own, the engine loop on this (the main) thread,
    which loaded the model (see AsyncEngine.run_engine_loop for why).

    SIGTERM or SIGINT drains: new requests get 503 and /health 503, running ones may finish for
    `shutdown_timeout_s`, the rest end with an error; then HTTP closes and this returns (exit 0).
    A second signal stops at once.  If the engine loop dies, HTTP closes and this raises
    SystemExit(1), so a supervisor restarts the server rather than finding its port open and dead."""
    # PERF: the engine loop and the event loop share the GIL; at Python's default 5 ms switch
    # interval each token's hand-over from one to the other waited for it.  Single stream, 256
    # tokens, 2-vCPU Xeon: TPOT 14.5 ms at 5 ms, 13.7 at 0.5 ms (and at 0.1 ms), offline 12.3.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    server = uvicorn.Server(config)
    http_thread = threading.Thread(target=server.run, name="http", daemon=True)
    signals = []

    def on_signal(signum, frame) -> None:  # noqa: ARG001
        signals.append(signum)
        if len(signals) == 1:
            logger.info("%s: draining (new requests get 503; running ones have %g s)",
                        signal.Signals(signum).name, shutdown_timeout_s)
            engine.begin_drain(shutdown_timeout_s)
        else:
            engine.shutdown()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    http_thread.start()
    while not server.started and http_thread.is_alive():
        time.sleep(0.05)
    try:
        if server.started:
            engine.run_engine_loop()  # returns once drained or shut down
    except BaseException:
        logger.critical("The engine loop died; closing HTTP and exiting non-zero", exc_info=True)
        _close_http(server, http_thread)
        raise SystemExit(1) from None
    _close_http(server, http_thread)
    if not signals and not server.started:
        raise SystemExit("engine serve: the HTTP server failed to start (is the port free?)")


def _close_http(server: uvicorn.Server, http_thread: threading.Thread) -> None:
    server.should_exit = True
    http_thread.join(timeout=GRACEFUL_HTTP_CLOSE_S + 5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="engine serve", description="OpenAI-compatible server")
    add_serve_arguments(parser)
    run_server(parser.parse_args(argv))


if __name__ == "__main__":
    main()
