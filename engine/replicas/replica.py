"""One engine replica on Ray Serve: a whole `engine serve` (its flags, its FastAPI app, its
engine loop on a thread of its own), called by the router with the HTTP request as an object.

Ray Serve restarts a replica whose actor dies or whose `check_health` raises (the engine loop
died); requests it was serving end at the router with an OpenAI error body (engine/replicas/ingress.py).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from ray import serve

from engine.api.server import add_serve_arguments, build_server, checked_server_config
from engine.replicas.asgi_bridge import HTTPRequest, InProcessASGI, Message
from engine.replicas.metrics_board import POST_INTERVAL_S, metrics_board

logger = logging.getLogger(__name__)


# A stream's events within this long of each other travel to the router as one Ray message.  Each
# message costs a hop through the router and Serve's proxy (processes of their own); one per token
# per stream took ~half of this 2-core machine at 32 streams.  The first event goes at once.
STREAM_COALESCE_S = 0.05


@dataclass(frozen=True)
class RoutedRequest:
    """What the router hands a replica.  `prompt` is read by Ray's PrefixCacheAffinityRouter to
    route by prefix: the prompt, or the chat messages' text (never empty)."""

    http: HTTPRequest
    prompt: str


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="engine serve (replica)")
    add_serve_arguments(parser)
    return parser.parse_args(argv)


class EngineReplica:
    async def __init__(self, serve_argv: list[str], num_threads: int | None = None) -> None:  # type: ignore[misc]
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
        args = parse_serve_args(serve_argv)
        config = checked_server_config(args)
        config = replace(config, runner=replace(config.runner, num_threads=num_threads))
        # The engine loads and steps on one thread of its own, as `engine serve` does on its main
        # thread (see AsyncEngine.run_engine_loop: stepping from another thread ran slower).
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._loop_may_run = threading.Event()
        threading.Thread(target=self._engine_thread, args=(config, args, built), name="engine-loop",
                         daemon=True).start()
        self.llm_engine, self.engine, app = await asyncio.wrap_future(built)
        self.http = InProcessASGI(app)
        self.name = serve.get_replica_context().replica_id.unique_id
        # Ray Serve runs this constructor and every call on its one user-code event loop: the
        # app's lifespan binds the engine's results to it.
        await self.http.startup()
        self._loop_may_run.set()
        self._poster = asyncio.create_task(self._post_metrics())

    def _engine_thread(self, config, args, built: concurrent.futures.Future) -> None:
        try:
            parts = build_server(config, args, engine_on_own_thread=False)
        except BaseException as error:  # noqa: BLE001 - the constructor raises it
            built.set_exception(error)
            return
        built.set_result(parts)
        self._loop_may_run.wait()
        parts[1].run_engine_loop()  # until the app's lifespan shuts the engine down

    async def __call__(self, request: RoutedRequest) -> AsyncIterator[Message]:
        async for message in self.http.request(request.http, STREAM_COALESCE_S):
            yield message

    async def _post_metrics(self) -> None:
        board = metrics_board()
        while True:
            body = b"".join([m.get("body", b"") async for m in self.http.request(_GET_METRICS)])
            await board.post.remote(self.name, body.decode())
            await asyncio.sleep(POST_INTERVAL_S)

    async def replica_name(self) -> str:
        """This replica's Serve id (the `replica` label of its metrics at the router)."""
        return self.name

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if not self.engine.is_running:
            raise RuntimeError("the engine loop is not running")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's own load, for engine/replicas/autoscaling.py."""
        stats = self.llm_engine.stats
        return {"engine_running": float(stats.num_running), "engine_waiting": float(stats.num_waiting),
                "engine_kv_usage": float(stats.kv_cache_usage)}


_GET_METRICS = HTTPRequest("GET", "/metrics", b"", (), b"")
