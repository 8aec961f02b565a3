"""Distributed training on CPU (gloo), through the real command under torchrun: FSDP2 at 2 ranks follows
the same trajectory as 1 process with 2 accumulation steps; a checkpoint written at one world size
resumes at another (2 -> 1, 1 -> 2) on the same trajectory; the data order is partitioned across
ranks without overlap or gap on token shards made by the real tokenize path; and a launch that
contradicts train.strategy is refused before any work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_engine import learnable_docs, tiny_config
from test_packing import write_token_shards

from openllama import cli
from openllama.model import StoredWeights, load_model
from openllama.train.metrics import read_metrics

STEPS, HALF = 10, 5
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as conftest's shared_data
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def pretrain(config: Path, out: Path, launcher: list[str], *extra: str, env: dict | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [*launcher, "-m", "openllama.cli", "pretrain", "--config", str(config), "--out", str(out), "--no-progress", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The checkpoint's full weights, whatever its format (safetensors, or a sharded run's DCP shards)."""
    stored = StoredWeights(run / "checkpoints" / f"step_{step:07d}" / "model")
    return {name: stored.get(name) for name in stored.names()}


def assert_same_trajectory(a: Path, b: Path, atol: float = 1e-5) -> None:
    ra, rb = train_records(a), train_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, STEPS + 1))
    for x, y in zip(ra, rb):
        assert x["tokens"] == y["tokens"] == 2 * 4 * 32  # the same global batch every step
        assert abs(x["loss"] - y["loss"]) < atol, (x["step"], x["loss"], y["loss"])
    wa, wb = weights(a, STEPS), weights(b, STEPS)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


def branch_at(run: Path, step: int, new: Path) -> Path:
    """A copy of `run` as it was right after checkpoint `step` (later checkpoints removed)."""
    shutil.copytree(run, new)
    for d in (new / "checkpoints").glob("step_*"):
        if int(d.name[5:]) > step:
            shutil.rmtree(d)
    (new / "checkpoints" / "latest").write_text(f"step_{step:07d}\n")
    return new


def event(run: Path, kind: str) -> dict:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == kind][-1]


def tied_run_config(root: Path) -> Path:
    """Token shards and a config for the multi-process comparisons: the tiny model with tied
    embeddings, STEPS steps, checkpoints and evaluations every HALF."""
    tokens = write_token_shards(root / "tokens", learnable_docs(300), vocab_size=64)
    cfg = tiny_config(tokens, max_steps=STEPS, save_every=HALF, eval_every=HALF, keep_last=5)
    cfg["model"]["tie_embeddings"] = True
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with 2 accumulation steps, and FSDP2 over 2 ranks: 10 steps each, checkpoints at
    5 and 10. Tied embeddings on, so the shared embedding/output weight is sharded once."""
    root = tmp_path_factory.mktemp("dist")
    config = tied_run_config(root)
    pretrain(config, root / "one", [sys.executable], "train.grad_accum_steps=2")
    pretrain(config, root / "fsdp2", TORCHRUN, "train.strategy=fsdp2")
    return root, config


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_rank_with_two_accumulation_steps(runs):
    root, _ = runs
    start = event(root / "fsdp2", "start")
    assert start["world"] == 2 and start["strategy"] == "fsdp2"
    assert event(root / "one", "start")["strategy"] == "ddp"  # one process: nothing to shard
    assert_same_trajectory(root / "one", root / "fsdp2")
    assert train_records(root / "one")[-1]["loss"] < train_records(root / "one")[0]["loss"] - 0.5
    # nothing was gathered: each rank wrote its own shards (DCP); model/ names them, and load_model
    # reads them without torch.distributed, the tied weight once
    step_dir = root / "fsdp2" / "checkpoints" / f"step_{STEPS:07d}"
    assert sorted(p.name for p in (step_dir / "state" / "dcp").iterdir()) == [".metadata", "__0_0.distcp",
                                                                               "__1_0.distcp"]
    assert not (step_dir / "model" / "model.safetensors").exists() and not (step_dir / "state" / "optimizer.pt").exists()
    model = load_model(step_dir / "model")
    assert model.output.weight is model.tok_embeddings.weight
    saved = weights(root / "fsdp2", STEPS)
    assert "output.weight" not in saved
    assert all(torch.equal(p, saved[n]) for n, p in model.state_dict().items() if n != "output.weight")
    # the optimizer state is in the shards too, keyed by parameter name with the full shape
    from torch.distributed.checkpoint import FileSystemReader

    entries = FileSystemReader(str(step_dir / "state" / "dcp")).read_metadata().state_dict_metadata
    assert tuple(entries["optim.state.tok_embeddings.weight.exp_avg"].size) == tuple(model.tok_embeddings.weight.shape)


@pytest.mark.slow
def test_fsdp2_checkpoint_at_two_ranks_resumes_at_one(runs):
    root, config = runs
    run = branch_at(root / "fsdp2", HALF, root / "two_then_one")
    pretrain(config, run, [sys.executable], "--resume", "train.grad_accum_steps=2")
    resumed = event(run, "resume")
    assert resumed["step"] == HALF and resumed["world"] == 1
    assert_same_trajectory(root / "one", run)


@pytest.mark.slow
def test_one_rank_checkpoint_resumes_under_fsdp2_at_two(runs):
    root, config = runs
    run = branch_at(root / "one", HALF, root / "one_then_two")
    # what `accelerate launch --config_file configs/accelerate/fsdp2.yaml` exports; strategy auto follows it
    pretrain(config, run, TORCHRUN, "--resume", "train.grad_accum_steps=1",
             env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    resumed = event(run, "resume")
    assert resumed["step"] == HALF and resumed["world"] == 2 and resumed["strategy"] == "fsdp2"
    assert_same_trajectory(root / "one", run)


# -- the data order over real token shards -------------------------------------------------------


def real_token_shards(root: Path) -> tuple[Path, Path]:
    """English + Chinese text -> prepared shards -> a trained tokenizer -> token shards, all through
    the real code paths. Returns (token dir, tokenizer dir)."""
    from openllama.data.prepare import PrepareOptions, prepare
    from openllama.data.tokens import tokenize
    from openllama.tokenizer import train_tokenizer

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} (CI always has it)")
    english = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    (root / "en.txt").write_text(english, encoding="utf-8")
    prepare([str(root / "en.txt"), str(SHARED_DATA / "belle_eval_set.json")], root / "shards",
            PrepareOptions(text_unit="paragraph", text_field="question", max_lines=200, progress=False))
    train_tokenizer([root / "shards"], root / "tok", vocab_size=2000, sample_bytes=200_000, character_coverage=0.98)
    tokenize([root / "shards"], root / "tok", root / "tokens", workers=1, progress=False)
    return root / "tokens", root / "tok"


@pytest.fixture(scope="module")
def real_tokens(tmp_path_factory) -> tuple[Path, Path]:
    return real_token_shards(tmp_path_factory.mktemp("real"))


def test_data_order_is_partitioned_across_ranks_on_real_token_shards(real_tokens):
    from openllama.data.packing import PackedBatches, TokenCorpus
    from openllama.data.tokens import TokenShards

    tokens, _ = real_tokens
    corpus = TokenCorpus(tokens)
    seq, batch = 32, 3
    single = PackedBatches([corpus], [1.0], seq, batch, seed=7)
    per_epoch = single._per_epoch[0]  # windows in one pass over the corpus
    rounds = per_epoch // (2 * batch)  # whole 2-rank rounds in the epoch
    one = [next(single) for _ in range(2 * rounds)]
    ranks = [PackedBatches([corpus], [1.0], seq, batch, seed=7, rank=r, world=2) for r in (0, 1)]
    two = [[next(it) for _ in range(rounds)] for it in ranks]
    # rank r's k-th micro-batch is the single process's micro-batch 2k + r: together exactly that order
    for k in range(rounds):
        for r in (0, 1):
            for key in ("tokens", "targets", "doc_ids"):
                assert torch.equal(two[r][k][key], one[2 * k + r][key]), (k, r, key)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    # and that order covers the corpus: the windows, glued back (they overlap by one token), are every
    # document of the shards once, apart from the few at the end of the epoch not yet reached
    stream = np.concatenate([mb["tokens"].reshape(-1).numpy() for mb in one])
    shards = TokenShards(tokens)
    bos, eos = shards.tokenizer["bos_id"], shards.tokenizer["eos_id"]
    starts = np.flatnonzero(stream == bos)
    assert starts[0] == 0  # the stream starts at a document boundary
    seen = Counter(tuple(stream[a:b]) for a, b in zip(starts, starts[1:]))
    corpus_docs = Counter(tuple(shards.document(i).tolist()) for i in range(len(shards)))
    assert all(corpus_docs[d] >= n for d, n in seen.items()), "a document seen twice, or text that is none"
    missing = corpus_docs - seen
    assert sum(len(d) * n for d, n in missing.items()) == shards.num_tokens - starts[-1]  # nothing skipped
    longest = max(len(d) for d in corpus_docs)
    assert shards.num_tokens - starts[-1] <= (2 * batch + 1) * seq + longest  # only the epoch's tail is left
    # resuming at another world size continues the same global order (position is world-size free)
    resumed = PackedBatches([corpus], [1.0], seq, batch, seed=7, rank=1, world=2)
    half = PackedBatches([corpus], [1.0], seq, batch, seed=7)
    for _ in range(4):
        next(half)
    resumed.load_state_dict(half.state_dict())
    assert torch.equal(next(resumed)["tokens"], one[5]["tokens"])


# -- launch and strategy must agree ---------------------------------------------------------------


@pytest.mark.parametrize("env, override, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "train.strategy=ddp", "train.strategy=ddp but the launch asks for FSDP"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "train.strategy=auto", "supports FSDP2 only"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "train.strategy=auto", "DeepSpeed"),
])
def test_a_launch_that_contradicts_the_strategy_is_refused(runs_config, tmp_path, monkeypatch, capsys,
                                                           env, override, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = cli.main(["pretrain", "--config", str(runs_config), "--out", str(tmp_path / "run"), "--no-progress",
                     "train.cpu=true", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


@pytest.fixture(scope="module")
def runs_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cfg")
    tokens = write_token_shards(root / "tokens", learnable_docs(100), vocab_size=64)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tokens, max_steps=2)))
    return config


@pytest.mark.slow
def test_fsdp2_resume_at_the_same_world_size_is_bitwise(runs):
    root, config = runs
    run = branch_at(root / "fsdp2", HALF, root / "two_then_two")
    pretrain(config, run, TORCHRUN, "--resume", "train.strategy=fsdp2")
    assert event(run, "resume")["world"] == 2
    assert [r["loss"] for r in train_records(root / "fsdp2")] == [r["loss"] for r in train_records(run)]
    a, b = weights(root / "fsdp2", STEPS), weights(run, STEPS)
    assert all(torch.equal(a[n], b[n]) for n in a)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_this_machine_equal_one_process(runs):
    # two launcher agents as two nodes (one process each), meeting through a c10d rendezvous on
    # 127.0.0.1 as configs/slurm/pretrain.sbatch has them meet on the first node
    root, config = runs
    out, port = root / "two_nodes", _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    agents = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", "two-nodes-test", "--rdzv_conf", f"is_host={int(node == 0)}",
               "-m", "openllama.cli", "pretrain", "--config", str(config), "--out", str(out), "--no-progress",
               "train.strategy=fsdp2"]
        agents.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    start = event(out, "start")
    assert start["world"] == 2 and start["strategy"] == "fsdp2"
    assert_same_trajectory(root / "one", out)
