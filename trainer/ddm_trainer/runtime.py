"""Where and how a stage runs: device, distributed (torchrun) setup, seeding, determinism, autocast."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, ContextManager

import numpy as np
import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks cuda:<local_rank> when a GPU is visible, else cpu."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but no CUDA GPU is visible")
        return torch.device(device if ":" in device else f"cuda:{local_rank}")
    raise ConfigError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")


def setup_runtime(device: str = "auto", deterministic: bool = False, threads: int | None = None) -> Runtime:
    """Read torchrun's WORLD_SIZE/RANK/LOCAL_RANK; init the process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if threads:
        torch.set_num_threads(threads)
    set_determinism(deterministic)
    if world_size > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
    return Runtime(device=dev, rank=rank, world_size=world_size, local_rank=local_rank)


def set_determinism(on: bool) -> None:
    """Bitwise-reproducible kernels (needed for exact resume tests); cuBLAS needs its workspace variable set."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def rank_seed(seed: int, rt: Runtime) -> int:
    """Distinct, reproducible seed per rank (DiT's convention)."""
    return seed * rt.world_size + rt.rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state: torch CPU, CUDA (all devices), numpy, python."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def host_byte_tensor(state: torch.Tensor) -> torch.Tensor:
    """An RNG state as torch wants it back: a CPU uint8 tensor, wherever ``map_location`` put it on loading."""
    return state.detach().to(device="cpu", dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``'s output, whatever device a checkpoint loader moved its tensors to. CUDA states are
    restored per device index; states of devices this process does not see are ignored (fewer GPUs than the
    writer's process saw: their generators are never used here)."""
    torch.set_rng_state(host_byte_tensor(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(host_byte_tensor(cuda_state), index)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def autocast(device: torch.device, precision: str) -> ContextManager[Any]:
    """bf16 autocast on CUDA or CPU; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ConfigError(f"unknown precision {precision!r} (choose from fp32, bf16)")


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        torch.distributed.barrier()


def shutdown(rt: Runtime) -> None:
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
