"""Tensor parallelism on one node: the driver runner and the processes of the other ranks.

    engine process                           rank r process (r = 1 .. size - 1, spawned)
    ------------------------------------     ------------------------------------------
    scheduler -> SchedulerOutput
    TensorParallelRunner.execute:
      broadcast_object(output)        --->   output = broadcast_object()
      ModelRunner.execute (rank 0)           ModelRunner.execute (rank r)
        forward: all-reduce per layer <-->     the same collectives, the same order
        LM head: all-gather of logits <-->
        sample, broadcast token ids   --->     append the driver's tokens
    <- ModelRunnerOutput

The driver has ModelRunner's surface (the engine cannot tell it apart); the scheduler, the KV
block accounting and sampling stay in the engine process, as in vLLM.  Ranks rendezvous over
torch.distributed (gloo on CPU, NCCL on CUDA) at a loopback address; several nodes would start
the ranks with torchrun instead.  A rank that dies breaks the next collective: the driver's step
raises and the engine fails loudly rather than hanging.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.config import CacheConfig, PromptPruningConfig, RunnerConfig
from engine.distributed.group import free_loopback_address, join_group, leave_group
from engine.elastic.checkpoint import ElasticCheckpoint
from engine.elastic.tensor_parallel import check_splits
from engine.model.compute_plan import make_compute_plan
from engine.model.loader import ModelSource
from engine.model.sharding import TensorParallelShard
from engine.scheduler.output import ModelRunnerOutput, SchedulerOutput
from engine.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

STOP = "stop"  # what the driver broadcasts instead of a step when it shuts down
LOAD_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RankArgs:
    """What a rank process needs to build its ModelRunner (picklable)."""

    source: ModelSource
    dtype: str
    cache: CacheConfig
    runner: RunnerConfig
    weight_format: str
    pruning: PromptPruningConfig | None
    elastic: ElasticCheckpoint | None
    size: int
    init_method: str


class TensorParallelRunner:
    def __init__(self, source: ModelSource, dtype: str, cache: CacheConfig, runner: RunnerConfig, size: int,
                 weight_format: str = "auto", pruning: PromptPruningConfig | None = None,
                 elastic: ElasticCheckpoint | None = None) -> None:
        """`elastic`: every rank runs its share of the checkpoint's levels (engine/elastic/tensor_parallel.py)."""
        for rank in range(size):  # a size that does not split the model fails here, before any process
            TensorParallelShard.for_rank(source.arch, rank, size)
        if elastic is not None:
            check_splits(elastic.spec, size)
        runner = replace(runner, num_threads=runner.num_threads or _threads_per_rank(size))
        # The C++ kernels build (once per machine) here, before the ranks would race to.
        make_compute_plan(dtype, weight_format, runner.device)
        args = RankArgs(source, dtype, cache, runner, weight_format, pruning, elastic, size, free_loopback_address())
        context = multiprocessing.get_context("spawn")
        self._ready = context.Queue()
        self._processes = [context.Process(target=_run_rank, args=(rank, args, self._ready), daemon=True,
                                           name=f"tensor-parallel-rank-{rank}") for rank in range(1, size)]
        for process in self._processes:
            process.start()
        self._stopped, self._mid_step = False, False
        self.group = None  # set once this process has joined: only then is there a group to leave
        # Before multiprocessing's own exit hook (hooks run last registered first), which would
        # SIGTERM the ranks and wait for them.
        atexit.register(self.shutdown)
        try:
            self.group = join_group(0, size, args.init_method, runner.device, LOAD_TIMEOUT_S)
            self.local = ModelRunner(source, dtype, cache, runner, weight_format, elastic, pruning, tp=self.group)
            self._wait_for_ranks()
        except BaseException:
            self._stopped, self._mid_step = True, True  # no STOP: the ranks may be anywhere
            self._stop_processes()
            raise
        logger.info("tensor parallel: %d ranks over %s, %d threads each", size,
                    "gloo" if runner.device == "cpu" else "nccl", runner.num_threads)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._mid_step = True  # stays set if the step raises: the ranks may be inside a collective
        try:
            self.group.broadcast_object(scheduler_output)
            output = self.local.execute(scheduler_output)
        except RuntimeError as error:
            dead = [f"{p.name} (exit code {p.exitcode})" for p in self._processes if not p.is_alive()]
            if dead:
                raise RuntimeError(f"tensor-parallel step failed: {', '.join(dead)} died") from error
            raise
        self._mid_step = False
        return output

    def __getattr__(self, name: str) -> Any:  # the rest of ModelRunner's surface: rank 0's
        return getattr(self.local, name)

    def shutdown(self) -> None:
        """Stop the ranks (they leave their loop and exit) and leave the group."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        try:
            if not self._mid_step:  # else a rank waits in some collective, not for this broadcast
                self.group.broadcast_object(STOP)
        finally:
            self._stop_processes()

    def _stop_processes(self) -> None:
        for process in self._processes:
            process.join(timeout=10 if not self._mid_step else 0)
            if process.is_alive():
                process.kill()  # ranks ignore SIGTERM (_run_rank)
                process.join()
        if self.group is not None:
            leave_group()

    def _wait_for_ranks(self) -> None:
        """Until every rank has loaded its shard; a rank that failed is this error, not a hang."""
        pending = {process.name for process in self._processes}
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while pending:
            dead = [p for p in self._processes if p.name in pending and not p.is_alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].exitcode} while loading")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel ranks did not load within {LOAD_TIMEOUT_S:g} s: {sorted(pending)}")
            try:
                name, error = self._ready.get(timeout=0.5)
            except Exception:  # queue.Empty: look at the processes again
                continue
            if error is not None:
                raise RuntimeError(f"{name} failed to load: {error}")
            pending.discard(name)


def _threads_per_rank(size: int) -> int:
    """The cores split between the ranks: more threads than cores would make them fight."""
    return max(1, (os.cpu_count() or 1) // size)


def _run_rank(rank: int, args: RankArgs, ready: Any) -> None:
    """A rank process: load the shard, report, then run every step the driver broadcasts."""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s %(asctime)s rank {rank} %(name)s: %(message)s")
    # The driver stops this rank.  A signal sent to the whole process group (a terminal's Ctrl-C,
    # `timeout`, systemd) must let the driver drain first; if the driver dies, the next
    # collective fails and this process exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    name = multiprocessing.current_process().name
    try:
        group = join_group(rank, args.size, args.init_method, args.runner.device, LOAD_TIMEOUT_S)
        runner = ModelRunner(args.source, args.dtype, args.cache, args.runner, args.weight_format, args.elastic,
                             args.pruning, tp=group)
    except Exception as error:  # noqa: BLE001 - reported to the driver, which raises it
        ready.put((name, f"{type(error).__name__}: {error}"))
        raise
    ready.put((name, None))
    with torch.inference_mode():
        while not isinstance(step := group.broadcast_object(), str):  # STOP
            runner.execute(step)
    leave_group()
