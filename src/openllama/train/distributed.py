"""How the engine spreads a model over ranks: the strategy check and FSDP2.

Strategies (`train.strategy`):
    ddp     Accelerate's data parallel (DDP on GPUs, gloo on CPUs); also what one process runs.
    fsdp2   PyTorch FSDP2: `fully_shard` on every `Block`, then on the root, over a 1-D device mesh
            of all ranks. Parameters, gradients and optimizer state are sharded.
    deepspeed  DeepSpeed ZeRO stage 1, 2 or 3 through Accelerate's DeepSpeedPlugin (optional extra):
            optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3) sharded.
    auto    what the launch asks for: fsdp2 under `accelerate launch --config_file fsdp2.yaml`
            (ACCELERATE_USE_FSDP=true), deepspeed under a deepspeed_zero*.yaml
            (ACCELERATE_USE_DEEPSPEED=true), else ddp.

FSDP2 is applied here, not through `accelerator.prepare`, on CPU and GPU alike: Accelerate never turns
FSDP on for CPU processes (it silently runs DDP instead), and one code path means the CPU tests
exercise exactly what a GPU run does. The unit layout is the one Accelerate's FSDP2 plugin builds
(each Block, then the root, which holds the tied embedding/output weight once).

Checkpoints stay world-size free under every strategy: `full_model_state` and `full_optimizer_state`
gather full tensors (collective calls: every rank must make them; under DDP or one process they are
plain state dicts). The optimizer state is keyed by parameter name, so it loads into a model sharded
over any number of ranks, or not sharded at all.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from ..errors import UserError

Strategy = Literal["auto", "ddp", "fsdp2", "deepspeed"]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def check_launch(requested: Strategy, cpu: bool) -> str:
    """Reconcile `train.strategy` with what the launcher exported, before any process group exists.
    Returns "ddp", "fsdp2" or "deepspeed"; a contradiction is a one-line UserError. `cpu` is
    train.cpu: Accelerator(cpu=True) silently ignores DeepSpeed, so the two cannot go together."""
    fsdp_env = _env_true("ACCELERATE_USE_FSDP")
    if _env_true("ACCELERATE_USE_DEEPSPEED") or requested == "deepspeed":
        if requested in ("ddp", "fsdp2"):
            raise UserError(f"train.strategy={requested} but the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true); "
                            f"set train.strategy=deepspeed or auto, or launch with configs/accelerate/ddp.yaml")
        if fsdp_env:
            raise UserError("the launch asks for both DeepSpeed and FSDP (ACCELERATE_USE_DEEPSPEED and "
                            "ACCELERATE_USE_FSDP); pick one accelerate config")
        if cpu:  # on a machine without GPUs leave train.cpu unset: DeepSpeed then runs on its CPU accelerator
            raise UserError("train.cpu=true cannot run DeepSpeed (Accelerate silently ignores DeepSpeed under cpu=True); "
                            "unset train.cpu, or use train.strategy=fsdp2 or ddp (see docs/scaling.md, DeepSpeed)")
        return "deepspeed"
    if fsdp_env:
        version = os.environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise UserError(f"the launch asks for FSDP version {version} (FSDP_VERSION); the engine supports FSDP2 "
                            f"only: set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp2.yaml)")
        if requested == "ddp":
            raise UserError("train.strategy=ddp but the launch asks for FSDP (ACCELERATE_USE_FSDP=true); "
                            "set train.strategy=fsdp2 or auto, or launch with configs/accelerate/ddp.yaml")
        return "fsdp2"
    return "fsdp2" if requested == "fsdp2" else "ddp"


def deepspeed_plugin(grad_accum_steps: int, micro_batch_size: int, grad_clip: float | None, world: int,
                     plugin=None):
    """Accelerate's DeepSpeedPlugin with the batch and clipping values filled in from the training
    config (`plugin`: the one `accelerate launch --config_file deepspeed_zero*.yaml` made, else a new
    ZeRO-1 plugin, or stage ACCELERATE_DEEPSPEED_ZERO_STAGE). Accelerate fills DeepSpeed's `auto`
    values from a DataLoader, which the engine does not use; a value the DeepSpeed config sets to
    something else than the training config is refused rather than silently overridden."""
    try:
        import deepspeed  # noqa: F401  (fails here, with the reason, rather than inside prepare)
    except Exception as exc:  # ImportError, or a build/accelerator error raised at import
        raise UserError(f"train.strategy=deepspeed needs DeepSpeed: pip install 'openllama[deepspeed]' "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if plugin is None:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(zero_stage=int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")))
    config = plugin.deepspeed_config
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (1, 2, 3):
        raise UserError(f"DeepSpeed ZeRO stage {stage}: the engine drives ZeRO stages 1, 2 and 3")
    ours = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum_steps,
            "gradient_clipping": float(grad_clip or 0.0)}  # 0: DeepSpeed does not clip (the norm is still computed)
    for key, value in ours.items():
        theirs = config.get(key, "auto")
        if theirs not in ("auto", None) and float(theirs) != float(value):
            raise UserError(f"the DeepSpeed config sets {key}={theirs} but the training config says {value}; "
                            f"remove {key} from the DeepSpeed/accelerate config (train.* and optim.grad_clip decide it)")
        config[key] = value
    config["train_batch_size"] = micro_batch_size * grad_accum_steps * world
    return plugin


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks with torch.distributed itself (Accelerate's gather/reduce consult its own
    process count, which is wrong for DeepSpeed on CPU); returns `tensor` reduced in place."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_world(num_processes: int) -> None:
    """The accelerator must see every process the launcher started (Accelerate on a CPU machine
    without cpu=True silently makes each process a run of its own)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if num_processes != launched:
        raise UserError(f"the launcher started {launched} processes (WORLD_SIZE) but the accelerator joined "
                        f"{num_processes}; on a machine without GPUs set train.cpu=true")


def shard_model(model: torch.nn.Module, device: torch.device, mixed_precision: str,
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """fully_shard each Block, then the root, over all ranks; the model must already be on `device`.
    Returns the same module object (FSDP2 shards in place)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision == "fp16":
        raise UserError("train.precision=fp16 is not supported with train.strategy=fsdp2 (use bf16 or fp32)")
    if hasattr(model, "save_checkpoint"):  # its checkpoint would need its own gather; refuse before training
        raise UserError(f"train.strategy=fsdp2 does not support {type(model).__name__} (LoRA, reward head) yet; use ddp")
    layers = getattr(model, "layers", None)
    if layers is None:
        raise UserError(f"train.strategy=fsdp2: {type(model).__name__} has no `layers` to shard (use ddp)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict = {"mesh": mesh}
    if mixed_precision == "bf16":  # bf16 compute and all-gathers, fp32 master weights and gradient reduction
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors by parameter name (collective under FSDP2; only rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name with full tensors (collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state saved by `full_optimizer_state` (any world size, any strategy), or the plain
    `optimizer.state_dict()` of older checkpoints (integer keys; same strategy only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(p, int) for g in state["param_groups"] for p in g["params"]):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    for group in optimizer.param_groups:  # comes back as a list; AdamW's own state_dict keeps a tuple
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])


def scalar(value) -> float:
    """A norm from clip_grad_norm_ as a float: FSDP2 returns a DTensor."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


# ----------------------------------------------------------------------------------------------
# Sharded from birth: a model built on the meta device never exists whole on one rank


def on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def materialize(model: torch.nn.Module, device: torch.device, seed: int | None) -> None:
    """Real storage on `device` for a model built on the meta device: under FSDP2 (sharded first)
    only this rank's shards. With a seed, the initial weights (`Llama.init_weights`: blocks of rows
    drawn from (seed, name, block), so every world size gets the same full model, bitwise)."""
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if seed is not None:
        model.init_weights(seed)


@torch.no_grad()
def load_weights(model: torch.nn.Module, model_dir) -> None:
    """Fill every parameter with the rows this rank holds, read from an openllama model directory
    (model.safetensors) one tensor slice at a time: a sharded rank never reads the full model, an
    unsharded one never holds a second copy of it. A tied output weight is the embedding. The
    model/ of a sharded run's checkpoint is read from its DCP shards (resharded by DCP)."""
    from pathlib import Path

    from safetensors import safe_open

    from ..artifacts import MODEL_FILE
    from ..model import StoredWeights, local_rows

    stored = StoredWeights(model_dir)
    if stored.dcp is not None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = get_model_state_dict(model)
        dcp.load({"model": state}, checkpoint_id=str(stored.dcp), no_dist=not dist.is_initialized())
        set_model_state_dict(model, state)
        return
    path = Path(stored.directory) / MODEL_FILE
    with safe_open(str(path), framework="pt", device="cpu") as f:
        stored = set(f.keys())
        for name, param in model.named_parameters():
            if name not in stored:
                raise UserError(f"{path}: no tensor {name} (a model of another shape?)")
            local, first = local_rows(param)
            if local.numel():
                rows = f.get_slice(name)[first:first + local.shape[0]]
                local.copy_(rows.to(local.dtype))


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints: torch.distributed.checkpoint (DCP), every rank writing its own shards


def dcp_state(model: torch.nn.Module, optimizer) -> dict:
    """Model and optimizer state as DCP saves and loads them: DTensor shards under FSDP2 (each
    rank's own), plain tensors otherwise; keyed by parameter name, so it reshards on load."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def load_dcp_state(model: torch.nn.Module, optimizer, path) -> None:
    """Restore model and optimizer from a DCP checkpoint written at any world size (DCP reads each
    rank's rows of every tensor, whatever the ranks that wrote them held)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    for group in optimizer.param_groups:  # comes back as a list; AdamW's own state_dict keeps a tuple
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])


# ----------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3: parameters partitioned, gathered by DeepSpeed around each module's forward


def zero_stage(ds_engine) -> int:
    return int(ds_engine.zero_optimization_stage()) if ds_engine is not None else 0


def prepare_zero3(model: torch.nn.Module) -> None:
    """The output projection's weight is used by the model's own forward (the fused loss reads it
    directly rather than calling `output`), which ZeRO-3 must be told to gather there."""
    import deepspeed

    deepspeed.zero.register_external_parameter(model, model.output.weight)


def zero3_tensors(model: torch.nn.Module):
    """(name, full CPU tensor) of every parameter, gathered one at a time (collective: every rank
    iterates; the tensors are meaningful on rank 0). A tied weight is yielded once."""
    import deepspeed

    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield name, param.detach().to("cpu", copy=True)
