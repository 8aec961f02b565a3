"""The one training loop. Every stage (pretrain, sft, reward, dpo, grpo) calls `train` with its model
and an `Objective` (objectives.py): only the objective knows what a batch holds and what its loss is.

`train` owns the rest, in parts: `_start` (Accelerate, run directory, starting weights, the model
prepared for DDP / FSDP2 / DeepSpeed, optimizer and schedule), `_restore` (exact resume),
`_train_step` (accumulation, clipping, one all-reduce of the numbers), `_apply_update`, `_Reporter`
(metrics.jsonl, progress bar, trackers, tokens/s and MFU), `_evaluate` and `_save` (atomic
checkpoints, checkpoint.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..artifacts import METRICS_FILE, resolve_model_dir
from ..config import Precision, Section, dump_config, flatten
from ..errors import UserError
from ..model import flops_per_token
from . import checkpoint as ckpt
from .distributed import (all_reduce_sum, check_launch, check_world, deepspeed_plugin, load_optimizer_state,
                          load_weights, materialize, on_meta, prepare_zero3, scalar, shard_model, zero_stage)
from .metrics import (MetricsLog, SpikeDetector, Throughput, host_memory, measure_cpu_matmul_peak, peak_flops,
                      reset_peak_memory, state_bytes, truncate_metrics)
from .objectives import Objective
from .schedule import lr_multiplier

# ----------------------------------------------------------------------------------------------
# Config sections shared by every training stage


class OptimConfig(Section):
    """AdamW with decoupled weight decay on matrices only (norms, biases and the embedding
    LayerNorm are not decayed), a warmup + schedule, and gradient-norm clipping."""

    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)  # None: no clipping (the norm is still logged)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: share of the steps spent decaying
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # final lr = lr * min_lr_ratio (cosine, wsd)
    fused: bool | None = None  # None: fused AdamW where this torch supports the device


class TrainConfig(Section):
    """The loop: how long, how big a batch, precision, checkpoints, evaluation and logging."""

    max_steps: int | None = Field(None, gt=0)  # optimizer steps; or give max_tokens
    max_tokens: int | None = Field(None, gt=0)  # converted to steps of micro x accum x ranks x seq_len
    halt_at_step: int | None = Field(None, gt=0)  # end this invocation early (with a checkpoint);
    # the schedule still runs to max_steps, so a later --resume continues exactly
    micro_batch_size: int = Field(8, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    seq_len: int = Field(256, gt=0)
    precision: Precision = "auto"  # auto: bf16 on a GPU that has it, float32 on CPU
    cpu: bool = False  # force CPU even where a GPU is present
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every: int = Field(0, ge=0)  # steps; 0: evaluate only at the end
    eval_batches: int = Field(8, gt=0)
    # lm-eval tasks (names, YAML files or dirs) run at every evaluation; pretraining logs
    # lm_eval/<task>/<metric> and `core` (lm_eval_backend.py); the `eval` extra
    eval_tasks: list[str] = []
    eval_tasks_limit: float | None = Field(None, gt=0)  # items per task (below 1: a share of each)
    save_every: int = Field(0, ge=0)  # steps; 0: save only at the end
    keep_last: int = Field(3, gt=0)
    log_every: int = Field(10, gt=0)  # progress bar and trackers; metrics.jsonl gets every step
    seed: int = 0
    trackers: list[Literal["tensorboard", "wandb"]] = []
    max_nonfinite_in_a_row: int = Field(5, gt=0)
    spike_factor: float = Field(2.0, gt=1)  # a loss above this x its running mean is logged as a spike
    async_save: bool = False  # sharded (fsdp2) checkpoints written in the background while training goes on
    strategy: Literal["auto", "ddp", "fsdp2", "deepspeed"] = "auto"  # auto: fsdp2 / deepspeed when launched with
    # an FSDP2 / DeepSpeed accelerate config, else ddp; fsdp2 shards params/grads/optimizer state, deepspeed is
    # ZeRO-1/2 (train/distributed.py, docs/scaling.md)

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of max_steps and max_tokens")
        return self


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


# ----------------------------------------------------------------------------------------------
# Building blocks


def resolve_precision(tc: TrainConfig) -> str:
    """Accelerate's mixed_precision value for this config and machine."""
    gpu = torch.cuda.is_available() and not tc.cpu
    if tc.precision == "auto":
        return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[tc.precision]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (dim >= 2: linear layers, the embedding); never norms or biases."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied weights once
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, oc: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = oc.fused if oc.fused is not None else device.type in ("cuda", "cpu")
    kwargs = dict(lr=oc.lr, betas=oc.betas, eps=oc.eps)
    try:
        return torch.optim.AdamW(param_groups(model, oc.weight_decay), fused=fused, **kwargs)
    except (RuntimeError, TypeError):  # fused not supported for this device/dtype in this torch
        return torch.optim.AdamW(param_groups(model, oc.weight_decay), **kwargs)


def total_steps(tc: TrainConfig, world: int) -> int:
    if tc.max_steps is not None:
        return tc.max_steps
    per_step = tc.micro_batch_size * tc.grad_accum_steps * world * tc.seq_len
    return max(1, math.ceil(tc.max_tokens / per_step))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _deepspeed_kwargs(tc: TrainConfig, oc: OptimConfig) -> dict[str, Any]:
    """Accelerator arguments for DeepSpeed ZeRO-1/2: the plugin with our batch/clip values, and on a
    machine without GPUs DeepSpeed's CPU accelerator over gloo (without an explicit backend
    Accelerate counts one process while DeepSpeed's group has them all, see docs/scaling.md)."""
    from accelerate.utils import InitProcessGroupKwargs

    if tc.compile:
        raise UserError("train.compile=true is not supported with train.strategy=deepspeed (use ddp or fsdp2)")
    if int(os.environ.get("LOCAL_RANK", "-1")) == -1:  # Accelerate only sets DeepSpeed's process group up then
        raise UserError("train.strategy=deepspeed needs a launcher, even for one process: accelerate launch "
                        "--config_file configs/accelerate/deepspeed_zero1.yaml ..., or torchrun --nproc_per_node N")
    kwargs: dict[str, Any] = {"gradient_accumulation_steps": tc.grad_accum_steps}
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    # accelerate launch put the ZeRO settings into the environment (ACCELERATE_DEEPSPEED_*); the plugin reads them
    kwargs["deepspeed_plugin"] = deepspeed_plugin(tc.grad_accum_steps, tc.micro_batch_size, oc.grad_clip,
                                                  int(os.environ.get("WORLD_SIZE", "1")))
    return kwargs


def _make_accelerator(tc: TrainConfig, oc: OptimConfig, out: Path):
    from accelerate import Accelerator

    # Accelerate only goes MULTI_CPU (gloo) under torchrun when told cpu=True (see NOTES.md)
    cpu = tc.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    strategy = check_launch(tc.strategy, tc.cpu)
    # DDP: gradients are views into its all-reduce buckets rather than a second copy beside them
    # (measured with bench/scale_bench.py: per-rank peak 1.27x -> 1.0x of `openllama plan` at 2 ranks)
    from accelerate.utils import DistributedDataParallelKwargs

    kwargs: dict[str, Any] = {"kwargs_handlers": [DistributedDataParallelKwargs(gradient_as_bucket_view=True)]}
    if strategy == "deepspeed":
        kwargs = _deepspeed_kwargs(tc, oc)
        cpu = False  # Accelerator(cpu=True) would silently drop DeepSpeed
    try:
        accelerator = Accelerator(mixed_precision=resolve_precision(tc), cpu=cpu, log_with=tc.trackers or None,
                                  project_dir=str(out), **kwargs)
    except (ImportError, ValueError) as exc:
        raise UserError(f"train.trackers={tc.trackers}: {exc} (install the extra, e.g. "
                        f"pip install 'openllama[tensorboard]')") from None
    check_world(accelerator.num_processes)
    if strategy == "deepspeed":
        return accelerator, strategy
    # FSDP2 over one process is plain training (same checkpoints), so it needs no process group
    return accelerator, ("fsdp2" if strategy == "fsdp2" and accelerator.num_processes > 1 else "ddp")


# ----------------------------------------------------------------------------------------------
# A run: what the loop works on, built once


@dataclass
class _Run:
    tc: TrainConfig
    oc: OptimConfig
    accelerator: Any
    strategy: str  # ddp | fsdp2 | deepspeed, as resolved for this launch
    raw_model: torch.nn.Module  # holds the trained parameters themselves (DDP / compile only wrap it)
    model: torch.nn.Module  # what forward and backward go through
    optimizer: Any
    scheduler: Any
    ds_engine: Any  # DeepSpeed's engine (owns accumulation, clipping and the step), else None
    manager: ckpt.CheckpointManager
    steps_total: int

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def _start(cfg: Section, model: torch.nn.Module, objective: Objective, out: Path, resume: bool,
           tokenizer_dir: str | Path | None, init_from: str | Path | None) -> tuple[_Run, Path | None]:
    """Accelerate, the run directory, the model placed for the strategy (built on the meta device:
    sharded first, then only this rank's shards materialised) with its optimizer and schedule, and
    its starting weights: `init_from` (a model directory), or Llama.init_weights(train.seed); a
    checkpoint's are restored later, by `_restore`. -> (run, checkpoint to resume)."""
    from accelerate.utils import set_seed

    tc, oc = cfg.train, cfg.optim
    if tc.strategy == "fsdp2" and objective.needs_full_model:
        # it samples from the model: ranks decode different numbers of steps, and a sharded
        # model's all-gathers would then never match up (a hang, not an error)
        raise UserError(f"train.strategy=fsdp2: {type(objective).__name__} generates with the model, which a "
                        f"sharded model cannot do rank by rank; use train.strategy=ddp")
    accelerator, strategy = _make_accelerator(tc, oc, out)
    main = accelerator.is_main_process
    manager = ckpt.CheckpointManager(out, rank=accelerator.process_index, keep_last=tc.keep_last,
                                     barrier=accelerator.wait_for_everyone,
                                     tokenizer_dir=Path(tokenizer_dir) if tokenizer_dir else None)
    latest = manager.latest() if resume else None
    if not resume and manager.complete_steps():
        raise UserError(f"{out}: already holds checkpoints; pass --resume to continue it or choose another --out")
    if resume and latest is None and main:
        print(f"note: {out} has no complete checkpoint yet; starting from step 0")
    if main:
        ckpt.prepare_run_dir(out, dump_config(cfg), manager.tokenizer_dir)
    accelerator.wait_for_everyone()
    set_seed(tc.seed)
    if latest is not None:
        ckpt.check_model_matches(latest, model.cfg)
        if hasattr(model, "load_checkpoint"):  # a wrapper (LoRA, reward head) restores what it saved
            model.load_checkpoint(latest / "model")
    # a model built on the meta device is initialised here (from train.seed) unless weights follow
    fresh = latest is None and init_from is None
    run = _prepare_model(tc, oc, accelerator, strategy, model, manager, seed=tc.seed if fresh else None)
    if latest is None and init_from is not None:
        load_weights(run.raw_model, resolve_model_dir(init_from))  # each rank reads only its rows
    objective.setup(accelerator)
    return run, latest


def _prepare_model(tc: TrainConfig, oc: OptimConfig, accelerator, strategy: str, raw_model: torch.nn.Module,
                   manager: ckpt.CheckpointManager, seed: int | None) -> _Run:
    device = accelerator.device
    meta = on_meta(raw_model)
    if not meta:
        raw_model.to(device)
    raw_model.gradient_checkpointing = tc.activation_checkpointing
    if strategy == "fsdp2":  # shard first: the optimizer must hold the sharded parameters
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        shard_model(raw_model, device, resolve_precision(tc),
                    reshard_after_forward=getattr(plugin, "reshard_after_forward", True) is not False)
    if meta:  # storage for this rank's shards only; initial values unless a checkpoint's follow
        materialize(raw_model, device, seed)
    optimizer = build_optimizer(raw_model, oc, device)
    steps_total = total_steps(tc, accelerator.num_processes)
    # not prepared: Accelerate would step it once per process
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        s, steps_total, oc.schedule, oc.warmup_steps, oc.min_lr_ratio, oc.decay_fraction))
    if strategy == "fsdp2":  # not prepared: under MULTI_CPU Accelerate would wrap the FSDP2 model in DDP
        model = raw_model
    else:
        model, optimizer = accelerator.prepare(raw_model, optimizer)
    ds_engine = model if strategy == "deepspeed" else None
    if zero_stage(ds_engine) == 3:
        prepare_zero3(raw_model)
    if tc.compile:
        model = torch.compile(model)
    return _Run(tc, oc, accelerator, strategy, raw_model, model, optimizer, scheduler, ds_engine, manager, steps_total)


def _restore(run: _Run, latest: Path, objective: Objective, batches, spikes: SpikeDetector) -> tuple[int, int]:
    """Optimizer, schedule, scaler, data position, objective state and this rank's RNG as saved.
    -> (step, tokens seen)."""
    from accelerate.utils import set_seed

    ckpt.check_resume_topology(latest, run.strategy, run.world)
    if run.ds_engine is not None:  # the module and this rank's ZeRO partition
        ckpt.load_deepspeed_state(latest, run.ds_engine)
    elif ckpt.has_dcp(latest):  # a sharded run's checkpoint, resharded to this world size
        ckpt.load_dcp(latest, run.raw_model, run.optimizer)
    else:
        if not hasattr(run.raw_model, "load_checkpoint"):  # (a wrapper restored itself in _start)
            load_weights(run.raw_model, latest / "model")
        load_optimizer_state(run.raw_model, getattr(run.optimizer, "optimizer", run.optimizer),
                             ckpt.load_state(latest, "optimizer"))
    run.scheduler.load_state_dict(ckpt.load_state(latest, "scheduler"))
    scaler = run.accelerator.scaler
    if scaler is not None and ckpt.has_state(latest, "scaler"):
        scaler.load_state_dict(ckpt.load_state(latest, "scaler"))
    state = ckpt.load_trainer_state(latest)
    batches.load_state_dict(state["data"])
    if ckpt.has_state(latest, "objective"):
        objective.load_state_dict(ckpt.load_state(latest, "objective"))
    spikes.ema, spikes.count = state.get("spike_ema"), state.get("spike_count", 0)
    if not ckpt.restore_rng(latest, run.rank):  # resumed on more ranks than saved: a fresh, deterministic stream
        set_seed(run.tc.seed + 1000 * state["step"] + run.rank)
    return state["step"], state["tokens_seen"]


# ----------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and ranks
    tokens: int  # processed by all ranks
    metrics: dict[str, float]  # the objective's, averaged like the loss
    grad_norm: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def _micro_step(run: _Run, objective: Objective, batch: dict, last: bool):
    """Forward and backward of one micro-batch, accumulating gradients the way the strategy does."""
    if run.strategy == "fsdp2":  # reduce-scatter gradients once, after the last micro-batch
        run.model.set_requires_gradient_sync(last)
    if run.ds_engine is not None:  # DeepSpeed scales by 1/accumulation, reduces and steps at the boundary
        run.ds_engine.set_gradient_accumulation_boundary(last)
        loss, metrics, n = objective.loss(run.model, batch)
        run.ds_engine.backward(loss)
        run.ds_engine.step()  # clips to optim.grad_clip; skips the update on a non-finite gradient norm
        return loss, metrics, n
    sync = last or run.strategy == "fsdp2"
    with contextlib.nullcontext() if sync else run.accelerator.no_sync(run.model):
        loss, metrics, n = objective.loss(run.model, batch)
        run.accelerator.backward(loss / run.tc.grad_accum_steps)
    return loss, metrics, n


def _grad_norm(run: _Run) -> float:
    """The global gradient norm, clipped to optim.grad_clip (DeepSpeed clipped it already)."""
    if run.ds_engine is not None:  # the norm DeepSpeed clipped with (inf when it skipped the update)
        norm = run.ds_engine.get_global_grad_norm()
        return float("nan") if norm is None else scalar(norm)
    limit = run.oc.grad_clip or float("inf")
    if run.strategy == "fsdp2":  # DTensor-aware; Accelerate's version looks for models it prepared
        return scalar(torch.nn.utils.clip_grad_norm_(run.model.parameters(), limit))
    return scalar(run.accelerator.clip_grad_norm_(run.model.parameters(), limit))


def _train_step(run: _Run, objective: Objective, batches) -> StepResult:
    """Accumulate gradients over the micro-batches, clip, and average the numbers over ranks with
    one all-reduce (loss, tokens, the objective's metrics and its `step_sums` together). No update yet."""
    accum = run.tc.grad_accum_steps
    loss_sum = torch.zeros((), device=run.device, dtype=torch.float32)
    n_tokens, sums = 0, {}
    for micro in range(accum):
        loss, metrics, n = _micro_step(run, objective, _to_device(next(batches), run.device), micro == accum - 1)
        loss_sum += loss.detach().float()
        n_tokens += int(n)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    grad_norm = _grad_norm(run)
    keys = sorted(sums)
    packed = torch.tensor([float(n_tokens)] + [sums[k] for k in keys], device=run.device, dtype=torch.float64)
    extra = objective.step_sums(run.device)  # summed, not averaged: e.g. per-category loss sums and counts
    parts = [loss_sum.double().reshape(1), packed] + ([extra.to(run.device, torch.float64)] if extra is not None else [])
    packed = all_reduce_sum(torch.cat(parts))
    per = accum * run.world
    metrics = {k: float(packed[2 + i]) / per for i, k in enumerate(keys)}
    if extra is not None:
        metrics.update(objective.step_metrics(packed[2 + len(keys):]))
    return StepResult(float(packed[0]) / per, int(packed[1]), metrics, grad_norm)


def _apply_update(run: _Run, finite: bool) -> None:
    """The optimizer step (skipped on a non-finite loss or norm), then the schedule moves on."""
    if run.ds_engine is None:  # DeepSpeed stepped inside ds_engine.step() already
        if finite:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()


# ----------------------------------------------------------------------------------------------
# Where the numbers go


class _Reporter:
    """The sinks of a run's numbers: metrics.jsonl (every step), the progress bar and the trackers
    (every log_every steps), with tokens/s and MFU computed once for all of them."""

    def __init__(self, cfg: Section, run: _Run, out: Path, step: int, progress: bool):
        self.run, self.tc = run, run.tc
        self.log = MetricsLog(out / METRICS_FILE, enabled=run.main)
        if self.tc.trackers:
            run.accelerator.init_trackers(out.name or "openllama", config=_tracker_config(cfg))
        self.flops_tok = flops_per_token(run.raw_model.cfg, self.tc.seq_len) if hasattr(run.raw_model, "cfg") else None
        bf16 = resolve_precision(self.tc) == "bf16"
        self.peak = peak_flops(run.device, torch.bfloat16 if bf16 else torch.float32) if run.main else None
        self.speed = Throughput()
        self.bar = None
        if progress and run.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.steps_total, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def event(self, step: int, event: str, **extra) -> None:
        self.log.write({"kind": "event", "step": step, "event": event, "world": self.run.world,
                        "strategy": self.run.strategy, "device": str(self.run.device),
                        "precision": resolve_precision(self.tc), "max_steps": self.run.steps_total,
                        "peak_flops": self.peak, **{k: v for k, v in extra.items() if v is not None}})

    def before_checkpoint(self) -> int | None:
        """Resident memory now, with the peak restarted: the save's own peak is then measured."""
        return host_memory().get("rss") if reset_peak_memory() else None

    def checkpoint(self, step: int, seconds: float, rss_before: int | None) -> None:
        """How long a save held training up (an asynchronous one: the copy to memory only) and how
        much memory it took beyond what the rank held before it (this rank's)."""
        record = {"kind": "event", "event": "checkpoint", "step": step, "seconds": seconds, "async": self.tc.async_save}
        if rss_before is not None:
            record["save_extra_bytes"] = host_memory()["peak_rss"] - rss_before
        self.log.write(record)

    def _mfu(self, tok_s: float) -> float | None:
        if not (self.flops_tok and self.peak):
            return None
        mfu = tok_s * self.flops_tok / (self.peak * self.run.world)
        if mfu > 1 and self.run.device.type == "cpu":
            # the CPU peak was measured while something else loaded the machine: measure again
            self.peak = max(self.peak, measure_cpu_matmul_peak(refresh=True))
            mfu = tok_s * self.flops_tok / (self.peak * self.run.world)
        return mfu

    def step(self, step: int, r: StepResult, lr: float, seconds: float, tokens_seen: int, spike: bool) -> None:
        tok_s = self.speed.update(seconds, r.tokens)
        mfu = self._mfu(tok_s)
        record = {"kind": "train", "step": step, "loss": r.loss, "lr": lr, "grad_norm": r.grad_norm,
                  "tokens": r.tokens, "tokens_seen": tokens_seen, "tokens_per_s": tok_s, "mfu": mfu,
                  "step_time": seconds, **r.metrics}
        if not r.finite:
            record["skipped"] = True
        if spike:  # only recorded: on mixed data spikes are common
            record["spike"] = True
        self.log.write(record)
        halt = min(self.run.steps_total, self.tc.halt_at_step or self.run.steps_total)
        periodic = step % self.tc.log_every == 0 or step == halt
        if self.bar is not None:
            self.bar.update(1)
            if not r.finite:
                self.bar.write(f"step {step}: non-finite loss/grad, update skipped"
                               f" (loss {r.loss:.4g}, grad norm {r.grad_norm:.4g})")
            if periodic:
                post = {"loss": f"{r.loss:.4f}", "tok/s": f"{tok_s:,.0f}"}
                if mfu is not None:
                    post["mfu"] = f"{100 * mfu:.1f}%"
                self.bar.set_postfix(post, refresh=False)
        if self.tc.trackers and periodic:
            self.run.accelerator.log({"train/loss": r.loss, "train/lr": lr, "train/grad_norm": r.grad_norm,
                                      "train/tokens_per_s": tok_s, **{f"train/{k}": v for k, v in r.metrics.items()}},
                                     step=step)

    def memory(self, step: int, grads: int, start: dict[str, int]) -> None:
        """The largest per-rank numbers: weights, gradients and optimizer state held, and host
        memory (resident at the start, peak so far); the GPU's peak allocation where there is one."""
        state = {**state_bytes(self.run.raw_model, self.run.optimizer), "grads": grads}
        now = host_memory()
        keys = ["weights", "grads", "optimizer"]
        values = [state[k] for k in keys] + [now["peak_rss"], start.get("rss", 0)]
        if self.run.device.type == "cuda":
            values.append(torch.cuda.max_memory_allocated(self.run.device))
        packed = torch.tensor(values, dtype=torch.float64, device=self.run.device)
        if self.run.world > 1:
            import torch.distributed as dist

            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        record = {"kind": "event", "event": "memory", "step": step,
                  **{f"{k}_bytes": int(packed[i]) for i, k in enumerate(keys)},
                  "peak_rss_bytes": int(packed[3]), "start_rss_bytes": int(packed[4])}
        if self.run.device.type == "cuda":
            record["gpu_peak_bytes"] = int(packed[5])
        self.log.write(record)

    def evaluation(self, step: int, results: dict[str, float]) -> None:
        self.log.write({"kind": "eval", "step": step, **results})
        if self.tc.trackers:
            self.run.accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=step)
        if self.bar is not None:
            self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log.close()
        if self.tc.trackers:
            self.run.accelerator.end_training()


def _tracker_config(cfg: Section) -> dict[str, Any]:
    """The run's config as the flat scalar dict trackers take (lists and None as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(dump_config(cfg)).items()}


# ----------------------------------------------------------------------------------------------
# The loop


def _evaluate(run: _Run, objective: Objective, report: _Reporter, step: int) -> dict[str, float]:
    run.raw_model.eval()
    with torch.no_grad(), run.accelerator.autocast():
        results = {k: float(v) for k, v in objective.evaluate(run.raw_model).items()}
    run.raw_model.train()
    if results:
        report.evaluation(step, results)
    return results


def _save(run: _Run, objective: Objective, batches, step: int, tokens_seen: int, spikes: SpikeDetector) -> Path:
    trainer_state = {"step": step, "tokens_seen": tokens_seen, "world": run.world, "strategy": run.strategy,
                     "data": batches.state_dict(), "spike_ema": spikes.ema, "spike_count": spikes.count}
    extra = {}
    if run.accelerator.scaler is not None:
        extra["scaler"] = run.accelerator.scaler.state_dict()
    objective_state = objective.state_dict()
    if objective_state is not None:
        extra["objective"] = objective_state
    return run.manager.save(step, run.raw_model, run.optimizer, run.scheduler, trainer_state, extra,
                            deepspeed_engine=run.ds_engine, asynchronous=run.tc.async_save)


def train(cfg: Section, model: torch.nn.Module, objective: Objective, out_dir: str | Path, resume: bool = False,
          tokenizer_dir: str | Path | None = None, progress: bool = True, eval_at_start: bool = False,
          init_from: str | Path | None = None) -> dict[str, Any]:
    """Train `model` on `objective` with `cfg.train` and `cfg.optim`; returns a summary dict
    (`step`, `tokens_seen`, `loss`, `checkpoint`, `eval`). `cfg` is the stage's full config and is
    written to RUN/config.yaml; `tokenizer_dir` files are copied into the run and every checkpoint.
    `eval_at_start`: a fresh run evaluates the starting model at step 0 (`summary["eval_start"]`).
    A `model` built on the meta device is never whole on one rank: see `_start`."""
    from accelerate.utils import set_seed

    out = Path(out_dir)
    start_memory = host_memory()  # before any weight exists: the baseline of the memory event
    run, latest = _start(cfg, model, objective, out, resume, tokenizer_dir, init_from)
    tc = run.tc
    set_seed(tc.seed + run.rank)  # each rank draws its own dropout masks (restored per rank on resume)
    batches = objective.train_batches(run.rank, run.world)
    spikes = SpikeDetector(tc.spike_factor)
    t0 = time.perf_counter()
    step, tokens_seen = _restore(run, latest, objective, batches, spikes) if latest is not None else (0, 0)
    restore_seconds = time.perf_counter() - t0
    if latest is not None and run.main:
        truncate_metrics(out / METRICS_FILE, step)  # the steps after the checkpoint are run again
    report = _Reporter(cfg, run, out, step, progress)
    report.event(step, "resume" if latest else "start", restore_seconds=restore_seconds if latest else None)
    halt = min(run.steps_total, tc.halt_at_step or run.steps_total)
    saved, last_eval, last_loss, nonfinite_run = latest, {}, float("nan"), 0
    first_step = run.ds_engine is None  # (DeepSpeed keeps gradients and optimizer state in its own buffers)
    start_eval = _evaluate(run, objective, report, 0) if eval_at_start and latest is None else None
    run.model.train()
    try:
        while step < halt:
            t0, lr = time.perf_counter(), run.optimizer.param_groups[0]["lr"]
            result = _train_step(run, objective, batches)
            grads = state_bytes(run.raw_model, run.optimizer)["grads"] if first_step else 0
            _apply_update(run, result.finite)
            if first_step:  # the step every later one repeats: memory per rank, as `openllama plan` predicts it
                report.memory(step + 1, grads, start_memory)
                first_step = False
            nonfinite_run = 0 if result.finite else nonfinite_run + 1
            step, tokens_seen, last_loss = step + 1, tokens_seen + result.tokens, result.loss
            spike = result.finite and spikes.update(result.loss)
            report.step(step, result, lr, time.perf_counter() - t0, tokens_seen, spike)
            if nonfinite_run >= tc.max_nonfinite_in_a_row:
                raise TrainingDiverged(
                    f"training diverged: {nonfinite_run} steps in a row with a non-finite loss or gradient norm "
                    f"(up to step {step}); last good checkpoint: {saved or 'none (no checkpoint was written)'}. "
                    f"Lower optim.lr, raise optim.warmup_steps or set optim.grad_clip")
            if (tc.eval_every and step % tc.eval_every == 0) or step == run.steps_total:
                last_eval = _evaluate(run, objective, report, step)
            if (tc.save_every and step % tc.save_every == 0) or step == halt:
                t0, before = time.perf_counter(), report.before_checkpoint()
                saved = _save(run, objective, batches, step, tokens_seen, spikes)
                report.checkpoint(step, time.perf_counter() - t0, before)
        run.manager.wait()  # an asynchronous save is published before the run returns
    finally:
        report.close()
    return {"step": step, "tokens_seen": tokens_seen, "loss": last_loss, "checkpoint": str(saved) if saved else None,
            "eval": last_eval, "max_steps": run.steps_total, "eval_start": start_eval}
