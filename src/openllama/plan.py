"""`openllama plan`: memory per GPU and training time for a model config on N GPUs, before renting them.

Everything is arithmetic on the config's `model:` section (no GPU, no model instantiated):

* parameters and training FLOPs per token come from `openllama.model.count_params` / `flops_per_token`;
* model state per GPU for each strategy follows the ZeRO paper's accounting for bf16 mixed precision
  with AdamW: 2 bytes of bf16 weights + 2 of bf16 gradients + 12 of optimizer state (fp32 master
  weights, first and second moments) per parameter; a strategy divides some of these by N. DDP
  runs Accelerate's bf16 as autocast over fp32 weights instead: 4 + 2 (autocast's bf16 weight
  copies) + 4 (fp32 gradients) + 8 (moments):

      ddp           nothing sharded                      (4 + 2 + 4 + 8) P
      zero1         optimizer state sharded              (2 + 2) P + 12 P / N
      zero2         + gradients sharded                  2 P + (2 + 12) P / N
      fsdp2/zero3   + weights sharded (full shard)       (2 + 2 + 12) P / N + gathered units

  A fully sharded model still gathers whole units while it computes: we add two units (the one
  running and the one prefetched) of unsharded weights and gradients; a unit is a transformer
  block, or the root (embedding, output, norms) if that is larger.
* activations are counted tensor by tensor for *this* model (see `layer_activation_bytes_per_token`); the
  element counts are checked against what autograd really saves (tests/test_plan.py), so the
  estimate is ours, not a generic transformer's. With SDPA's flash / memory-efficient kernels
  attention saves no (s x s) matrix; `--attention math` adds it (Korthikanti et al.'s 5as/h term).
* time: tokens / (tokens/s per GPU x GPUs), where tokens/s per GPU = MFU x peak FLOP/s / FLOPs per token,
  or is given directly (`--tokens-per-sec-per-gpu`) and the implied MFU is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ConfigDict

from .config import ModelConfig, Section, build, merge, parse_overrides, read_yaml
from .errors import UserError
from .model import count_params, flops_per_token

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float  # dense bf16 (fp16 for V100) tensor-core FLOP/s, no sparsity
    memory_gib: float


GPUS: dict[str, Gpu] = {
    "a100": Gpu("NVIDIA A100 SXM 80GB", 312e12, 80),
    "a100-40gb": Gpu("NVIDIA A100 40GB", 312e12, 40),
    "h100": Gpu("NVIDIA H100 SXM", 989e12, 80),
    "h200": Gpu("NVIDIA H200", 989e12, 141),
    "l40s": Gpu("NVIDIA L40S", 362e12, 48),
    "v100": Gpu("NVIDIA V100 32GB (fp16, no bf16)", 125e12, 32),
    "mi300x": Gpu("AMD MI300X", 1307e12, 192),
}


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter for model state, and per activation element."""

    name: str
    weight: int
    grad: int
    optimizer: int  # AdamW moments (+ fp32 master weights when the weights are 16-bit)
    act: int  # activations saved for backward


PRECISIONS = {
    "bf16": Precision("bf16 mixed (AdamW, fp32 master weights)", 2, 2, 12, 2),
    "fp32": Precision("fp32 (AdamW)", 4, 4, 8, 4),
}


@dataclass(frozen=True)
class Strategy:
    name: str
    shard_optimizer: bool
    shard_grads: bool
    shard_weights: bool
    autocast: bool  # 16-bit compute through torch.autocast over fp32 weights (residual stream in fp32)


STRATEGIES = [
    Strategy("ddp", False, False, False, autocast=True),  # Accelerate's bf16 = autocast
    Strategy("zero1", True, False, False, autocast=False),  # DeepSpeed bf16: bf16 weights
    Strategy("zero2", True, True, False, autocast=False),
    Strategy("fsdp2/zero3", True, True, True, autocast=False),  # MixedPrecisionPolicy(param_dtype=bf16)
]


# ----------------------------------------------------------------------------------------------
# Activations


def residual_bytes(precision: Precision, autocast: bool) -> int:
    """Bytes per element of the residual stream: fp32 under autocast over fp32 weights (DDP with
    Accelerate's bf16), else the activation dtype (FSDP2's bf16 param policy, DeepSpeed's bf16)."""
    return 4 if autocast else precision.act


def norm_bytes_per_element(precision: Precision, autocast: bool, consumers: int = 1) -> int:
    """What one RMSNorm saves per element of its input, as model.py computes it: x in fp32
    (x.float(), a copy unless x already is fp32), the normalised x (residual dtype), and the
    output as the next matmuls save it. Under autocast every consuming matmul saves its own
    16-bit cast of the fp32 output (autocast caches casts of weights only), so the attention norm
    pays 3 copies (wq, wk, wv) and the FFN norm 2 (w1, w3)."""
    res = residual_bytes(precision, autocast)
    return 4 + res + precision.act * (consumers if autocast else 1)


def layer_activation_bytes_per_token(cfg: ModelConfig, precision: Precision, seq_len: int,
                                     attention: str = "flash", autocast: bool = False) -> float:
    """Bytes one transformer block saves for backward, per token.

    Per block (elements of `act` bytes unless stated), as autograd saves them in model.py:
      2 RMSNorms        h x norm_bytes_per_element (8 bytes in bf16, 12 in fp32; under autocast
                        14 before attention and 12 before the FFN) + 4 bytes of rsqrt each
      attention         q h, k and v 2 kv_dim (after RoPE), SDPA output h (it is also wo's input: the
                        fused kernels return it token-major, so the reshape is a view) + 4 bytes x heads
                        of log-sum-exp (flash); math attention: + heads x s probabilities
      SwiGLU            w1 out f, w3 out f, silu(w1 out) f, product (w2 input) f
    total = h (norm_attn + norm_ffn) + act x (2h + 2 kv_dim + 4f) + 8 + 4a   [+ act x a x s without flash]
    """
    h, f, a, act = cfg.dim, cfg.ffn_hidden_dim, cfg.n_heads, precision.act
    kv_dim = cfg.kv_heads * cfg.head_dim
    elements = 2 * h + 2 * kv_dim + 4 * f
    if attention == "math":
        elements += a * seq_len
    norms = h * (norm_bytes_per_element(precision, autocast, 3) + norm_bytes_per_element(precision, autocast, 2))
    return norms + act * elements + 2 * 4 + 4 * a


def outside_layers_activation_bytes_per_token(cfg: ModelConfig, precision: Precision, autocast: bool = False) -> float:
    """Embedding, RoPE tables, final norm and the loss, per token.

    token ids 8 (int64); cos/sin tables 2 x head_dim x 4 (fp32); stable-embedding LayerNorm input
    (residual dtype) + mean/rstd 8; final RMSNorm + 4; the loss saves log-softmax in fp32: 4V.
    """
    h, V = cfg.dim, cfg.vocab_size
    b = 8 + 2 * cfg.head_dim * 4 + h * norm_bytes_per_element(precision, autocast, 1) + 4 + 4 * V
    if cfg.stable_embedding:
        b += residual_bytes(precision, autocast) * h + 8
    return b


def logits_transient_bytes_per_token(cfg: ModelConfig, act: int) -> float:
    """At the start of backward the logits' gradient exists in fp32 and in the activation dtype."""
    return (4 + act) * cfg.vocab_size


def activation_bytes(cfg: ModelConfig, precision: Precision, micro_batch: int, seq_len: int, *,
                     checkpointing: bool, attention: str = "flash", autocast: bool = False,
                     peak: bool = True) -> float:
    """Activation memory of one micro batch (bytes). With checkpointing each block keeps only its
    input (h residual elements per token) and one block at a time is recomputed during backward.
    `peak=False` gives just what autograd saves (what the tests measure)."""
    layer = layer_activation_bytes_per_token(cfg, precision, seq_len, attention, autocast)
    if checkpointing:
        layers = cfg.n_layers * residual_bytes(precision, autocast) * cfg.dim + (layer if peak else 0)
    else:
        layers = cfg.n_layers * layer
    per_token = layers + outside_layers_activation_bytes_per_token(cfg, precision, autocast)
    if peak:
        per_token += logits_transient_bytes_per_token(cfg, precision.act)
    return per_token * micro_batch * seq_len


# ----------------------------------------------------------------------------------------------
# Model state


def largest_unit_params(cfg: ModelConfig) -> int:
    """Parameters in the biggest FSDP unit: one block, or the root (embeddings, output, norms)."""
    block = (count_params(cfg) - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
             - cfg.dim - (2 * cfg.dim if cfg.stable_embedding else 0)) // cfg.n_layers
    root = count_params(cfg) - block * cfg.n_layers
    return max(block, root)


def state_bytes_per_param(precision: Precision, autocast: bool) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per parameter.

    16-bit weights (DeepSpeed bf16, FSDP2's bf16 param policy): the precision's ZeRO accounting.
    Autocast over fp32 weights (DDP with Accelerate's bf16): fp32 weights + the 16-bit copies that
    autocast caches for the step (4 + 2), fp32 gradients (4), AdamW moments (8)."""
    if autocast:
        return 4 + precision.act, 4, 8
    return precision.weight, precision.grad, precision.optimizer


def model_state_bytes(cfg: ModelConfig, precision: Precision, strategy: Strategy, gpus: int,
                      prefetch: bool = True) -> dict[str, float]:
    """Weights, gradients and optimizer state per GPU (bytes) for one strategy. A fully sharded
    model also holds gathered units: on GPUs two (the running one, and the next one, all-gathered on
    its own stream meanwhile); `prefetch=False` (CPU processes: no copy stream) one, as measured
    with bench/scale_bench.py."""
    P = count_params(cfg)
    weight, grad, optimizer = state_bytes_per_param(precision, strategy.autocast and precision.act < 4)

    def part(per_param: int, sharded: bool) -> float:
        return P * per_param / (gpus if sharded else 1)

    state = {
        "weights": part(weight, strategy.shard_weights),
        "grads": part(grad, strategy.shard_grads),
        "optimizer": part(optimizer, strategy.shard_optimizer),
        "gathered": 0.0,
    }
    if strategy.shard_weights and gpus > 1:
        state["gathered"] = (2 if prefetch else 1) * largest_unit_params(cfg) * (weight + grad)
    return state


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class StrategyPlan:
    strategy: str
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    gathered_gib: float
    activations_gib: float
    activations_ckpt_gib: float
    total_gib: float
    total_ckpt_gib: float
    fits: bool
    fits_ckpt: bool
    max_micro_batch: int
    max_micro_batch_ckpt: int


@dataclass
class Plan:
    config: str
    parameters: int
    flops_per_token: float
    seq_len: int
    micro_batch: int
    gpus: int
    gpu: str
    gpu_memory_gib: float
    reserve_gib: float
    peak_flops: float
    precision: str
    attention: str
    strategies: list[StrategyPlan]
    tokens: float
    tokens_per_sec_per_gpu: float
    mfu: float
    gpu_hours: float
    wall_hours: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_micro_batch(static_bytes: float, per_sample_bytes: float, usable_bytes: float) -> int:
    """Largest b with static + b x per_sample <= usable (0 if not even one sequence fits)."""
    if per_sample_bytes <= 0:
        raise ValueError("per-sample activation bytes must be positive")
    return max(0, math.floor((usable_bytes - static_bytes) / per_sample_bytes))


def make_plan(cfg: ModelConfig, *, gpus: int, gpu_memory_gib: float, peak_flops: float, tokens: float,
              seq_len: int | None = None, micro_batch: int = 1, mfu: float = 0.4,
              tokens_per_sec_per_gpu: float | None = None, precision: str = "bf16",
              attention: str = "flash", reserve_gib: float = 2.0, gpu: str = "custom",
              config: str = "") -> Plan:
    """The whole estimate for one config on `gpus` GPUs of `gpu_memory_gib` each."""
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1 (got {gpus})")
    if micro_batch < 1:
        raise UserError(f"--micro-batch must be at least 1 (got {micro_batch})")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1] (got {mfu})")
    if gpu_memory_gib <= reserve_gib:
        raise UserError(f"--gpu-memory ({gpu_memory_gib} GiB) must exceed --reserve ({reserve_gib} GiB)")
    seq = seq_len or cfg.max_seq_len
    if seq > cfg.max_seq_len:
        raise UserError(f"--seq-len {seq} exceeds model.max_seq_len {cfg.max_seq_len}")
    prec = PRECISIONS[precision]
    usable = (gpu_memory_gib - reserve_gib) * GIB

    rows = []
    for strategy in STRATEGIES:
        state = model_state_bytes(cfg, prec, strategy, gpus)
        static = sum(state.values())
        autocast = strategy.autocast and prec.act < 4
        act = {ck: activation_bytes(cfg, prec, micro_batch, seq, checkpointing=ck, attention=attention,
                                    autocast=autocast) for ck in (False, True)}
        per_sample = {ck: act[ck] / micro_batch for ck in (False, True)}
        rows.append(StrategyPlan(
            strategy=strategy.name,
            weights_gib=state["weights"] / GIB, grads_gib=state["grads"] / GIB,
            optimizer_gib=state["optimizer"] / GIB, gathered_gib=state["gathered"] / GIB,
            activations_gib=act[False] / GIB, activations_ckpt_gib=act[True] / GIB,
            total_gib=(static + act[False]) / GIB, total_ckpt_gib=(static + act[True]) / GIB,
            fits=static + act[False] <= usable, fits_ckpt=static + act[True] <= usable,
            max_micro_batch=max_micro_batch(static, per_sample[False], usable),
            max_micro_batch_ckpt=max_micro_batch(static, per_sample[True], usable),
        ))

    fpt = flops_per_token(cfg, seq)
    if tokens_per_sec_per_gpu is not None:
        if tokens_per_sec_per_gpu <= 0:
            raise UserError("--tokens-per-sec-per-gpu must be positive")
        tps = tokens_per_sec_per_gpu
        mfu = tps * fpt / peak_flops
    else:
        tps = mfu * peak_flops / fpt
    gpu_hours = tokens / tps / 3600
    return Plan(config=config, parameters=count_params(cfg), flops_per_token=fpt, seq_len=seq,
                micro_batch=micro_batch, gpus=gpus, gpu=gpu, gpu_memory_gib=gpu_memory_gib,
                reserve_gib=reserve_gib, peak_flops=peak_flops, precision=precision, attention=attention,
                strategies=rows, tokens=tokens, tokens_per_sec_per_gpu=tps, mfu=mfu,
                gpu_hours=gpu_hours, wall_hours=gpu_hours / gpus)


# ----------------------------------------------------------------------------------------------
# Reading the config


class _ModelSection(Section):
    """Only the `model:` block; other sections belong to their stages and are checked there."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: ModelConfig


# Where a training config (train.engine.TrainConfig) states its sequence, batch and length.
_SEQ_KEY, _BATCH_KEY, _TOKENS_KEY = "train.seq_len", "train.micro_batch_size", "train.max_tokens"


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _configured_int(tree: dict[str, Any], key: str, source: str) -> int | None:
    value = _lookup(tree, key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 1 or value != int(value):
        raise UserError(f"config error: {source}: {key}: expected a positive integer (got {value!r})")
    return int(value)


@dataclass
class PlanInputs:
    model: ModelConfig
    seq_len: int | None  # train.seq_len
    micro_batch: int | None  # train.micro_batch_size
    tokens: int | None  # train.max_tokens


def read_plan_config(path: str, overrides: list[str] | None = None) -> PlanInputs:
    """The model and, where the config has them, the training sequence, batch and token budget."""
    raw = read_yaml(path)
    if overrides:
        raw = merge(raw, parse_overrides(overrides))
    if "model" not in raw:
        raise UserError(f"config error: {path}: no model: section")
    return PlanInputs(model=build(_ModelSection, raw, path).model,
                      seq_len=_configured_int(raw, _SEQ_KEY, path),
                      micro_batch=_configured_int(raw, _BATCH_KEY, path),
                      tokens=_configured_int(raw, _TOKENS_KEY, path))


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> float:
    """'500B', '500e9', '1.4T', '2,000,000' -> a float count."""
    m = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (try 500B, 5e11 or 2T)")
    value = float(m.group(1).replace(",", "").replace("_", ""))
    return value * _SUFFIX.get(m.group(2), 1.0)


# ----------------------------------------------------------------------------------------------
# Output


def _fmt_hours(hours: float) -> str:
    return f"{hours:,.0f} h ({hours / 24:,.1f} days)" if hours >= 48 else f"{hours:,.1f} h"


def render(plan: Plan) -> str:
    """A readable report: header, one row per strategy, then time."""
    gib = "GiB"
    lines = [
        f"model        {plan.config or '(config)'}: {plan.parameters:,} parameters, "
        f"{plan.flops_per_token:.3e} training FLOPs/token at seq {plan.seq_len:,}",
        f"hardware     {plan.gpus} x {plan.gpu} ({plan.gpu_memory_gib:g} {gib}, {plan.reserve_gib:g} {gib} reserved "
        f"for CUDA context, NCCL and fragmentation; {plan.peak_flops / 1e12:,.0f} TFLOP/s peak)",
        f"precision    {PRECISIONS[plan.precision].name}; attention: {plan.attention}",
        "",
        f"memory per GPU ({gib}) at micro batch {plan.micro_batch} x {plan.seq_len:,} tokens; "
        f"'ckpt' = activation checkpointing per block",
    ]
    header = ("strategy", "weights", "grads", "optim", "gathered", "activ", "activ ckpt", "total",
              "total ckpt", "max mb", "max mb ckpt")
    rows = [header]
    for s in plan.strategies:
        def total(v: float, fits: bool) -> str:
            return f"{v:,.1f}" + ("" if fits else " !")
        rows.append((s.strategy, f"{s.weights_gib:,.1f}", f"{s.grads_gib:,.1f}", f"{s.optimizer_gib:,.1f}",
                     f"{s.gathered_gib:,.1f}", f"{s.activations_gib:,.1f}", f"{s.activations_ckpt_gib:,.1f}",
                     total(s.total_gib, s.fits), total(s.total_ckpt_gib, s.fits_ckpt),
                     str(s.max_micro_batch), str(s.max_micro_batch_ckpt)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    lines += [
        "(! = does not fit; max mb = largest micro batch that fits, 0 = none)",
        "",
        f"time         {plan.tokens:,.0f} tokens at {plan.tokens_per_sec_per_gpu:,.0f} tokens/s/GPU "
        f"(MFU {plan.mfu:.1%}): {plan.gpu_hours:,.0f} GPU hours = {_fmt_hours(plan.wall_hours)} on {plan.gpus} GPUs",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


ACCEPTS_OVERRIDES = True  # leftover `key.path=value` arguments are config overrides (see cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML with a model: section (e.g. configs/7b.yaml)")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs (all nodes together)")
    parser.add_argument("--gpu", choices=sorted(GPUS), help="GPU type: sets peak FLOP/s and default memory")
    parser.add_argument("--gpu-memory", type=float, help="memory per GPU in GiB (default: the --gpu's)")
    parser.add_argument("--gpu-flops", type=float, help="peak dense bf16 FLOP/s per GPU (overrides --gpu)")
    parser.add_argument("--tokens", type=parse_count, help="tokens to train on, e.g. 500B (default: train.max_tokens, else 20 x parameters)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate")
    parser.add_argument("--tokens-per-sec-per-gpu", type=float,
                        help="measured throughput; replaces --mfu (the implied MFU is printed)")
    parser.add_argument("--micro-batch", type=int, help="sequences per GPU per step (default: train.micro_batch_size, else 1)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: train.seq_len, else model.max_seq_len)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--attention", choices=("flash", "math"), default="flash",
                        help="flash: SDPA fused kernels (no s x s matrix); math: saves attention probabilities")
    parser.add_argument("--reserve", type=float, default=2.0,
                        help="GiB per GPU kept back for CUDA context, NCCL buffers and fragmentation")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    inputs = read_plan_config(args.config, getattr(args, "overrides", None))
    cfg = inputs.model
    gpu = GPUS.get(args.gpu) if args.gpu else None
    memory = args.gpu_memory if args.gpu_memory is not None else (gpu.memory_gib if gpu else None)
    if memory is None:
        raise UserError("give --gpu-memory GiB (or --gpu TYPE for its default memory)")
    peak = args.gpu_flops or (gpu.peak_flops if gpu else GPUS["a100"].peak_flops)
    gpu_name = args.gpu or ("custom GPU" if args.gpu_flops else "GPU (A100 peak assumed: give --gpu or --gpu-flops)")
    tokens = args.tokens or inputs.tokens or 20.0 * count_params(cfg)
    plan = make_plan(cfg, gpus=args.gpus, gpu_memory_gib=memory, peak_flops=peak, tokens=tokens,
                     seq_len=args.seq_len or inputs.seq_len, micro_batch=args.micro_batch or inputs.micro_batch or 1,
                     mfu=args.mfu, tokens_per_sec_per_gpu=args.tokens_per_sec_per_gpu,
                     precision=args.precision, attention=args.attention, reserve_gib=args.reserve,
                     gpu=gpu_name, config=args.config)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
    return 0
