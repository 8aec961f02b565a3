"""The one training loop. Every stage (pretrain, sft, reward, dpo, grpo) calls `train` with its model
and an objective; only the objective knows what a batch holds and what its loss is.

An objective (see docs/architecture.md):
    train_batches(rank, world) -> iterator of dict batches, with state_dict()/load_state_dict()
    loss(model, batch) -> (loss tensor, metrics: dict[str, float], n_tokens: int processed)
    evaluate(model) -> dict[str, float]                  optional, called under no_grad in eval mode
    state_dict() / load_state_dict(state)                optional, saved in checkpoints
    setup(accelerator)                                   optional, once before training (e.g. move a
                                                          frozen reference model to the device)

`train` owns the rest: Accelerate (device, precision, DDP under torchrun), AdamW, the lr schedule,
gradient accumulation and clipping, torch.compile, activation checkpointing, the divergence guard,
progress bar, metrics.jsonl, trackers, periodic evaluation and atomic checkpoints with exact resume.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, model_validator

from ..config import Precision, Section, dump_config
from ..errors import UserError
from . import checkpoint as ckpt
from .distributed import (all_reduce_sum, check_launch, check_world, deepspeed_plugin, load_optimizer_state, scalar,
                          shard_model)
from .metrics import MetricsLog, SpikeDetector, Throughput, measure_cpu_matmul_peak, peak_flops, truncate_metrics
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
    save_every: int = Field(0, ge=0)  # steps; 0: save only at the end
    keep_last: int = Field(3, gt=0)
    log_every: int = Field(10, gt=0)  # progress bar and trackers; metrics.jsonl gets every step
    seed: int = 0
    trackers: list[Literal["tensorboard", "wandb"]] = []
    max_nonfinite_in_a_row: int = Field(5, gt=0)
    spike_factor: float = Field(2.0, gt=1)  # a loss above this x its running mean is logged as a spike
    strategy: Literal["auto", "ddp", "fsdp2", "deepspeed"] = "auto"  # auto: fsdp2 / deepspeed when launched with
    # an FSDP2 / DeepSpeed accelerate config, else ddp; fsdp2 shards params/grads/optimizer state, deepspeed is
    # ZeRO-1/2 (train/distributed.py, docs/scaling.md)

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of max_steps and max_tokens")
        return self


# what a resumed run may change: how long it runs (extend max_steps, stop earlier with halt_at_step), how
# it is laid out on the hardware and how often it saves/logs/evaluates, none of which changes the weights'
# trajectory (grad_accum_steps keeps the global batch when the world size changes; the data position
# refuses a different one, see objectives.py)
RUN_LENGTH_KEYS = ("train.max_steps", "train.max_tokens", "train.halt_at_step")
LAYOUT_KEYS = ("train.grad_accum_steps", "train.strategy", "train.cpu", "train.compile",
               "train.activation_checkpointing", "train.save_every", "train.keep_last", "train.eval_every",
               "train.log_every", "train.trackers")


def resume_config(cls: type, out: str | Path, config: str | Path | None, overrides: list[str] | None):
    """The config of `--resume` (one rule): RUN/config.yaml, the config the run was started with,
    plus `overrides`; or `config` + overrides, which must then agree with it. Either way only the
    RUN_LENGTH_KEYS (and LAYOUT_KEYS) may differ from the saved config; anything else is a one-line
    UserError. A run
    without config.yaml yet (nothing was written) starts from `config`."""
    from ..config import build, load_config, merge, parse_overrides, read_yaml

    saved_file = Path(out) / "config.yaml"
    if not saved_file.is_file():
        if config is None:
            raise UserError(f"{saved_file}: not found, so there is nothing to resume; give --config to start the run")
        return load_config(cls, config, overrides)
    saved = load_config(cls, saved_file)
    # halt_at_step ends one invocation early: the saved one does not carry over to the next
    data = read_yaml(config) if config is not None else merge(dump_config(saved), {"train": {"halt_at_step": None}})
    extra = parse_overrides(overrides or [])
    if {"max_steps", "max_tokens"} & set(extra.get("train", {})):  # a new length replaces the old one
        data = merge(data, {"train": {"max_steps": None, "max_tokens": None}})
    cfg = build(cls, merge(data, extra), str(config or saved_file))
    ours, theirs = _flatten(dump_config(cfg)), _flatten(dump_config(saved))
    free = RUN_LENGTH_KEYS + LAYOUT_KEYS
    diff = [k for k in sorted(set(ours) | set(theirs)) if k not in free and ours.get(k) != theirs.get(k)]
    if diff:
        shown = ", ".join(f"{k}: run {theirs.get(k)!r} vs now {ours.get(k)!r}" for k in diff[:3])
        raise UserError(f"{saved_file}: --resume with a different config ({shown}); only the run length "
                        f"({', '.join(RUN_LENGTH_KEYS)}), layout and save/log cadence may change; start a new "
                        f"--out otherwise")
    return cfg


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


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


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
    kwargs: dict[str, Any] = {}
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
# The loop


def train(cfg: Section, model: torch.nn.Module, objective, out_dir: str | Path, resume: bool = False,
          tokenizer_dir: str | Path | None = None, progress: bool = True, eval_at_start: bool = False) -> dict[str, Any]:
    """Train `model` on `objective` with `cfg.train` and `cfg.optim`; returns a summary dict
    (`step`, `tokens_seen`, `loss`, `checkpoint`, `eval`). `cfg` is the stage's full config and is
    written to RUN/config.yaml; `tokenizer_dir` files are copied into the run and every checkpoint."""
    tc: TrainConfig = cfg.train
    oc: OptimConfig = cfg.optim
    out = Path(out_dir)
    if tc.strategy == "fsdp2" and getattr(objective, "needs_full_model", False):
        # it samples from the model: ranks decode different numbers of steps, and a sharded
        # model's all-gathers would then never match up (a hang, not an error)
        raise UserError(f"train.strategy=fsdp2: {type(objective).__name__} generates with the model, which a "
                        f"sharded model cannot do rank by rank; use train.strategy=ddp")
    accelerator, strategy = _make_accelerator(tc, oc, out)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    manager = ckpt.CheckpointManager(out, rank=rank, keep_last=tc.keep_last, barrier=accelerator.wait_for_everyone,
                                     tokenizer_dir=Path(tokenizer_dir) if tokenizer_dir else None)
    latest = manager.latest() if resume else None
    if not resume and manager.complete_steps():
        raise UserError(f"{out}: already holds checkpoints; pass --resume to continue it or choose another --out")
    if resume and latest is None and main:
        print(f"note: {out} has no complete checkpoint yet; starting from step 0")
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.write_text_atomic(out / "config.yaml", yaml.safe_dump(dump_config(cfg), sort_keys=False))
            ckpt.copy_tokenizer_files(manager.tokenizer_dir, out / "tokenizer")
        except OSError as exc:  # checked before any training: an unwritable --out fails in seconds
            raise UserError(f"{exc.filename or out}: cannot write the run directory ({exc.strerror or exc})") from None
    accelerator.wait_for_everyone()

    from accelerate.utils import set_seed

    set_seed(tc.seed)
    raw_model = model
    if latest is not None:
        ckpt.check_model_matches(latest, raw_model.cfg)
        if hasattr(raw_model, "load_checkpoint"):  # a wrapper restores what its save_checkpoint wrote
            raw_model.load_checkpoint(latest / "model")
        else:
            ckpt.load_weights(latest, raw_model)
    raw_model.to(device)
    raw_model.gradient_checkpointing = tc.activation_checkpointing
    if strategy == "fsdp2":  # shard first: the optimizer must hold the sharded parameters
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        shard_model(raw_model, device, resolve_precision(tc),
                    reshard_after_forward=getattr(plugin, "reshard_after_forward", True) is not False)
    optimizer = build_optimizer(raw_model, oc, device)
    steps_total = total_steps(tc, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        s, steps_total, oc.schedule, oc.warmup_steps, oc.min_lr_ratio, oc.decay_fraction))
    # the scheduler is not prepared: Accelerate would step it once per process
    if strategy == "fsdp2":  # not prepared: under MULTI_CPU Accelerate would wrap the FSDP2 model in DDP
        model_p = raw_model
    else:
        model_p, optimizer = accelerator.prepare(raw_model, optimizer)
    ds_engine = model_p if strategy == "deepspeed" else None  # DeepSpeed's engine: owns accumulation, clip, step
    if tc.compile:
        model_p = torch.compile(model_p)
    if hasattr(objective, "setup"):
        objective.setup(accelerator)

    set_seed(tc.seed + rank)  # each rank draws its own dropout masks (restored per rank on resume)
    batches = objective.train_batches(rank, world)
    step, tokens_seen, spikes = 0, 0, SpikeDetector(tc.spike_factor)
    if latest is not None:
        ckpt.check_resume_topology(latest, strategy, world)
        if ds_engine is not None:
            ckpt.load_deepspeed_state(latest, ds_engine)
        else:
            load_optimizer_state(raw_model, getattr(optimizer, "optimizer", optimizer),
                                 ckpt.load_state(latest, "optimizer"))
        scheduler.load_state_dict(ckpt.load_state(latest, "scheduler"))
        if accelerator.scaler is not None and (latest / "state" / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(ckpt.load_state(latest, "scaler"))
        state = ckpt.load_trainer_state(latest)
        step, tokens_seen = state["step"], state["tokens_seen"]
        batches.load_state_dict(state["data"])
        if (latest / "state" / "objective.pt").is_file() and hasattr(objective, "load_state_dict"):
            objective.load_state_dict(ckpt.load_state(latest, "objective"))
        spikes.ema, spikes.count = state.get("spike_ema"), state.get("spike_count", 0)
        rng_file = latest / "state" / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            ckpt.set_rng_state(ckpt.load_state(latest, f"rng_rank{rank}"))
        else:  # resumed on more ranks than saved: a fresh, still deterministic stream
            set_seed(tc.seed + 1000 * step + rank)
        if main:
            truncate_metrics(out / "metrics.jsonl", step)

    log = MetricsLog(out / "metrics.jsonl", enabled=main)
    if tc.trackers:
        accelerator.init_trackers(out.name or "openllama", config=_flatten(dump_config(cfg)))
    flops_tok = None
    if hasattr(raw_model, "cfg"):
        from ..model import flops_per_token

        flops_tok = flops_per_token(raw_model.cfg, tc.seq_len)
    peak = peak_flops(device, torch.bfloat16 if resolve_precision(tc) == "bf16" else torch.float32) if main else None
    log.write({"kind": "event", "step": step, "event": "resume" if latest else "start", "world": world,
               "strategy": strategy,
               "device": str(device), "precision": resolve_precision(tc), "max_steps": steps_total,
               "peak_flops": peak})

    halt = min(steps_total, tc.halt_at_step or steps_total)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps_total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    speed = Throughput()
    nonfinite_run, last_loss, last_eval = 0, float("nan"), {}
    saved = latest

    def save(at: int) -> Path:
        trainer_state = {"step": at, "tokens_seen": tokens_seen, "world": world, "strategy": strategy,
                         "data": batches.state_dict(),
                         "spike_ema": spikes.ema, "spike_count": spikes.count}
        extra = {}
        if accelerator.scaler is not None:
            extra["scaler"] = accelerator.scaler.state_dict()
        if hasattr(objective, "state_dict"):
            extra["objective"] = objective.state_dict()
        # raw_model holds the trained parameters themselves (DDP / compile only wrap it)
        return manager.save(at, raw_model, optimizer, scheduler, trainer_state, extra, deepspeed_engine=ds_engine)

    def evaluate(at: int) -> dict:
        if not hasattr(objective, "evaluate"):
            return {}
        raw_model.eval()
        with torch.no_grad(), accelerator.autocast():
            results = {k: float(v) for k, v in objective.evaluate(raw_model).items()}
        raw_model.train()
        log.write({"kind": "eval", "step": at, **results})
        if tc.trackers:
            accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=at)
        if bar is not None:
            bar.write(f"step {at}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        return results

    # the starting model, evaluated like every later evaluation (eval_at_start; fresh runs only)
    start_eval = evaluate(0) if eval_at_start and latest is None else None
    model_p.train()
    try:
        while step < halt:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            sums: dict[str, float] = {}
            loss_sum = torch.zeros((), device=device, dtype=torch.float32)
            n_tokens = 0
            for micro in range(tc.grad_accum_steps):
                batch = _to_device(next(batches), device)
                last = micro == tc.grad_accum_steps - 1
                if strategy == "fsdp2":  # reduce-scatter gradients once, after the last micro-batch
                    model_p.set_requires_gradient_sync(last)
                if ds_engine is not None:  # DeepSpeed scales by 1/accumulation, reduces and steps at the boundary
                    ds_engine.set_gradient_accumulation_boundary(last)
                    loss, metrics, n = objective.loss(model_p, batch)
                    ds_engine.backward(loss)
                    ds_engine.step()  # clips to optim.grad_clip; skips the update on a non-finite gradient norm
                else:
                    with contextlib.nullcontext() if last or strategy == "fsdp2" else accelerator.no_sync(model_p):
                        loss, metrics, n = objective.loss(model_p, batch)
                        accelerator.backward(loss / tc.grad_accum_steps)
                loss_sum += loss.detach().float()
                n_tokens += int(n)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            if ds_engine is not None:  # the norm DeepSpeed clipped with (inf when it skipped the update)
                grad_norm = ds_engine.get_global_grad_norm()
                grad_norm = float("nan") if grad_norm is None else grad_norm
            elif strategy == "fsdp2":  # DTensor-aware; Accelerate's version looks for models it prepared
                grad_norm = torch.nn.utils.clip_grad_norm_(model_p.parameters(), oc.grad_clip or float("inf"))
            else:
                grad_norm = accelerator.clip_grad_norm_(model_p.parameters(), oc.grad_clip or float("inf"))
            # one all-reduce for loss, tokens and the objective's metrics (the same on every rank after)
            keys = sorted(sums)
            packed = torch.tensor([float(n_tokens)] + [sums[k] for k in keys], device=device, dtype=torch.float64)
            packed = all_reduce_sum(torch.cat([loss_sum.double().reshape(1), packed]))
            loss_value = float(packed[0]) / (tc.grad_accum_steps * world)
            step_tokens = int(packed[1])
            metric_values = {k: float(packed[2 + i]) / (tc.grad_accum_steps * world) for i, k in enumerate(keys)}
            grad_norm_value = scalar(grad_norm)
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
            if finite:
                if ds_engine is None:  # DeepSpeed stepped inside ds_engine.step() already
                    optimizer.step()
                nonfinite_run = 0
            else:
                nonfinite_run += 1
            if ds_engine is None:
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            tokens_seen += step_tokens
            last_loss = loss_value
            seconds = time.perf_counter() - t0
            tok_s = speed.update(seconds, step_tokens)
            mfu = tok_s * flops_tok / (peak * world) if (flops_tok and peak) else None
            if mfu is not None and mfu > 1 and device.type == "cpu":
                # the CPU peak was measured while something else loaded the machine: measure again
                peak = max(peak, measure_cpu_matmul_peak(refresh=True))
                mfu = tok_s * flops_tok / (peak * world)
            spike = finite and spikes.update(loss_value)
            record = {"kind": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm_value,
                      "tokens": step_tokens, "tokens_seen": tokens_seen, "tokens_per_s": tok_s, "mfu": mfu,
                      "step_time": seconds, **metric_values}
            if not finite:
                record["skipped"] = True
            if spike:
                record["spike"] = True
            log.write(record)
            if bar is not None:
                bar.update(1)
                if not finite:  # spikes are only recorded (metrics.jsonl): on mixed data they are common
                    bar.write(f"step {step}: non-finite loss/grad, update skipped"
                              f" (loss {loss_value:.4g}, grad norm {grad_norm_value:.4g})")
                if step % tc.log_every == 0 or step == halt:
                    post = {"loss": f"{loss_value:.4f}", "tok/s": f"{tok_s:,.0f}"}
                    if mfu is not None:
                        post["mfu"] = f"{100 * mfu:.1f}%"
                    bar.set_postfix(post, refresh=False)
            if tc.trackers and (step % tc.log_every == 0 or step == halt):
                accelerator.log({"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm_value,
                                 "train/tokens_per_s": tok_s, **{f"train/{k}": v for k, v in metric_values.items()}},
                                step=step)
            if nonfinite_run >= tc.max_nonfinite_in_a_row:
                where = saved if saved is not None else "none (no checkpoint was written)"
                raise TrainingDiverged(
                    f"training diverged: {nonfinite_run} steps in a row with a non-finite loss or gradient norm "
                    f"(up to step {step}); last good checkpoint: {where}. Lower optim.lr, raise "
                    f"optim.warmup_steps or set optim.grad_clip")
            if (tc.eval_every and step % tc.eval_every == 0) or step == steps_total:
                last_eval = evaluate(step)
            if (tc.save_every and step % tc.save_every == 0) or step == halt:
                saved = save(step)
    finally:
        if bar is not None:
            bar.close()
        log.close()
        if tc.trackers:
            accelerator.end_training()
    return {"step": step, "tokens_seen": tokens_seen, "loss": last_loss, "checkpoint": str(saved) if saved else None,
            "eval": last_eval, "max_steps": steps_total, "eval_start": start_eval}
