"""Every fault the training stack is built to survive, in one list (FAULTS), each with the test that
shows it. Faults already proven elsewhere are referenced there (not run twice); the rest are here:
SIGKILL while a checkpoint is being written, a full disk or a read-only directory while saving or at
start, token shards that do not match their manifest or their tokenizer. docs/reliability.md is the
same list for readers; a test keeps the two in step."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_distributed import real_token_shards
from test_engine import learnable_docs, tiny_config
from test_packing import write_token_shards
from test_resume import STEPS, _cmd, _env, _run, assert_same_run, setup  # noqa: F401  (setup: a fixture)

from openllama import cli
from openllama.config import ModelConfig
from openllama.model import Llama, load_model
from openllama.train import checkpoint as ckpt
from openllama.train.engine import OptimConfig, build_optimizer

ROOT = Path(__file__).resolve().parents[1]

# (fault, what happens, the test that shows it). Keep docs/reliability.md in step.
FAULTS = [
    ("SIGKILL between checkpoints", "--resume continues from the newest complete checkpoint; "
     "weights and every step's loss equal an unbroken run bitwise",
     "test_resume.py::test_sigkill_mid_run_then_resume_equals_unbroken"),
    ("SIGKILL while a checkpoint is being written", "the half-written .tmp_step_N is never picked; "
     "--resume restarts from the previous one and ends bitwise equal to an unbroken run",
     "test_faults.py::test_sigkill_during_a_checkpoint_write_then_resume_equals_unbroken[before_complete]"),
    ("SIGKILL after the rename, before `latest` is updated", "the complete newer checkpoint wins over the "
     "lagging pointer; --resume ends bitwise equal",
     "test_faults.py::test_sigkill_during_a_checkpoint_write_then_resume_equals_unbroken[before_latest]"),
    ("stop and --resume", "N steps + --resume + N steps equals 2N steps bitwise",
     "test_resume.py::test_n_steps_then_resume_equals_2n_steps"),
    ("half-written or pointer-less checkpoint directories", "only directories with COMPLETE count",
     "test_engine.py::test_half_written_checkpoint_is_never_picked"),
    ("disk full during a checkpoint", "exit 2 with the path and 'No space left on device'; the partial "
     "directory is removed; the previous checkpoint and `latest` are intact and --resume works",
     "test_faults.py::test_disk_full_during_a_checkpoint_keeps_the_previous_one"),
    ("output directory turns read-only during a checkpoint", "CheckpointWriteError naming the file; "
     "previous checkpoint intact",
     "test_faults.py::test_read_only_checkpoint_directory_keeps_the_previous_one"),
    ("a checkpoint write fails on rank 0 of a multi-process run", "every rank raises the same "
     "CheckpointWriteError at once (none waits at a barrier until the collective timeout)",
     "test_faults.py::test_a_failed_checkpoint_write_on_rank_0_stops_every_rank"),
    ("unwritable --out at start", "exit 2 before any training",
     "test_faults.py::test_unwritable_output_directory_fails_before_training"),
    ("non-finite loss or gradient norm", "the update is skipped and logged (`skipped`)",
     "test_engine.py::test_a_non_finite_step_is_skipped_without_touching_weights"),
    ("N non-finite steps in a row", "the run stops naming the last good checkpoint, which stays intact",
     "test_engine.py::test_divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint"),
    ("resume with a config that does not match the checkpoint", "exit 2, one line naming the key",
     "test_engine.py::test_existing_run_needs_resume_and_same_model"),
    ("resume with another data layout (seq_len, batch, seed)", "exit 2, one line naming the key",
     "test_faults.py::test_resume_with_another_data_layout_is_refused"),
    ("token shard corrupted (same size) or truncated", "exit 2 naming the shard, before training",
     "test_faults.py::test_corrupted_token_shard_is_refused_before_training[flipped]"),
    ("token shards made with another tokenizer, or their tokenizer missing", "exit 2, one line",
     "test_faults.py::test_token_shards_of_another_tokenizer_are_refused"),
    ("launch contradicts train.strategy (FSDP/DeepSpeed env vs config)", "exit 2, one line, nothing written",
     "test_distributed.py::test_a_launch_that_contradicts_the_strategy_is_refused"),
]


def test_every_fault_has_a_test_and_a_row_in_the_docs():
    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    for fault, _, node in FAULTS:
        module, name = node.split("::")
        function = name.split("[")[0]
        assert callable(getattr(importlib.import_module(module[:-3]), function, None)), node
        assert function in doc, f"docs/reliability.md does not mention {function} ({fault})"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- SIGKILL while saving -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_complete", "before_latest"])
def test_sigkill_during_a_checkpoint_write_then_resume_equals_unbroken(setup, point, tmp_path):  # noqa: F811
    root, config = setup  # test_resume's config (dropout, accumulation, checkpoints every 4) and unbroken run
    run, marker, step = tmp_path / "killed", tmp_path / "paused", STEPS // 2
    env = {**_env(), ckpt.FAULT_ENV: f"{step}:{point}:{marker}"}
    proc = subprocess.Popen(_cmd(config, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the run never reached the fault point"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    root_ckpt = run / "checkpoints"
    before = f"step_{step - 4:07d}"
    assert (root_ckpt / "latest").read_text().strip() == before  # the pointer was never moved
    manager = ckpt.CheckpointManager(run)
    if point == "before_complete":  # every file written except COMPLETE: never a candidate
        half = root_ckpt / f".tmp_step_{step:07d}"
        assert (half / "state" / "trainer.json").is_file() and not (half / ckpt.COMPLETE).exists()
        assert manager.latest() == root_ckpt / before
    else:  # renamed into place, pointer lagging: the newer complete checkpoint wins
        assert manager.latest() == root_ckpt / f"step_{step:07d}"
    _run("--resume", config=config, out=run)
    assert_same_run(root / "unbroken", run)
    assert not list(root_ckpt.glob(".tmp_*"))  # the next save cleared the debris


# -- full disk, read-only directories --------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A small tmpfs at `path` (root, or CAP_SYS_ADMIN, needed; skip otherwise)."""
    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def make_read_only(path: Path) -> None:
    """Root ignores permission bits, so remount read-only; others get a chmod."""
    if os.geteuid() == 0:
        proc = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    else:
        for p in [path, *path.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)


@contextlib.contextmanager
def writable_dir(tmp_path: Path):
    """A directory that make_read_only can turn read-only: a tmpfs as root, a plain one otherwise."""
    if os.geteuid() == 0:
        with tmpfs(tmp_path / "fs", 16 << 20) as d:
            yield d
    else:
        d = tmp_path / "fs"
        d.mkdir()
        try:
            yield d
        finally:
            for p in [d, *d.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o755)


def _pages(path: Path) -> int:
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    tokens = write_token_shards(root / "tokens", learnable_docs(120), vocab_size=64)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tokens, max_steps=4, save_every=2, eval_every=0)))
    return tokens, config


def _pretrain(config: Path, out: Path, *extra: str) -> int:
    return cli.main(["pretrain", "--config", str(config), "--out", str(out), "--no-progress", *extra])


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(small, tmp_path, capsys):
    _, config = small
    # measure what one run with one checkpoint takes, then give the disk room for half another checkpoint
    assert _pretrain(config, tmp_path / "probe", "train.max_steps=2") == 0
    one_checkpoint = _pages(tmp_path / "probe" / "checkpoints" / "step_0000002")
    with tmpfs(tmp_path / "disk", _pages(tmp_path / "probe") + one_checkpoint // 2) as disk:
        capsys.readouterr()
        assert _pretrain(config, disk / "run") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "No space left on device" in err, err
        assert "step_0000004" in err and "last good checkpoint" in err and "step_0000002" in err
        manager = ckpt.CheckpointManager(disk / "run")
        assert manager.complete_steps() == [2] and manager.latest().name == "step_0000002"
        assert (disk / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000002"
        assert not list((disk / "run" / "checkpoints").glob(".tmp_*"))  # the partial save was removed
        load_model(manager.latest() / "model")  # still a loadable model
        shutil.copytree(disk / "run", tmp_path / "moved")
    # with room again the run resumes from the surviving checkpoint and finishes
    assert _pretrain(config, tmp_path / "moved", "--resume") == 0
    assert ckpt.CheckpointManager(tmp_path / "moved").complete_steps() == [2, 4]


def _tiny_training_state():
    model = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, multiple_of=16, max_seq_len=64))
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def test_read_only_checkpoint_directory_keeps_the_previous_one(tmp_path):
    model, optimizer, scheduler = _tiny_training_state()
    with writable_dir(tmp_path) as d:
        manager = ckpt.CheckpointManager(d / "run")
        first = manager.save(1, model, optimizer, scheduler, {"step": 1})
        make_read_only(d)
        with pytest.raises(ckpt.CheckpointWriteError, match=r"cannot write checkpoint step_0000002 .*"
                                                            r"last good checkpoint: .*step_0000001"):
            manager.save(2, model, optimizer, scheduler, {"step": 2})
        assert manager.latest() == first and manager.complete_steps() == [1]
        reloaded = load_model(first / "model")
        assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def _save_in_a_process_group(rank: int, world: int, init_file: str, run_dir: str, results) -> None:
    """One rank of a 2-process gloo group saving step 2 (a spawned process)."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model, optimizer, scheduler = _tiny_training_state()
        manager = ckpt.CheckpointManager(run_dir, rank=rank, barrier=dist.barrier)
        try:
            manager.save(2, model, optimizer, scheduler, {"step": 2})
            results.put((rank, "saved"))
        except ckpt.CheckpointWriteError as exc:
            results.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


def test_a_failed_checkpoint_write_on_rank_0_stops_every_rank(tmp_path):
    import multiprocessing

    model, optimizer, scheduler = _tiny_training_state()
    spawn = multiprocessing.get_context("spawn")
    with writable_dir(tmp_path) as d:
        first = ckpt.CheckpointManager(d / "run").save(1, model, optimizer, scheduler, {"step": 1})
        make_read_only(d)  # rank 0 cannot create .tmp_step_0000002; rank 1 only writes after it did
        results = spawn.Queue()
        procs = [spawn.Process(target=_save_in_a_process_group,
                               args=(r, 2, str(tmp_path / "pg_init"), str(d / "run"), results)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            outcome = dict(results.get(timeout=90) for _ in procs)  # a hung rank never reports
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
        assert set(outcome) == {0, 1}
        assert outcome[0] == outcome[1], outcome  # the same error on every rank
        assert "cannot write checkpoint step_0000002" in outcome[0] and f"last good checkpoint: {first}" in outcome[0]
        assert ckpt.CheckpointManager(d / "run").complete_steps() == [1]


def test_unwritable_output_directory_fails_before_training(small, tmp_path, capsys):
    _, config = small
    with writable_dir(tmp_path) as d:
        make_read_only(d)
        assert _pretrain(config, d / "run") == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write the run directory" in err and len(err.splitlines()) == 1, err


def test_resume_with_another_data_layout_is_refused(small, tmp_path, capsys):
    _, config = small
    assert _pretrain(config, tmp_path / "run", "train.max_steps=2") == 0
    capsys.readouterr()
    assert _pretrain(config, tmp_path / "run", "--resume", "train.max_steps=4", "train.seq_len=16") == 2
    err = capsys.readouterr().err.strip()
    assert "seq_len" in err and len(err.splitlines()) == 1, err


# -- inputs checked before work -------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_corrupted_token_shard_is_refused_before_training(small, tmp_path, capsys, damage):
    tokens, config = small
    broken = tmp_path / "tokens"
    shutil.copytree(tokens, broken)
    shard = broken / "shard_00001.bin"
    data = bytearray(shard.read_bytes())
    if damage == "flipped":
        data[100] ^= 0x01
    else:
        data = data[:-2]
    shard.write_bytes(bytes(data))
    assert _pretrain(config, tmp_path / "run", f"data.train={broken}") == 2
    err = capsys.readouterr().err.strip()
    assert str(shard) in err and len(err.splitlines()) == 1, err
    assert ("sha256" in err) if damage == "flipped" else ("bytes, manifest says" in err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no training started


def test_token_shards_of_another_tokenizer_are_refused(tmp_path, capsys):
    from openllama.tokenizer import train_tokenizer

    tokens, tok = real_token_shards(tmp_path)
    cfg = tiny_config(tokens, max_steps=2)
    cfg["model"]["vocab_size"] = 2048
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    # the shards' own tokenizer is accepted (one step is enough to know training started)
    assert _pretrain(config, tmp_path / "ok", "train.max_steps=1") == 0
    # replace it by another tokenizer (another vocabulary) under the same path
    shutil.rmtree(tok)
    train_tokenizer([tmp_path / "shards"], tok, vocab_size=1900, sample_bytes=200_000, character_coverage=0.98)
    capsys.readouterr()
    assert _pretrain(config, tmp_path / "other") == 2
    err = capsys.readouterr().err.strip()
    assert "was tokenized with tokenizer" in err and str(tok) in err and len(err.splitlines()) == 1, err
    # and without it at all
    shutil.rmtree(tok)
    assert _pretrain(config, tmp_path / "none") == 2
    err = capsys.readouterr().err.strip()
    assert "is missing" in err and len(err.splitlines()) == 1, err
