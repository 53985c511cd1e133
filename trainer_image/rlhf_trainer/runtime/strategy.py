"""The one place that touches DeepSpeed and torch.distributed.

``Strategy(cfg).setup()`` joins the process group (torchrun env, or a single local process), picks
the device and seeds. ``prepare(model, lr, total_steps)`` returns an engine: a DeepSpeed engine, or
with ``deepspeed.enabled: false`` a :class:`TorchEngine` with the same surface
(``engine(...)``, ``.backward(loss)``, ``.step()``, ``.module``, ``.get_lr()``,
``.get_global_grad_norm()``, ``.skipped_steps``), so the stage loops never branch on the backend.
``deepspeed.enabled`` unset picks the engine (:func:`resolve_use_deepspeed`): plain torch for one process
without ZeRO partitioning (DeepSpeed only adds overhead there), DeepSpeed otherwise.

On a machine without CUDA, DeepSpeed runs with ``DS_ACCELERATOR=cpu`` and gloo; its first start
JIT-builds a small comm op (about 90 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import TrainerConfig
from . import rng, threads
from .failure import CheckpointError

ENGINE_TAG = "engine"  # DeepSpeed checkpoint tag inside a checkpoint directory


# --- pure builders -------------------------------------------------------------------------------

def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_use_deepspeed(cfg: TrainerConfig, world_size: int) -> bool:
    """``deepspeed.enabled`` when set; unset (auto): DeepSpeed only where it adds something - more than one
    process, ZeRO stage 2/3, offload, fp16 loss scaling or an ``extra`` DeepSpeed config. One process with
    ZeRO 0/1 runs the plain torch engine (measured on one H200: DeepSpeed halved its throughput)."""
    ds = cfg.deepspeed
    if ds.enabled is not None:
        return ds.enabled
    return (world_size > 1 or ds.zero_stage >= 2 or ds.offload_optimizer or ds.offload_params or ds.fp16
            or bool(ds.extra))


def uses_deepspeed_optimizer(cfg: TrainerConfig) -> bool:
    """ZeRO-Offload needs DeepSpeed's CPU Adam; otherwise torch's AdamW is used (no JIT build)."""
    return cfg.deepspeed.offload_optimizer


def deepspeed_config(cfg: TrainerConfig, world_size: int, lr: float) -> dict[str, Any]:
    """The DeepSpeed config of one trained model, from the trainer config (pure; the offload rules are
    config.validate's)."""
    ds, t = cfg.deepspeed, cfg.training
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        "fp16": {"enabled": ds.fp16, "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if uses_deepspeed_optimizer(cfg):
        out["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": t.weight_decay},
        }
        out["zero_force_ds_cpu_optimizer"] = True
    return _deep_merge(out, ds.extra)


def lr_multiplier(step: int, warmup: int, total: int, schedule: str) -> float:
    """LR factor of optimizer step ``step`` (0-based): linear warm-up to 1, then constant/linear/cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def param_groups(params, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases and norm scales); ``params``: a model or parameters."""
    decay, no_decay = [], []
    for p in params.parameters() if isinstance(params, torch.nn.Module) else params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- loading checkpoint files without running code -----------------------------------------------

_torch_load = torch.load


def load_tensors(path: str | Path, map_location=None, allowed: list[type] | tuple[type, ...] = ()) -> Any:
    """``torch.load`` that unpickles tensors, plain data and the ``allowed`` classes only (never code).

    A file holding anything else (e.g. a planted pickle whose payload would run on a plain
    ``torch.load``) is refused with a CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is mostly generic advice (including "retry with weights_only=False"); keep its finding.
        found = re.search(r"(?:Unsupported|Trying to load) [^\n]*", str(e))
        reason = found.group(0).split(" was not an allowed global", 1)[0] if found else str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint file {path} holds objects other than tensors and plain data ({reason}); "
                              "refusing to unpickle it: delete the checkpoint or restore it") from None


def deepspeed_state_classes() -> list[type]:
    """Plain data holders DeepSpeed pickles into its optimizer states besides tensors (no code runs on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load(allowed: list[type]) -> Iterator[None]:
    """Make every ``torch.load`` inside the block a :func:`load_tensors`.

    DeepSpeed's loaders call ``torch.load(weights_only=False)`` on several paths (checkpoint engine,
    universal checkpoints); replacing the function for the duration of ``load_checkpoint`` covers all."""

    def safe_load(f, map_location=None, *args, **kwargs):
        return load_tensors(f, map_location=map_location, allowed=allowed)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = _torch_load


# --- plain torch engine --------------------------------------------------------------------------

class TorchEngine:
    """DeepSpeed-engine surface over a plain torch model, optimizer and scheduler (DDP when distributed).

    As with DeepSpeed, ``backward`` and ``step`` are called for every micro batch; the optimizer
    steps on the last micro batch of each accumulation window.

    ``master``: (model parameter, fp32 master parameter) pairs when the model computes in bf16. The
    optimizer steps the fp32 masters and the model gets their bf16 rounding, so updates smaller than
    bf16's spacing (lr 2e-5 on a weight of 1.0 is 1/400 of it) accumulate instead of rounding away.
    A step whose gradient norm is NaN/Inf is skipped like DeepSpeed's overflow handling: no update, no
    scheduler step, gradients cleared, ``skipped_steps`` counted.
    """

    def __init__(self, module, optimizer, lr_scheduler, grad_accum: int, max_grad_norm: float, ddp=None,
                 master: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] | None = None):
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.gradient_accumulation_steps = grad_accum
        self.max_grad_norm = max_grad_norm
        self._ddp = ddp
        self.master = master or []
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0
        self._grad_norm: float | None = None

    def __call__(self, *args, **kwargs):
        return (self._ddp or self.module)(*args, **kwargs)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.gradient_accumulation_steps
        if self._ddp is not None and not self.is_gradient_accumulation_boundary():
            with self._ddp.no_sync():
                scaled.backward()
        else:
            scaled.backward()

    def _stepped_params(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates, with this window's gradients (fp32 masters get them cast)."""
        if not self.master:
            return [p for p in self.module.parameters() if p.grad is not None]
        for p, m in self.master:
            m.grad = None if p.grad is None else p.grad.detach().to(m.dtype)
        return [m for _, m in self.master if m.grad is not None]

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.module.parameters():
            p.grad = None

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            params = self._stepped_params()
            grads = [p.grad for p in params]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            self._grad_norm = float(norm)
            if math.isfinite(self._grad_norm):
                if self.max_grad_norm > 0 and grads:
                    torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                with torch.no_grad():
                    for p, m in self.master:
                        p.copy_(m)
            else:  # never apply NaN/Inf: skip the update as DeepSpeed does (StepGuard counts and reports it)
                self.skipped_steps += 1
                self._grad_norm = float("inf")
            self._zero_grad()
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "micro_steps": self.micro_steps,
            "global_steps": self.global_steps,
            "skipped_steps": self.skipped_steps,
            **({"master": [m.detach() for _, m in self.master]} if self.master else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_steps = state["micro_steps"]
        self.global_steps = state["global_steps"]
        self.skipped_steps = state.get("skipped_steps", 0)
        saved = state.get("master")
        with torch.no_grad():
            for i, (p, m) in enumerate(self.master):  # a checkpoint without masters: start them from the weights
                m.copy_(saved[i] if saved is not None else p.float())


# --- strategy ------------------------------------------------------------------------------------

class Strategy:
    """Process group, device, engines and collective helpers of one run."""

    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.use_deepspeed = resolve_use_deepspeed(cfg, self.world_size)
        self.device = torch.device("cpu")
        if self.use_deepspeed:
            deepspeed_config(cfg, self.world_size, cfg.training.learning_rate)  # fail on bad config early

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def setup(self) -> Strategy:
        """Join the process group (if any), pick the device, set threads and seeds."""
        threads.apply(self.cfg.training.threads)  # the pod's CPU request when training.threads is 0
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            # cuDNN's SDPA backward returns NaN dQ on H100/H200 (torch >= 2.11) when a mask is passed, the
            # sequence length is 64 mod 128 and a query row's logsumexp is very negative (pytorch#196678):
            # every PPO step of a 192 + 128 token rollout was skipped. Flash/mem-efficient kernels take over.
            torch.backends.cuda.enable_cudnn_sdp(False)
        backend = "nccl" if cuda else "gloo"
        if self.use_deepspeed:
            if not cuda:
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            # DeepSpeed always wants a process group, also for a single local process.
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
                os.environ.setdefault(key, value)
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            import deepspeed

            if not self.distributed:
                deepspeed.init_distributed(dist_backend=backend)
        elif self.world_size > 1 and not self.distributed:
            torch.distributed.init_process_group(backend=backend)
        rng.set_seed(self.cfg.training.seed)
        return self

    def close(self) -> None:
        if self.distributed:
            torch.distributed.destroy_process_group()

    # --- engines ---------------------------------------------------------------------------------

    def _scheduler_fn(self, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
        t = self.cfg.training

        def build(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_multiplier(s, t.warmup_steps, total_steps, t.lr_schedule)
            )

        return build

    def _optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        # fused AdamW (CUDA and CPU kernels): the per-parameter loop costs ~8% of a small model's step
        kwargs = {"fused": True} if self.device.type in ("cuda", "cpu") else {}
        return torch.optim.AdamW(param_groups(params, self.cfg.training.weight_decay), lr=lr, **kwargs)

    def prepare(self, model: torch.nn.Module, lr: float, total_steps: int):
        """Wrap a trainable model with optimizer (AdamW) and LR schedule; returns the engine."""
        t = self.cfg.training
        if self.use_deepspeed:
            import deepspeed

            ds_config = deepspeed_config(self.cfg, self.world_size, lr)
            optimizer = None if uses_deepspeed_optimizer(self.cfg) else self._optimizer(model, lr)
            engine, *_ = deepspeed.initialize(
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad] if optimizer is None else None,
                optimizer=optimizer,
                lr_scheduler=self._scheduler_fn(total_steps),
                config=ds_config,
            )
            return engine
        model.to(self.device)
        master = []
        if self.cfg.deepspeed.bf16:  # compute in bf16, step fp32 master weights (see TorchEngine)
            master = [(p, torch.nn.Parameter(p.detach().float().clone()))
                      for p in model.parameters() if p.requires_grad]
            model.to(torch.bfloat16)
        ddp = None
        if self.world_size > 1:
            ids = [self.local_rank] if self.device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
        optimizer = self._optimizer([m for _, m in master] if master else model, lr)
        return TorchEngine(model, optimizer, self._scheduler_fn(total_steps)(optimizer),
                           t.gradient_accumulation_steps, t.max_grad_norm, ddp, master)

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that is only evaluated (reference policy, reward model): on the device, eval, no grads."""
        dtype = torch.bfloat16 if self.cfg.deepspeed.bf16 else torch.float16 if self.cfg.deepspeed.fp16 else None
        model.to(self.device, dtype=dtype) if dtype else model.to(self.device)
        model.eval().requires_grad_(False)
        return model

    @staticmethod
    def unwrap(engine) -> torch.nn.Module:
        return engine.module

    @contextlib.contextmanager
    def gathered_for_generation(self, engine) -> Iterator[torch.nn.Module]:
        """The engine's module with all its parameters in place for a whole rollout's generation.

        Under ZeRO-3 every forward all-gathers each layer's partitioned weights through module hooks and frees
        them again: with one forward per generated token, the whole model crosses the network per token. Here
        the weights are gathered once and the hooks stay off until the block ends (DeepSpeed's
        ``unwrap_model_for_generation``, the hybrid engine's approach); other engines pass straight through."""
        module = self.unwrap(engine)
        if not (self.use_deepspeed and self.cfg.deepspeed.zero_stage == 3):
            yield module
            return
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(engine):
            yield module

    def full_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        """The complete state dict (gathered under ZeRO-3; collective). None on non-main processes."""
        if self.use_deepspeed and self.cfg.deepspeed.zero_stage == 3:
            sd = engine._zero3_consolidated_16bit_state_dict()
            return sd if self.is_main else None
        return engine.module.state_dict() if self.is_main else None

    # --- checkpoints -----------------------------------------------------------------------------

    def save(self, engine, directory: str | Path) -> None:
        """Engine state (model, optimizer, scheduler) and this process's RNG state into ``directory``.
        Called on every process (DeepSpeed writes one shard per rank). Every file holds only tensors
        and plain data, so :meth:`load` reads it with ``weights_only=True``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.use_deepspeed:
            engine.save_checkpoint(str(d), tag=ENGINE_TAG, save_latest=False)
        elif self.is_main:
            torch.save(engine.state_dict(), d / "engine.pt")
        torch.save(rng.capture(), d / f"rng-rank{self.rank}.pt")

    def load(self, engine, directory: str | Path) -> None:
        """Restore what :meth:`save` wrote (same world size for ZeRO stages 1-3).

        Verify the checkpoint's digests first (``CheckpointManager.verify``); this reads tensors and
        plain data only and raises CheckpointError for a file holding anything else."""
        d = Path(directory)
        if self.use_deepspeed:
            with weights_only_torch_load(deepspeed_state_classes()):
                path, _ = engine.load_checkpoint(
                    str(d), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
                )
            if path is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint to load in {d / ENGINE_TAG}")
        else:
            engine.load_state_dict(load_tensors(d / "engine.pt", map_location=self.device))
        rng_file = d / f"rng-rank{self.rank}.pt"
        if not rng_file.exists():  # resumed with more processes than saved: reuse rank 0's streams
            rng_file = d / "rng-rank0.pt"
        rng.restore(load_tensors(rng_file))

    # --- collectives -----------------------------------------------------------------------------

    def _reduce(self, x, op):
        if self.world_size == 1 or not self.distributed:
            return x
        t = torch.as_tensor(x, dtype=torch.float64 if self.device.type == "cpu" else torch.float32)
        t = t.to(self.device).clone()
        torch.distributed.all_reduce(t, op=op)
        return t

    def all_reduce_sum(self, x):
        """Sum over processes; a float in gives a float out, a tensor gives a tensor."""
        out = self._reduce(x, torch.distributed.ReduceOp.SUM)
        if out is x:
            return x
        return float(out) if not isinstance(x, torch.Tensor) else out.to(x.dtype).to(x.device)

    def all_reduce_mean(self, x):
        """Mean over processes; a float in gives a float out, a tensor gives a tensor."""
        out = self.all_reduce_sum(x)
        return out if self.world_size == 1 else out / self.world_size

    def any_true(self, flag: bool) -> bool:
        out = self._reduce(float(flag), torch.distributed.ReduceOp.MAX)
        return bool(out)

    def barrier(self) -> None:
        if self.world_size > 1 and self.distributed:
            torch.distributed.barrier()
