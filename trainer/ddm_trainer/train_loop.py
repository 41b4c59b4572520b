"""A generic checkpointed training loop with exact resume: experts (flow loss), router (cross-entropy), distillation.

``Trainer(model, loss_fn, stream, store, stage_dir, cfg, reporter).fit()`` runs to ``cfg.steps``:
AdamW (fused on CUDA), EMA initialised by copy, bf16 autocast, regional torch.compile (by default on CUDA), grad
clipping, DDP under torchrun. It resumes from the newest committed checkpoint that verifies, checkpoints every
``cfg.ckpt_every`` steps in the background (training waits only for the device-to-host copy) and on SIGTERM
(synchronously, within one optimizer step on every rank; then raises PreemptedError), and commits final weights
(model + EMA + config) at the end.

Device independence: checkpoints load on the CPU; modules and the optimizer copy their state to their own
device, RNG states go back as CPU byte tensors, so a checkpoint written on any device resumes on any device.

Exact resume: model, EMA, optimizer, step, loss history, the stream's ``state_dict()``, the loss generator and all
global RNG states are saved, so N steps + kill + resume + N steps equals 2N steps bitwise (with cfg.deterministic).

The stream is anything iterable that yields batches and has ``state_dict()`` / ``load_state_dict(d)`` describing
the batches already consumed (``ddm_trainer.data`` streams do). Tensors in a batch (dict/list/tuple) are moved to
the device before ``loss_fn(model, batch, generator)`` is called; the generator is on the training device.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from . import checkpoint as ckpt
from . import layout
from .configs.expert import TrainerConfig
from .errors import NonFiniteLossError, PreemptedError
from .progress import Reporter, preempt_requested
from .runtime import (Runtime, autocast, barrier, host_byte_tensor, rank_seed, rng_state, seed_everything,
                      set_rng_state, setup_runtime)
from .store import Store

__all__ = ["Trainer", "TrainerConfig", "LossFn", "Stream", "move_to", "compile_model", "split_batch"]

LossFn = Callable[[nn.Module, Any, torch.Generator], torch.Tensor]


class Stream(Protocol):
    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu" and not batch.is_pinned():
            # a copy from pageable memory waits for the device's queue to drain: the host could not run ahead
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):  # e.g. data.ImageBatch
        return dataclasses.replace(batch, **{f.name: move_to(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def split_batch(batch: Any, size: int) -> list[Any]:
    """``batch`` cut along its first dimension into micro-batches of ``size`` samples (the last may be smaller):
    tensors are sliced (views), dicts, lists/tuples of tensors and dataclasses (data.ImageBatch) recursively, and
    per-sample lists (an ImageBatch's keys) alongside."""
    n = _batch_len(batch)
    if n is None or size >= n:
        return [batch]
    return [_slice(batch, lo, min(lo + size, n), n) for lo in range(0, n, size)]


def _batch_len(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items: Any = ()
    if isinstance(batch, dict):
        items = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        items = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    for v in items:
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
        found = _batch_len(v) if not isinstance(v, (str, bytes)) and isinstance(v, (dict, tuple)) else None
        if found is not None:
            return found
    return None


def _slice(batch: Any, lo: int, hi: int, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return {k: _slice(v, lo, hi, n) for k, v in batch.items()}
    if isinstance(batch, list):
        return batch[lo:hi] if len(batch) == n else [_slice(v, lo, hi, n) for v in batch]
    if isinstance(batch, tuple):
        return type(batch)(_slice(v, lo, hi, n) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: _slice(getattr(batch, f.name), lo, hi, n)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


class Trainer:
    def __init__(self, model: nn.Module, loss_fn: LossFn, stream: Stream, store: Store, stage_dir: str,
                 cfg: TrainerConfig, reporter: Reporter | None = None, *, seed: int = 0,
                 runtime: Runtime | None = None, stage_config: dict[str, Any] | None = None,
                 model_spec: dict[str, Any] | None = None):
        """``stage_config`` and ``model_spec`` are written into the final weights' config.json so a consumer can
        rebuild the model (e.g. ``{"arch": "dit", "preset": "DiT-S/2", "image_size": 32, ...}``)."""
        self.cfg = cfg
        self.rt = runtime or setup_runtime("auto", deterministic=cfg.deterministic)
        self.store, self.stage_dir, self.reporter = store, stage_dir, reporter
        self.loss_fn, self.stream = loss_fn, stream
        self.stage_config, self.model_spec = stage_config or {}, model_spec or {}
        self.seed = rank_seed(seed, self.rt)
        seed_everything(self.seed)
        self.model = model.to(self.rt.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.generator = torch.Generator(device=self.rt.device).manual_seed(self.seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                           fused=self.rt.device.type == "cuda")
        self.train_model: nn.Module = self.model
        if self.rt.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self._ddp = self.train_model if self.rt.distributed else None  # for no_sync() while accumulating
        # Memory: micro-batches of the per-process batch, and block-wise activation checkpointing. Unset, both
        # are chosen on the first step from what fits (_fit_first_step); the choice goes into the final config.
        self.micro_batch = cfg.micro_batch_size or cfg.batch_size
        self._fit_memory = cfg.micro_batch_size is None or cfg.activation_checkpointing is None
        self._set_activation_checkpointing(bool(cfg.activation_checkpointing))
        if cfg.residual_precision == "bf16" and cfg.precision == "bf16":
            self.model.residual_dtype = torch.bfloat16  # read by the model's forward (models.dit.run_blocks)
        self.compiled = cfg.compile if cfg.compile is not None else self.rt.device.type == "cuda"
        # CUDA graphs (reduce-overhead) exist only on CUDA; elsewhere that mode compiles as the default does
        self.cudagraphs = self.compiled and cfg.compile_mode == "reduce-overhead" and self.rt.device.type == "cuda"
        if self.compiled:
            self.train_model = compile_model(self.train_model, self.model, cfg.compile_mode,
                                             coordinate_descent=cfg.coordinate_descent_tuning)
        self.writer = ckpt.CheckpointWriter(store, stage_dir, cfg.keep_checkpoints, self._committed)
        # Preemption votes travel over a CPU (gloo) group: agreeing on a stop costs no device sync per step.
        self._vote_group = torch.distributed.new_group(backend="gloo") if self.rt.distributed else None
        self._vote: tuple[torch.Tensor, Any] | None = None
        self.step = 0
        self.losses: list[float] = []  # one per step, rank-0 view (mean over ranks)
        self.last_grad_norm = 0.0

    # -- state ---------------------------------------------------------------------------------------------------
    def _local_state(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "rng": rng_state(), "generator": self.generator.get_state()}

    def state_dict(self) -> dict[str, Any]:
        local = self._local_state()
        per_rank = [local]
        if self.rt.distributed:
            per_rank = [None] * self.rt.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(per_rank, local)
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "losses": list(self.losses),
            "per_rank": per_rank,
            "world_size": self.rt.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        per_rank = state["per_rank"]
        local = per_rank[self.rt.rank] if self.rt.rank < len(per_rank) else per_rank[0]
        self.stream.load_state_dict(local["stream"])
        set_rng_state(local["rng"])
        self.generator.set_state(host_byte_tensor(local["generator"]))

    def save(self, blocking: bool = True) -> str:
        """Checkpoint the current step; ``blocking=False`` returns once the state is copied to host memory and
        commits it in the background (``self.writer.wait()`` joins it). Every rank must call it (collective)."""
        state = self.state_dict()  # every rank joins the gather
        prefix = layout.checkpoint(self.stage_dir, self.step)
        if self.rt.is_main:
            config = {"trainer": self.cfg.model_dump(mode="json"), "stage": self.stage_config, "model": self.model_spec}
            self.writer.submit(self.step, state, config, blocking=blocking)
        if blocking:
            barrier(self.rt)
        return prefix

    def _committed(self, step: int, prefix: str, timing: dict[str, float]) -> None:
        if self.reporter:
            self.reporter.checkpoint(step, self.store.url(prefix), **timing)

    def resume(self) -> bool:
        start = time.perf_counter()
        found = ckpt.load_latest_checkpoint(self.store, self.stage_dir)
        if found is None:
            return False
        prefix, state = found
        self.load_state_dict(state)
        if self.reporter:
            self.reporter.event("resumed", step=self.step, checkpoint=self.store.url(prefix),
                                seconds=time.perf_counter() - start)
        return True

    # -- loop ----------------------------------------------------------------------------------------------------
    def _lr(self, step: int) -> float:
        if self.cfg.warmup_steps <= 0:
            return self.cfg.lr
        return self.cfg.lr * min(1.0, (step + 1) / self.cfg.warmup_steps)

    def ema_decay_at(self, step: int) -> float:
        """The EMA's decay at the update that follows optimizer step ``step`` (0-based): ``ema_decay``, warmed up as
        (1 + step) / (10 + step).

        Without the warm-up an EMA of decay d keeps d^s of the random initialisation after s steps: 0.999^600 = 55%
        of it in a 600-step run, whose samples are then noise whatever the model learnt."""
        return min(self.cfg.ema_decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema_params = list(self.ema.parameters())
        params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - self.ema_decay_at(self.step))
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    def _preempt_agreed(self) -> bool:
        """SIGTERM seen. Under DDP every rank must stop at the same step (the checkpoint is collective): each step
        starts a MAX all-reduce of this rank's flag on the CPU group and reads the one started a step earlier, so
        every rank sees the same answer at the same step, a signal on any rank stops all of them within one
        optimizer step, and no step waits on the device."""
        if not self.rt.distributed:
            return preempt_requested()
        agreed = False
        if self._vote is not None:
            flag, work = self._vote
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([1 if preempt_requested() else 0], dtype=torch.int32)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._vote_group,
                                            async_op=True)
        self._vote = (flag, work)
        return agreed

    def _finish_votes(self) -> None:
        if self._vote is not None:
            self._vote[1].wait()  # every rank started the same number of votes: none is left hanging
            self._vote = None

    def _flush(self, pending: list[torch.Tensor], first_step: int) -> None:
        """Sync the pending per-step losses (one device sync per call), check finiteness, append to history."""
        if not pending:
            return
        values = torch.stack(pending)  # (n, 2): loss, grad norm
        if self.rt.distributed:
            torch.distributed.all_reduce(values)
            values /= self.rt.world_size
        host = values.tolist()
        for i, (loss, grad_norm) in enumerate(host):
            what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
            if not math.isfinite(value):
                raise NonFiniteLossError(f"{what} is {value} at step {first_step + i + 1} of {self.stage_dir}; "
                                         f"no checkpoint written for this state (try a lower train.lr)")
        self.losses.extend(loss for loss, _ in host)
        self.last_grad_norm = host[-1][1]
        pending.clear()

    def fit(self) -> list[float]:
        """Train (resuming if possible) to cfg.steps, commit the final weights; returns the per-step loss curve."""
        if ckpt.has_final(self.store, self.stage_dir):
            return self._load_finished()
        self.resume()
        try:
            self._run_steps()
            self.writer.wait()  # the last background checkpoint is committed (or its error raised) before final
        except BaseException:
            # A checkpoint still being written is valid whatever failed since: commit it before the error leaves,
            # so a retry resumes from it (its own error, if any, must not hide the one that stopped training).
            with contextlib.suppress(Exception):
                self.writer.wait()
            raise
        finally:
            if callable(close := getattr(self.stream, "close", None)):
                close()  # a prefetching stream's thread must not outlive the loop that reads it
        self._save_final()
        return self.losses

    def _run_steps(self) -> None:
        """Steps from the current one to cfg.steps, checkpointing on the way and on preemption."""
        it = iter(self.stream)
        pending: list[torch.Tensor] = []
        window_start, window_steps = time.perf_counter(), 0
        images_per_step = self.cfg.batch_size * self.rt.world_size
        self.model.train()
        first_step = self.step
        while self.step < self.cfg.steps:
            if self._preempt_agreed():
                self._flush(pending, self.step - len(pending))
                prefix = self.save(blocking=True)  # waits for a background write in flight, then commits this one
                raise PreemptedError(f"preempted (SIGTERM) at step {self.step}; checkpoint saved at "
                                     f"{self.store.url(prefix)}")
            try:
                batch = next(it)
            except StopIteration:  # a finite stream: start the next epoch
                it = iter(self.stream)
                batch = next(it)
            batch = move_to(batch, self.rt.device)
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(self.step)
            if self.step == first_step and self._fit_memory and self.rt.device.type == "cuda":
                loss = self._fit_first_step(batch)
            else:
                loss = self._forward_backward(batch)
            # Always measured (max_norm=inf: no clipping): a non-finite norm means the update corrupts the weights.
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or math.inf)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._update_ema()
            pending.append(torch.stack([loss.detach().float(), grad_norm.detach().float()]))  # (2,)
            self.step += 1
            window_steps += 1
            if self.step == first_step + 1 and self.compiled:
                self._report_compile(window_start)
                window_start, window_steps = time.perf_counter(), 0  # throughput lines exclude compilation
            at_ckpt = self.step % self.cfg.ckpt_every == 0 and self.step < self.cfg.steps
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps or at_ckpt:
                self._flush(pending, self.step - len(pending))
                now = time.perf_counter()
                if self.reporter and self.rt.is_main:
                    self.reporter.update(self.step, loss=self.losses[-1],
                                         images_per_s=images_per_step * window_steps / max(now - window_start, 1e-9),
                                         lr=self._lr(self.step - 1), grad_norm=self.last_grad_norm)
                window_start, window_steps = now, 0
            if at_ckpt:
                self.save(blocking=False)
        self._finish_votes()
        self._flush(pending, self.step - len(pending))

    def _forward_backward(self, batch: Any) -> torch.Tensor:
        """Loss of the whole batch with its gradients in .grad: one forward/backward per micro-batch, each loss
        weighted by its share of the batch (the mean over the batch, as one pass would give); under DDP gradients
        are all-reduced only with the last micro-batch."""
        if self.cudagraphs:  # a new iteration: the graphs may reuse the last one's outputs (all consumed by now)
            torch.compiler.cudagraph_mark_step_begin()
        chunks = split_batch(batch, self.micro_batch)
        if len(chunks) == 1:
            with autocast(self.rt.device, self.cfg.precision):
                loss = self.loss_fn(self.train_model, batch, self.generator)
            loss.backward()
            return loss
        total = _batch_len(batch) or 1
        acc = torch.zeros((), device=self.rt.device)
        for i, chunk in enumerate(chunks):
            sync = self._ddp is None or i == len(chunks) - 1
            with (contextlib.nullcontext() if sync else self._ddp.no_sync()):  # type: ignore[union-attr]
                with autocast(self.rt.device, self.cfg.precision):
                    loss = self.loss_fn(self.train_model, chunk, self.generator) * ((_batch_len(chunk) or 1) / total)
                loss.backward()
            acc += loss.detach().float()
        return acc

    def _fit_first_step(self, batch: Any) -> torch.Tensor:
        """The first step, retried on a CUDA out-of-memory error: activation checkpointing first (when not set in
        the config), then half the micro-batch, down to 1. The generator is rewound for each try, so the step that
        succeeds draws what it would have drawn first time. The choice is reported and kept in the config."""
        gen_state = self.generator.get_state()
        while True:
            try:
                loss = self._forward_backward(batch)
                break
            except torch.cuda.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                if self.cfg.activation_checkpointing is None and not self.activation_checkpointing:
                    self._set_activation_checkpointing(True)
                elif self.cfg.micro_batch_size is None and self.micro_batch > 1:
                    self.micro_batch = _largest_divisor_at_most(self.cfg.batch_size, self.micro_batch // 2)
                else:
                    raise
                self.generator.set_state(gen_state)
        self.cfg = self.cfg.model_copy(update={"micro_batch_size": self.micro_batch,
                                               "activation_checkpointing": self.activation_checkpointing})
        if self.reporter and self.rt.is_main:
            self.reporter.event("memory", step=self.step, micro_batch=self.micro_batch,
                                accumulation=self.cfg.batch_size // self.micro_batch,
                                activation_checkpointing=self.activation_checkpointing)
        return loss

    def _set_activation_checkpointing(self, on: bool) -> None:
        self.activation_checkpointing = on
        self.model.activation_checkpointing = on  # read by the model's forward (models.dit.run_blocks)

    def _report_compile(self, started: float) -> None:
        """The first step of a compiled model includes compiling it: say how long it took (the device's queue is
        drained first, so the figure is wall time, not launch time)."""
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        if self.reporter and self.rt.is_main:
            self.reporter.event("compiled", step=self.step, compile_s=time.perf_counter() - started)

    def _save_final(self) -> None:
        if self.rt.is_main:
            config = {"trainer": self.cfg.model_dump(mode="json"), "stage": self.stage_config,
                      "model": self.model_spec, "step": self.step}
            extra = {"losses.json": _json_bytes(self.losses)}
            ckpt.save_final(self.store, self.stage_dir, _fp32(self.model.state_dict()), _fp32(self.ema.state_dict()),
                            config, extra)
        barrier(self.rt)

    def _load_finished(self) -> list[float]:
        import json

        final = ckpt.load_final(self.store, self.stage_dir, map_location=self.rt.device)
        self.model.load_state_dict(final.model)
        self.ema.load_state_dict(final.ema)
        self.step = int(final.config.get("step") or self.cfg.steps)
        self.losses = json.loads(self.store.read_committed(layout.final(self.stage_dir), "losses.json"))
        return self.losses


def compile_model(train_model: nn.Module, model: nn.Module, mode: str = "default",
                  coordinate_descent: bool = False) -> nn.Module:
    """torch.compile: per block when the model has a ``blocks`` list (DiT, routers) — one compiled block serves
    every identical block, so compiling XL/2 takes seconds, at the whole-model throughput (measured on H200).
    ``coordinate_descent``: inductor's block-size search for its own kernels, read when the first step compiles
    (a process-wide inductor setting: a stage is one process)."""
    options = {} if mode == "default" else {"mode": mode}
    if coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
        for block in blocks:
            block.compile(**options)
        return train_model
    return torch.compile(train_model, **options)  # type: ignore[return-value]


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).detach().cpu() for k, v in state.items()}


def _json_bytes(obj: Any) -> bytes:
    import json

    return json.dumps(obj).encode()


def _largest_divisor_at_most(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most (>= 1): micro-batches of equal size."""
    return max(d for d in range(1, max(at_most, 1) + 1) if n % d == 0)
