"""Where torchrun (or another launcher that sets torch.distributed's env:// variables) put this
process.  Free of torch, so the CLI can ask before anything heavy loads."""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.config import ConfigError


@dataclass(frozen=True)
class LaunchedRank:
    """This process's place in a job that torchrun (or another launcher setting torch.distributed's
    env:// variables) started: one process per rank, on one node or several."""

    rank: int
    size: int
    local_rank: int  # on this node
    local_size: int  # ranks on this node

    @classmethod
    def from_env(cls) -> LaunchedRank | None:
        """None in a process no launcher started (then the engine spawns its ranks itself)."""
        if not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
            return None
        size = int(os.environ["WORLD_SIZE"])
        return cls(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
                   int(os.environ.get("LOCAL_WORLD_SIZE", size)))

    def check_size(self, tensor_parallel_size: int) -> None:
        """Raise ConfigError unless the job has exactly one process per tensor-parallel rank."""
        if self.size != tensor_parallel_size:
            raise ConfigError(f"torchrun started {self.size} ranks for --tensor-parallel-size "
                              f"{tensor_parallel_size}: they must be equal")
