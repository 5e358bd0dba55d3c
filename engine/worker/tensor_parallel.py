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
torch.distributed (gloo on CPU, NCCL on CUDA).  On one node the driver spawns them and they meet
at a loopback address.  On several, torchrun starts every rank's process with the same command
(`torchrun ... -m engine.cli serve --tensor-parallel-size N`): rank 0 becomes the engine and the
server, the others `run_launched_rank` (the CLI sends them there); they meet at torchrun's env://
address and take their model, levels and settings from rank 0's broadcast `RankArgs`, so no node
rebuilds or re-reads anything rank 0 decided.  A rank that dies breaks the next collective: the
driver's step raises and the engine fails loudly rather than hanging.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from engine.config import CacheConfig, ConfigError, PromptPruningConfig, RunnerConfig
from engine.distributed.group import TensorParallelGroup, free_loopback_address, join_group, leave_group
from engine.distributed.launch import LaunchedRank
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

    def load(self, group: TensorParallelGroup, num_threads: int | None = None) -> ModelRunner:
        """This rank's ModelRunner (its shard, per `group`), on `num_threads` if given."""
        runner = self.runner if num_threads is None else replace(self.runner, num_threads=num_threads)
        return ModelRunner(self.source, self.dtype, self.cache, runner, self.weight_format, self.elastic,
                           self.pruning, tp=group)


class TensorParallelRunner:
    def __init__(self, source: ModelSource, dtype: str, cache: CacheConfig, runner: RunnerConfig, size: int,
                 weight_format: str = "auto", pruning: PromptPruningConfig | None = None,
                 elastic: ElasticCheckpoint | None = None) -> None:
        """`elastic`: every rank runs its share of the checkpoint's levels (engine/elastic/tensor_parallel.py)."""
        for rank in range(size):  # a size that does not split the model fails here, before any process
            TensorParallelShard.for_rank(source.arch, rank, size)
        if elastic is not None:
            check_splits(elastic.spec, size)
        launched = LaunchedRank.from_env()
        if launched is not None:
            launched.check_size(size)
            if launched.rank != 0:
                raise ConfigError(f"the engine runs on rank 0 of a torchrun job, not on rank {launched.rank}")
        runner = replace(runner, num_threads=runner.num_threads or _threads_per_rank(launched, size))
        # The C++ kernels build (once per machine) here, before the ranks would race to.
        make_compute_plan(dtype, weight_format, runner.device)
        args = RankArgs(source, dtype, cache, runner, weight_format, pruning, elastic, size,
                        "env://" if launched else free_loopback_address())
        self._processes = [] if launched else self._spawn_ranks(args)
        self._stopped, self._mid_step = False, False
        self.group = None  # set once this process has joined: only then is there a group to leave
        # Before multiprocessing's own exit hook (hooks run last registered first), which would
        # SIGTERM the ranks and wait for them.
        atexit.register(self.shutdown)
        try:
            self.group = join_group(0, size, args.init_method, runner.device, LOAD_TIMEOUT_S,
                                    launched.local_rank if launched else None)
            if launched:
                self.group.broadcast_object(args)
                self.local = _load_together(self.group, partial(args.load, self.group))
            else:
                self.local = args.load(self.group)
                self._wait_for_ranks()
        except BaseException:
            self._stopped, self._mid_step = True, True  # no STOP: the ranks may be anywhere
            self._stop_processes()
            raise
        logger.info("tensor parallel: %d ranks over %s, %d threads each", size,
                    "gloo" if runner.device == "cpu" else "nccl", runner.num_threads)

    def _spawn_ranks(self, args: RankArgs) -> list[multiprocessing.Process]:
        context = multiprocessing.get_context("spawn")
        self._ready = context.Queue()
        processes = [context.Process(target=_run_rank, args=(rank, args, self._ready), daemon=True,
                                     name=f"tensor-parallel-rank-{rank}") for rank in range(1, args.size)]
        for process in processes:
            process.start()
        return processes

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
                self.group.barrier()  # see _run_steps
                self.group.leave_in_turn()
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


def _threads_per_rank(launched: LaunchedRank | None, size: int) -> int:
    """This node's cores split between its ranks: more threads than cores would make them fight."""
    return max(1, (os.cpu_count() or 1) // (launched.local_size if launched else size))


def _load_together(group: TensorParallelGroup, load: Callable[[], ModelRunner]) -> ModelRunner:
    """Load this rank's runner, then learn whether every rank did (an all-gather of the errors):
    each rank raises the first failure, so no rank waits in a collective for one that is gone."""
    try:
        runner, error = load(), None
    except Exception as failure:  # noqa: BLE001 - shared with the other ranks, then raised
        runner, error = None, f"{type(failure).__name__}: {failure}"
    for rank, rank_error in enumerate(group.all_gather_object(error)):
        if rank_error is not None:
            raise RuntimeError(f"tensor-parallel rank {rank} failed to load: {rank_error}")
    return runner


def _run_steps(group: TensorParallelGroup, runner: ModelRunner) -> None:
    """A rank's life after loading: every step the driver broadcasts, until it broadcasts STOP."""
    with torch.inference_mode():
        while not isinstance(step := group.broadcast_object(), str):  # STOP
            runner.execute(step)
    # Every rank has the STOP before any tears the group down: rank 0 returns from the broadcast
    # once it has sent, and destroying the group then cut a rank off mid-receive (gloo aborted it:
    # "terminate called without an active exception", seen under torchrun).  Then the ranks
    # leave one side at a time (TensorParallelGroup.leave_in_turn).
    group.barrier()
    group.leave_in_turn()


def run_launched_rank(launched: LaunchedRank, device: str) -> None:
    """Rank `launched.rank` (> 0) of a torchrun job: join, take rank 0's RankArgs, load this rank's
    shard of them and run the driver's steps until it stops (or dies, which fails a collective)."""
    logging.basicConfig(level=logging.INFO,
                        format=f"%(levelname)s %(asctime)s rank {launched.rank} %(name)s: %(message)s")
    group = join_group(launched.rank, launched.size, "env://", device, LOAD_TIMEOUT_S, launched.local_rank)
    args: RankArgs = group.broadcast_object()
    num_threads = _threads_per_rank(launched, args.size)  # this node's cores, not rank 0's
    runner = _load_together(group, partial(args.load, group, num_threads))
    logger.info("tensor parallel: rank %d of %d loaded, %d threads", launched.rank, launched.size, num_threads)
    _run_steps(group, runner)


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
        runner = args.load(group)
    except Exception as error:  # noqa: BLE001 - reported to the driver, which raises it
        ready.put((name, f"{type(error).__name__}: {error}"))
        raise
    ready.put((name, None))
    _run_steps(group, runner)
