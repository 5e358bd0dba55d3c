"""`engine serve --replicas N`: start Ray on this machine, Serve's HTTP proxy on --host/--port,
and the application (engine/replicas/app.py); serve until SIGTERM or SIGINT, then tear down.

Every other flag goes to each replica as its own `engine serve` flags.  On a cluster, start Ray
first (`ray start --head`, `ray start --address ...` on the others) and set RAY_ADDRESS.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import ray
from ray import serve

from engine.api.server import checked_server_config
from engine.config import ConfigError
from engine.replicas.app import build
from engine.replicas.metrics_board import BOARD_NAME, BOARD_NAMESPACE

logger = logging.getLogger(__name__)

APP_NAME = "elastic-engine"
# Flags of the launcher itself, not of a replica's `engine serve` (with their value counts).
LAUNCHER_FLAGS = {"--replicas": 1, "--max-replicas": 1, "--host": 1, "--port": 1}


def serve_replicas(args: argparse.Namespace, argv: list[str] | None = None) -> None:
    """`args`: `engine serve`'s, with --replicas; `argv`: its command line (default: this process's,
    after `serve`), from which each replica gets every flag but the launcher's."""
    try:
        checked_server_config(args)  # a bad flag fails here, not in every replica
        if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
            raise ConfigError(f"replicas must be at least 1 and max_replicas at least replicas, got "
                              f"{args.replicas} and {args.max_replicas}")
    except (ConfigError, ValueError, OSError) as e:
        raise SystemExit(f"engine serve: {e}") from None
    argv = sys.argv[sys.argv.index("serve") + 1:] if argv is None and "serve" in sys.argv else (argv or [])
    # RAY_ADDRESS (ray's own variable) joins a running cluster; without it Ray starts on this machine.
    ray.init(include_dashboard=False, namespace=BOARD_NAMESPACE)
    serve.start(http_options={"host": args.host, "port": args.port})
    application = build({"replicas": args.replicas, "max_replicas": args.max_replicas,
                         "serve_args": replica_argv(argv)})
    serve.run(application, name=APP_NAME, route_prefix="/")
    logger.info("Serving %d replicas behind one router on http://%s:%d", args.replicas, args.host, args.port)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    logger.info("stopping the replicas")
    serve.shutdown()
    _remove_metrics_board()
    ray.shutdown()


def replica_argv(argv: list[str]) -> list[str]:
    """`engine serve`'s flags without the launcher's own (`--flag value` and `--flag=value`)."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCHER_FLAGS:
            skip = 0 if "=" in arg else LAUNCHER_FLAGS[name]
            continue
        kept.append(arg)
    return kept


def _remove_metrics_board() -> None:
    try:
        ray.kill(ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE))
    except ValueError:
        pass  # never created
