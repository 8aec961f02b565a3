"""Atomic, resumable checkpoints.

    RUN/checkpoints/step_0000100/
        model/          an openllama model directory (save_model) + the tokenizer files: export,
                        evaluate and generate read it as it is; of a sharded (FSDP2) run only the
                        config, naming ../state/dcp/ for the weights
        state/          optimizer.pt (full state keyed by parameter name: loads at any world size and
                        strategy), scheduler.pt, rng_rank{R}.pt (python, numpy, torch CPU + CUDA, one
                        per rank), trainer.json (step, tokens seen, data position, objective state);
                        of a sharded run no optimizer.pt but dcp/ (torch.distributed.checkpoint: each
                        rank's shards of model and optimizer, written by that rank; loads at any world
                        size); under DeepSpeed deepspeed/ (DeepSpeed's own save_checkpoint: the module
                        and one ZeRO optimizer partition per rank; same world size to resume)
        COMPLETE        written last
    RUN/checkpoints/latest   text: the name of the newest complete step directory

A checkpoint is assembled in `checkpoints/.tmp_step_...`, files fsynced, then renamed into place, and
only then is `latest` replaced (temp file + rename). A directory without COMPLETE is never loaded, so a
kill at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..artifacts import (CHECKPOINTS, COMPLETE, CONFIG_FILE, LATEST, MODEL_FILE, RUN_CONFIG, complete_steps,
                         latest_checkpoint, step_dir_name)
from ..atomic import fsync_dir, fsync_tree, write_text_atomic
from ..errors import UserError
from ..model import save_model, write_model_config, write_safetensors
from ..tokenizer import copy_tokenizer_files

DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "zero"
DCP_DIR = "dcp"  # state/dcp/: a sharded run's model and optimizer, one file of shards per rank
TRAINER_STATE = "trainer.json"


def state_file(ckpt: Path, name: str) -> Path:
    """The file of one named piece of training state (optimizer, scheduler, scaler, objective,
    rng_rank{R}) in a checkpoint: the engine names pieces, this module owns where they live."""
    return ckpt / "state" / f"{name}.pt"


def has_state(ckpt: Path, name: str) -> bool:
    return state_file(ckpt, name).is_file()


def prepare_run_dir(out: Path, config: dict, tokenizer_dir: Path | None) -> None:
    """A fresh or resumed run directory: its full config (RUN/config.yaml) and tokenizer files."""
    import yaml

    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / RUN_CONFIG, yaml.safe_dump(config, sort_keys=False))
        copy_tokenizer_files(tokenizer_dir, out / "tokenizer")
    except OSError as exc:  # checked before any training: an unwritable --out fails in seconds
        raise UserError(f"{exc.filename or out}: cannot write the run directory ({exc.strerror or exc})") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(ckpt: Path, rank: int) -> bool:
    """This rank's RNG streams as saved; False when the checkpoint has none for it (more ranks now)."""
    if not has_state(ckpt, f"rng_rank{rank}"):
        return False
    set_rng_state(load_state(ckpt, f"rng_rank{rank}"))
    return True


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, read-only or vanished directory)."""


FAULT_ENV = "OPENLLAMA_FAULT_PAUSE"


def _fault_point(step: int, point: str) -> None:
    """Fault-injection hook for tests/test_faults.py: with OPENLLAMA_FAULT_PAUSE=STEP:POINT:MARKER
    rank 0 stops at POINT of saving STEP ("before_complete": every file written but COMPLETE;
    "before_latest": renamed into place, `latest` not yet updated), creates the file MARKER and
    waits to be killed."""
    spec = os.environ.get(FAULT_ENV, "").split(":", 2)
    if len(spec) == 3 and spec[:2] == [str(step), point]:
        import time

        Path(spec[2]).write_text(point, encoding="utf-8")
        time.sleep(3600)


def _write_failure(exc: BaseException, root: Path) -> OSError | None:
    """The OSError behind a failed write, or None if `exc` is not one. torch.save's zip writer
    (RuntimeError) and safetensors (SafetensorError) drop the errno, so look at the filesystem."""
    if isinstance(exc, OSError):
        return exc if exc.strerror else OSError(errno.EIO, str(exc))
    if not isinstance(exc, RuntimeError) and type(exc).__name__ != "SafetensorError":
        return None
    try:
        fs = os.statvfs(root)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(root))
    if fs.f_bavail * fs.f_frsize < (1 << 20) or "No space left" in str(exc):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root))
    return None


def _optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """Keyed by parameter name with full tensors (loads at any world size and strategy); a model the
    name mapping cannot describe (e.g. an optimizer over parameters outside it) keeps the plain form."""
    from .distributed import full_optimizer_state

    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    try:
        return full_optimizer_state(model, inner)
    except (KeyError, RuntimeError, ValueError):
        return inner.state_dict()


class CheckpointManager:
    """Saves and finds checkpoints of one run. Every rank calls `save` (each writes its RNG state);
    rank 0 writes everything else and publishes the directory. `barrier` synchronises ranks."""

    def __init__(self, run_dir: str | Path, rank: int = 0, keep_last: int = 3, barrier=lambda: None,
                 tokenizer_dir: Path | None = None):
        self.root = Path(run_dir) / CHECKPOINTS
        self.rank, self.keep_last, self.barrier = rank, keep_last, barrier
        self.tokenizer_dir = tokenizer_dir
        self._pending = None  # an asynchronous save still being written: (future, phases, tmp, final)
        self._async_group = None

    # -- save ----------------------------------------------------------------------------------

    def save(self, step: int, model: torch.nn.Module, optimizer, scheduler, trainer_state: dict,
             extra_state: dict[str, object] | None = None, deepspeed_engine=None,
             asynchronous: bool = False) -> Path:
        """Every rank calls this (collective under FSDP2 and DeepSpeed). A failed write (disk full,
        read-only directory) on any rank removes the partial directory and raises the same
        CheckpointWriteError on every rank (the ranks agree after each phase, so none is left waiting
        at a barrier); the previous checkpoint and `latest` are untouched.
        A sharded (FSDP2) model is saved with torch.distributed.checkpoint: every rank writes its own
        shards of model and optimizer to state/dcp/, and model/ holds the config and tokenizer with a
        pointer to them (nothing is gathered). `asynchronous` (sharded only): the shards are copied to
        memory and written by a background thread while training goes on; the directory is published
        (COMPLETE, `latest`) by `wait()`, called by the next save or at the end of training. With
        `deepspeed_engine` the optimizer state is DeepSpeed's own checkpoint."""
        from .distributed import dcp_state, is_sharded, zero_stage

        self.wait()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        sharded = is_sharded(model)
        if sharded and hasattr(model, "save_checkpoint"):
            raise UserError("train.strategy=fsdp2 cannot save a wrapped model (LoRA, reward head) yet")
        optimizer_state = None if deepspeed_engine is not None or sharded else _optimizer_state(model, optimizer)
        zero3 = zero_stage(deepspeed_engine) == 3
        pending = []

        def prepare() -> None:
            if self.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                (tmp / "state").mkdir(parents=True)

        def write() -> None:
            torch.save(rng_state(), state_file(tmp, f"rng_rank{self.rank}"))
            if deepspeed_engine is not None:  # collective: every rank writes its ZeRO partition
                deepspeed_engine.save_checkpoint(str(tmp / "state" / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                                 save_latest=False)
            if zero3:  # collective: parameters gathered one at a time, written by rank 0 as they come
                self._write_zero3_model(model, tmp / "model")
            if sharded:  # collective: every rank writes its own shards
                state = dcp_state(model, getattr(optimizer, "optimizer", optimizer))
                pending.append(self._write_dcp(state, tmp / "state" / DCP_DIR, asynchronous))
            if self.rank == 0:
                self._write_rank0_files(tmp, model, sharded or zero3, optimizer_state, scheduler, trainer_state,
                                        extra_state)

        def publish() -> None:
            if self.rank == 0:
                self._publish(step, tmp, final)

        self._run_phases((prepare, write), tmp, final)
        if pending and pending[0] is not None:  # published once the background write is done
            self._pending = (pending[0], (publish,), tmp, final)
        else:
            self._run_phases((publish,), tmp, final)
        return final

    def wait(self) -> None:
        """Finish and publish an asynchronous save, if one is under way (every rank calls it)."""
        if self._pending is None:
            return
        future, phases, tmp, final = self._pending
        self._pending = None
        self._run_phases((future.result, *phases), tmp, final)

    def _write_dcp(self, state: dict, path: Path, asynchronous: bool):
        import torch.distributed.checkpoint as dcp

        if not asynchronous:
            dcp.save(state, checkpoint_id=str(path))
            return None
        if self._async_group is None:  # its own group: the background thread's
            import torch.distributed as dist  # collectives must not interleave with training's

            self._async_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        return dcp.async_save(state, checkpoint_id=str(path), process_group=self._async_group)

    def _write_zero3_model(self, model: torch.nn.Module, directory: Path) -> None:
        from .distributed import zero3_tensors

        tensors = zero3_tensors(model)
        if self.rank != 0:
            for _ in tensors:  # take part in every gather
                pass
            return
        directory.mkdir(parents=True, exist_ok=True)
        shapes = [(name, tuple(p.ds_shape)) for name, p in model.named_parameters()]  # tied: listed once
        write_safetensors(directory / MODEL_FILE, [(name, shape, lambda: next(tensors)[1]) for name, shape in shapes])

    def _write_rank0_files(self, tmp: Path, model, partitioned: bool, optimizer_state, scheduler,
                           trainer_state: dict, extra_state: dict | None) -> None:
        if partitioned and (tmp / "model" / MODEL_FILE).is_file():  # ZeRO-3: the weights are written
            write_model_config(model.cfg, tmp / "model")
        elif partitioned:  # model/ points at the shards: export and load_model read them tensor by tensor
            write_model_config(model.cfg, tmp / "model", {"dcp": f"../state/{DCP_DIR}"})
        else:
            # a wrapper (LoRA, reward head) writes its own exportable model dir via save_checkpoint
            (model.save_checkpoint if hasattr(model, "save_checkpoint") else lambda d: save_model(model, d))(tmp / "model")
        copy_tokenizer_files(self.tokenizer_dir, tmp / "model")
        if optimizer_state is not None:
            torch.save(optimizer_state, state_file(tmp, "optimizer"))
        torch.save(scheduler.state_dict(), state_file(tmp, "scheduler"))
        for name, obj in (extra_state or {}).items():
            torch.save(obj, state_file(tmp, name))
        (tmp / "state" / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")

    def _publish(self, step: int, tmp: Path, final: Path) -> None:
        _fault_point(step, "before_complete")
        (tmp / COMPLETE).write_text(f"{step}\n", encoding="utf-8")
        fsync_tree(tmp)
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        _fault_point(step, "before_latest")
        write_text_atomic(self.root / LATEST, final.name + "\n")
        self._prune()

    def _run_phases(self, phases, tmp: Path, final: Path) -> None:
        for phase in phases:
            error, failure = None, None
            try:
                phase()
            except Exception as exc:  # ENOSPC, EROFS, EACCES, EDQUOT ...: say what and where, keep the last good one
                error, failure = exc, self._describe_failure(exc, final)
            failure = self._agree(failure)  # also the barrier between phases
            if failure is not None:
                if self.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                if error is not None and _write_failure(error, self.root) is None:
                    raise error  # a bug, not a write failure: the rank that hit it shows the real traceback
                raise CheckpointWriteError(failure) from None

    def _describe_failure(self, exc: BaseException, final: Path) -> str:
        cause = _write_failure(exc, self.root)
        if cause is None:
            return f"checkpoint {final.name} failed on rank {self.rank}: {type(exc).__name__}: {exc}"
        previous = self.latest()
        return (f"{cause.filename or final.parent / ('.tmp_' + final.name)}: cannot write checkpoint {final.name} "
                f"({cause.strerror}); last good checkpoint: {previous if previous is not None else 'none'}")

    def _agree(self, failure: str | None) -> str | None:
        """Every rank learns the first failure of any rank (None: all went well). A collective, so
        it is also the barrier between the phases of a save."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, failure)
            return next((f for f in everyone if f is not None), None)
        self.barrier()
        return failure

    def _prune(self) -> None:
        complete = self.complete_steps()
        for step in complete[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- find / load ---------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        return complete_steps(self.root)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)


def check_model_matches(ckpt: Path, model_cfg) -> None:
    """Resuming with another model shape is a user error, not a crash deep inside load_state_dict."""
    meta = json.loads((ckpt / "model" / CONFIG_FILE).read_text(encoding="utf-8"))["model"]
    ours = model_cfg.model_dump(mode="json")
    diff = [k for k in sorted(set(meta) | set(ours)) if meta.get(k) != ours.get(k)]
    if diff:
        shown = ", ".join(f"model.{k}: checkpoint {meta.get(k)!r} vs config {ours.get(k)!r}" for k in diff[:3])
        raise UserError(f"{ckpt}: checkpoint was trained with a different model ({shown})")


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model" / MODEL_FILE), device="cpu")
    if getattr(model.cfg, "tie_embeddings", False):
        state["output.weight"] = state["tok_embeddings.weight"]
    with torch.no_grad():
        own = model.state_dict()
        for name, tensor in state.items():
            own[name].copy_(tensor)


def load_state(ckpt: Path, name: str, map_location="cpu"):
    # our own files (optimizer/scheduler/RNG state, including numpy RNG tuples): full unpickling
    return torch.load(state_file(ckpt, name), map_location=map_location, weights_only=False)


def check_resume_topology(ckpt: Path, strategy: str, world: int) -> None:
    """A DeepSpeed checkpoint holds one ZeRO optimizer partition per rank: it resumes under DeepSpeed
    at the world size that wrote it, and the other strategies' name-keyed optimizer.pt cannot be
    loaded into DeepSpeed's flat partitions. Anything else resumes anywhere (see docs/scaling.md)."""
    state = load_trainer_state(ckpt)
    saved, saved_world = state.get("strategy", "ddp"), state.get("world")
    has_ds = (ckpt / "state" / DEEPSPEED_DIR).is_dir()
    if strategy == "deepspeed" and not has_ds:
        raise UserError(f"{ckpt}: written under train.strategy={saved}, which DeepSpeed cannot resume; resume it with "
                        f"train.strategy={saved} (or start a new run from its model/ directory)")
    if strategy != "deepspeed" and has_ds and not has_state(ckpt, "optimizer"):
        raise UserError(f"{ckpt}: a DeepSpeed checkpoint; resume it with train.strategy=deepspeed at {saved_world} "
                        f"processes (or start a new run from its model/ directory)")
    if strategy == "deepspeed" and saved_world != world:
        raise UserError(f"{ckpt}: DeepSpeed checkpoint written by {saved_world} processes, resumed by {world}; ZeRO "
                        f"optimizer partitions resume only at the same world size (launch {saved_world} processes)")


def load_deepspeed_state(ckpt: Path, engine) -> None:
    """Every rank restores the module and its own ZeRO optimizer partition (exact, same world size)."""
    path, _ = engine.load_checkpoint(str(ckpt / "state" / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"{ckpt / 'state' / DEEPSPEED_DIR}: DeepSpeed could not load this checkpoint")


def has_dcp(ckpt: Path) -> bool:
    return (ckpt / "state" / DCP_DIR).is_dir()


def load_dcp(ckpt: Path, model: torch.nn.Module, optimizer) -> None:
    """Model and optimizer from a sharded checkpoint, at any world size (DCP reshards on load)."""
    from .distributed import load_dcp_state

    load_dcp_state(model, getattr(optimizer, "optimizer", optimizer), ckpt / "state" / DCP_DIR)


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state" / TRAINER_STATE).read_text(encoding="utf-8"))
