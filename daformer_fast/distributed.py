"""Process group set-up for torchrun (single- or multi-node) and plain single-process runs.

torchrun exports RANK, WORLD_SIZE and LOCAL_RANK; without them the run is one process. NCCL on CUDA, gloo on
CPU. Each process drives one device: cuda:LOCAL_RANK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from daformer_fast.config import ConfigError

__all__ = ["Dist", "all_reduce_sum", "barrier", "init_distributed", "resolve_device", "shutdown"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """The torch device of a `train.device` / `--device` string, checked against this host.

    `auto` (or None) → cuda:LOCAL_RANK when CUDA is available, else cpu; a bare `cuda` → cuda:LOCAL_RANK (each
    torchrun process drives its own GPU). A malformed name, CUDA without CUDA, or a GPU index this host lacks is a
    ConfigError with a one-line message, so the CLIs report it without a traceback.
    """
    if name in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available here; use auto or cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} requested but this host has {torch.cuda.device_count()} GPU(s)")
    return device


def init_distributed(device_name: str) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A generous timeout: rank 0 may spend minutes generating data or evaluating while the others wait.
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0:
            kwargs.update(store=_attempt_store(restart, rank, world_size), rank=rank, world_size=world_size)
        dist.init_process_group(backend, timeout=timedelta(minutes=30), **kwargs)
    return Dist(rank, world_size, local_rank, device)


def _attempt_store(restart: int, rank: int, world_size: int) -> dist.Store:
    """The rendezvous store under a prefix of its own for torchrun restart `restart`.

    torchrun's agent keeps one store server for all attempts (`--max-restarts`), so the keys of the previous
    attempt's process group (gloo's peer addresses among them) are still there: a restarted rank would connect to a
    dead peer. A per-attempt prefix gives each attempt a clean namespace.
    """
    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=rank == 0 and not agent_serves,
        timeout=timedelta(minutes=30), multi_tenant=True,
    )  # fmt: skip
    return dist.PrefixStore(f"daformer_fast/attempt_{restart}", store)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
