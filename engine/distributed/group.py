"""One tensor-parallel group over torch.distributed, and the few collectives the engine uses.

Rank 0 is the driver: it lives in the engine's process, broadcasts each step's SchedulerOutput
and samples; ranks 1.. (engine/worker/tensor_parallel.py) run the same forward on their shards.
Invariant: every rank makes the same collective calls in the same order, which holds because
every rank runs the same code on the same SchedulerOutput (see ModelRunner.execute).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# gloo reduces these natively; a half-precision partial sum is reduced in fp32 and rounded once.
_REDUCED_AS_IS = (torch.float32, torch.float64)
# How long the driver waits for the other ranks to leave the group at shutdown (leave_in_turn).
LEAVE_TIMEOUT_S = 10.0
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    size: int

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (the partial outputs of a row-parallel projection)."""
        if x.dtype in _REDUCED_AS_IS:
            dist.all_reduce(x)
            return x
        wide = x.float()
        dist.all_reduce(wide)
        return x.copy_(wide)

    def gather_columns(self, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """[T, sizes[rank]] on each rank -> [T, sum(sizes)] on every rank, rank order (the
        vocabulary-parallel LM head's logits).  Ranks' parts may differ by a column; gloo gathers
        equal shapes, so parts are padded to the widest and trimmed."""
        widest = max(sizes)
        padded = x if x.shape[1] == widest else torch.nn.functional.pad(x, (0, widest - x.shape[1]))
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:, :size] for part, size in zip(parts, sizes)], dim=1)

    def broadcast_object(self, value: Any = None) -> Any:
        """The driver's `value` on every rank (pickled: a SchedulerOutput, a stop signal)."""
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The driver's tensor into `tensor` on every rank, in place (sampled token ids)."""
        dist.broadcast(tensor, src=0)
        return tensor

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank (pickled: a load error or None)."""
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        dist.barrier()

    def leave_in_turn(self, timeout_s: float = LEAVE_TIMEOUT_S) -> None:
        """Leave the group once every rank has the STOP (after a barrier), one side at a time:
        ranks > 0 tear their end down first and then mark the store; rank 0 waits for every mark
        (at most timeout_s) and then tears down its own.  Torn down on both sides at once, gloo's
        teardown raced: under torchrun, in a loaded test suite, rank 1 aborted ("terminate
        called without an active exception") and rank 0 hung in its own teardown."""
        # Held here: destroying the group drops its reference, and the marks outlive the group.
        store = dist.distributed_c10d._get_default_store()
        if self.rank != 0:
            leave_group()
            store.set(_left_key(self.rank), "1")
            return
        try:
            store.wait([_left_key(rank) for rank in range(1, self.size)], timedelta(seconds=timeout_s))
        except Exception as error:  # noqa: BLE001 - a rank that never marks: leave all the same
            logger.warning("tensor-parallel ranks did not leave within %.0f s (%s); leaving anyway", timeout_s, error)
        leave_group()


def _left_key(rank: int) -> str:
    return f"engine/tensor_parallel/left/{rank}"


def join_group(rank: int, size: int, init_method: str, device: str = "cpu",
               timeout_s: float = 300.0, local_rank: int | None = None) -> TensorParallelGroup:
    """Join (rendezvous at `init_method`: tcp://..., or env:// under torchrun) the process's one
    default group: gloo on CPU, NCCL on CUDA, where each rank takes its node's GPU number
    `local_rank` (default: `rank`, one node).  `timeout_s` bounds every collective, the first
    (all ranks loaded) included."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group: one "
                           "tensor-parallel engine per process")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":  # "cuda" in this process then means its own GPU
        torch.cuda.set_device((rank if local_rank is None else local_rank) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    return TensorParallelGroup(rank, size)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_loopback_address() -> str:
    """A tcp:// rendezvous address on a port free now (the driver's, for one node)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"
