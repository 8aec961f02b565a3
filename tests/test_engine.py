"""The training engine: schedules, optimizer groups, a falling loss, checkpoints, the divergence guard,
evaluation, trackers and plots. In-process runs on a tiny model (seconds each)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_packing import write_token_shards

from openllama import cli
from openllama.config import build
from openllama.errors import UserError
from openllama.model import Llama, load_model
from openllama.train import checkpoint as ckpt
from openllama.train.engine import TrainingDiverged, param_groups
from openllama.train.metrics import read_metrics
from openllama.train.objectives import PretrainObjective
from openllama.train.pretrain import PretrainConfig, pretrain
from openllama.train.schedule import lr_multiplier

VOCAB = 64


def learnable_docs(n: int, seed: int = 0) -> list[list[int]]:
    """Arithmetic progressions mod the vocabulary: a model can learn them, so the loss must fall."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        start, stride, length = int(rng.integers(0, VOCAB - 3)), 1 + i % 4, int(rng.integers(20, 60))
        docs.append([3 + (start + j * stride) % (VOCAB - 3) for j in range(length)])
    return docs


def tiny_config(tokens: Path, **train) -> dict:
    t = {"max_steps": 30, "micro_batch_size": 4, "seq_len": 32, "eval_every": 10, "save_every": 10,
         "keep_last": 2, "log_every": 5, "eval_batches": 4}
    t.update(train)
    return {"model": {"vocab_size": VOCAB, "dim": 32, "n_layers": 2, "n_heads": 4, "multiple_of": 16, "max_seq_len": 64},
            "optim": {"lr": 1e-2, "warmup_steps": 3}, "train": t, "data": {"train": str(tokens), "val_docs": 20}}


def cfg_of(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return write_token_shards(tmp_path_factory.mktemp("tok") / "tokens", learnable_docs(300), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tiny_run(tokens, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "run"
    summary = pretrain(build(PretrainConfig, tiny_config(tokens)), str(out), progress=False)
    return out, summary


# -- pieces --------------------------------------------------------------------------------------


def test_schedules():
    total, warm = 100, 10
    assert lr_multiplier(0, total, "cosine", warm) == pytest.approx(0.1)
    assert lr_multiplier(9, total, "cosine", warm) == pytest.approx(1.0)
    assert lr_multiplier(10, total, "cosine", warm, min_ratio=0.1) == pytest.approx(1.0)
    assert lr_multiplier(55, total, "cosine", warm, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_multiplier(100, total, "cosine", warm, min_ratio=0.1) == pytest.approx(0.1)
    cos = [lr_multiplier(s, total, "cosine", warm) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    # wsd: flat until the last 20%, then linear down to min_ratio
    assert lr_multiplier(79, total, "wsd", warm, 0.0, 0.2) == 1.0
    assert lr_multiplier(90, total, "wsd", warm, 0.0, 0.2) == pytest.approx(0.45)
    assert lr_multiplier(99, total, "wsd", warm, 0.0, 0.2) == pytest.approx(0.0)
    assert lr_multiplier(50, total, "constant", warm) == 1.0


def test_no_weight_decay_on_norms_and_embedding_norm():
    from openllama.config import ModelConfig

    model = Llama(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, multiple_of=16,
                              stable_embedding=True, tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embedding_norm.weight" in no_decay_names and "embedding_norm.bias" in no_decay_names
    assert all(("norm" in n) for n in no_decay_names)
    assert "tok_embeddings.weight" in {names[id(p)] for p in decay["params"]}
    # tied weight appears once over both groups
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_params()


def test_config_errors_name_the_key(tokens):
    with pytest.raises(UserError, match="train.*max_steps"):
        build(PretrainConfig, {**tiny_config(tokens), "train": {"seq_len": 32}})
    with pytest.raises(UserError, match="optim.schedule"):
        build(PretrainConfig, {**tiny_config(tokens), "optim": {"schedule": "linear"}})
    with pytest.raises(UserError, match="data.train"):
        pretrain(build(PretrainConfig, {**tiny_config(tokens), "data": {}}), "/nonexistent/run", progress=False)


# -- a whole run -----------------------------------------------------------------------------------


def test_loss_falls_and_run_dir_is_self_describing(tiny_run):
    out, summary = tiny_run
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 31))
    first, last = np.mean([r["loss"] for r in train[:5]]), np.mean([r["loss"] for r in train[-5:]])
    assert last < first - 0.5, (first, last)
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert 0 < evals[-1]["val_bits_per_byte"] < evals[0]["val_bits_per_byte"]  # exact value: the test below
    assert all(r["tokens"] == 4 * 32 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train)
    lrs = [r["lr"] for r in train]
    assert lrs[0] < lrs[2] and lrs[-1] < lrs[5]  # warmup, then cosine decay
    # keep_last=2: steps 10 is pruned, 20 and 30 stay; latest names 30
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_0000020", "step_0000030"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000030"
    assert summary["checkpoint"].endswith("step_0000030") and summary["step"] == 30
    state = json.loads((out / "checkpoints/step_0000030/state/trainer.json").read_text())
    assert state["step"] == 30 and state["tokens_seen"] == 30 * 4 * 32 and state["data"]["samples"] == 30 * 4
    cfg = __import__("yaml").safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["dim"] == 32 and cfg["train"]["max_steps"] == 30
    model = load_model(out / "checkpoints/step_0000030/model")
    assert model.cfg.dim == 32


def test_evaluate_cli_matches_the_runs_evaluation(tiny_run, tokens, capsys, tmp_path):
    out, summary = tiny_run
    # evaluate on the same held-out documents (last 20) that training evaluated on
    objective = PretrainObjective(build(PretrainConfig, tiny_config(tokens)).data, 32, 4, eval_batches=4)
    model = load_model(out / "checkpoints/step_0000030/model")
    ours = objective.evaluate(model)
    assert ours["val_loss"] == pytest.approx(summary["eval"]["val_loss"], rel=1e-6)
    code = cli.main(["evaluate", "--model", str(out / "checkpoints/step_0000030/model"), "--data", str(tokens),
                     "--seq-len", "32", "--batch-size", "4", "--max-batches", "2", "--out", str(tmp_path / "e.json")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "e.json").read_text())
    assert 0 < result["loss"] < math.log(VOCAB) and result["bits_per_byte"] > 0 and result["tokens"] > 0


def test_bits_per_byte_is_the_summed_nll_in_bits_over_the_corpus_bytes(tmp_path):
    """Independent of the evaluator's windows and formula: score each held-out document on its own
    with plain logits + F.cross_entropy, sum the NLL in bits, divide by the manifest's num_bytes."""
    import torch.nn.functional as F

    from openllama.config import ModelConfig
    from openllama.data.packing import TokenCorpus
    from openllama.evaluate import evaluate_corpus

    seq_len = 16
    # documents ([bos] + ids + [eos]) that tile the windows exactly: the first window holds seq_len + 1
    # tokens, every later one seq_len, so every prediction of every document is scored, with its whole context
    lengths = [7, 10, 6, 10, 16, 5, 11]
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, VOCAB, (n - 2,), generator=gen).tolist() for n in lengths]
    held_out = write_token_shards(tmp_path / "held_out", docs, vocab_size=VOCAB, docs_per_shard=4)
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, multiple_of=16, max_seq_len=32)).eval()
    result = evaluate_corpus(model, TokenCorpus(held_out), seq_len, batch_size=3)  # every batch

    manifest = json.loads((held_out / "manifest.json").read_text())
    nll_nats, predicted = 0.0, 0
    with torch.no_grad():
        for shard in sorted(held_out.glob("*.bin")):
            flat = torch.from_numpy(np.fromfile(shard, dtype=np.uint16).astype(np.int64))
            starts = np.load(shard.with_name(shard.name.replace(".bin", ".idx.npy")))
            for lo, hi in zip(starts[:-1], starts[1:]):
                doc = flat[lo:hi]
                logits = model(doc[None, :-1])[0]
                nll_nats += float(F.cross_entropy(logits.float(), doc[1:], reduction="sum"))
                predicted += len(doc) - 1
    assert predicted == sum(n - 1 for n in lengths) == result["tokens"]
    expected = nll_nats / math.log(2) / manifest["num_bytes"]
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    assert expected > 1.0  # an untrained model: far from free compression, so the check has teeth


def test_plot_writes_pngs(tiny_run, capsys):
    out, _ = tiny_run
    assert cli.main(["plot", str(out)]) == 0
    for name in ("loss.png", "throughput.png"):
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_existing_run_needs_resume_and_same_model(tiny_run, capsys, tmp_path):
    out, _ = tiny_run
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(yaml.safe_load((out / "config.yaml").read_text())))
    assert cli.main(["pretrain", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["pretrain", "--config", str(cfg), "--out", str(out), "--resume", "--no-progress", "model.dim=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "different config" in err and "model.dim" in err and len(err.splitlines()) == 1, err
    # the saved config.yaml is the default with --resume; a run-length override extends it
    assert cli.main(["pretrain", "--out", str(out), "--resume", "--no-progress", "train.seq_len=16"]) == 2
    assert "train.seq_len" in capsys.readouterr().err
    assert cli.main(["pretrain", "--out", str(tmp_path / "nothing"), "--resume", "--no-progress"]) == 2
    assert "config.yaml: not found" in capsys.readouterr().err


# -- checkpoints ------------------------------------------------------------------------------------


def test_half_written_checkpoint_is_never_picked(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path)
    root = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        d = root / ckpt.step_dir_name(step)
        (d / "state").mkdir(parents=True)
        if complete:
            (d / ckpt.COMPLETE).write_text(str(step))
    (root / ".tmp_step_0000040" / "state").mkdir(parents=True)
    assert manager.latest() == root / "step_0000020"  # no pointer: highest complete
    (root / "latest").write_text("step_0000030\n")  # pointer to an incomplete dir: ignored
    assert manager.latest() == root / "step_0000020"
    (root / "latest").write_text("step_0000010\n")  # pointer lagging a completed rename: the newer one wins
    assert manager.latest() == root / "step_0000020"
    assert manager.complete_steps() == [10, 20]


# -- divergence guard -------------------------------------------------------------------------------


class PoisonedObjective(PretrainObjective):
    """The real pretraining objective whose loss turns non-finite on chosen micro-batches."""

    def __init__(self, *args, bad_calls: set[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.bad_calls = 0, bad_calls

    def loss(self, model, batch):
        loss, metrics, n = super().loss(model, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls in self.bad_calls else loss), metrics, n


def _train_poisoned(tokens, out, bad_calls, **train):
    from openllama.train.engine import train as run_train

    cfg = build(PretrainConfig, tiny_config(tokens, **train))
    objective = PoisonedObjective(cfg.data, 32, 4, bad_calls=bad_calls)
    torch.manual_seed(0)
    return run_train(cfg, Llama(cfg.model), objective, out, progress=False)


def test_a_non_finite_step_is_skipped_without_touching_weights(tokens, tmp_path):
    summary = _train_poisoned(tokens, tmp_path / "r", {7}, max_steps=7, save_every=6, eval_every=0)
    records = [r for r in read_metrics(tmp_path / "r/metrics.jsonl") if r["kind"] == "train"]
    assert [r.get("skipped", False) for r in records] == [False] * 6 + [True]
    assert summary["step"] == 7
    before = load_model(tmp_path / "r/checkpoints/step_0000006/model").state_dict()
    after = load_model(tmp_path / "r/checkpoints/step_0000007/model").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tokens, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row.*step_0000005"):
        _train_poisoned(tokens, tmp_path / "r", set(range(7, 100)), max_steps=20, save_every=5,
                        max_nonfinite_in_a_row=3, eval_every=0)
    manager = ckpt.CheckpointManager(tmp_path / "r")
    assert manager.complete_steps() == [5]
    model = load_model(manager.latest() / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [r for r in read_metrics(tmp_path / "r/metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records if r.get("skipped")] == [7, 8, 9]


def test_tensorboard_tracker(tokens, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (openllama[tensorboard])")
    out = tmp_path / "r"
    pretrain(build(PretrainConfig, tiny_config(tokens, max_steps=4, trackers=["tensorboard"], log_every=1)),
             str(out), progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = [EventAccumulator(str(p)).Reload() for p in out.rglob("events.out.tfevents.*")]  # + one of hparams
    (logged,) = [log for log in logs if "train/loss" in log.Tags()["scalars"]]
    losses = {e.step: e.value for e in logged.Scalars("train/loss")}
    train = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}
    assert sorted(losses) == [1, 2, 3, 4] and losses == pytest.approx(train)


def test_activation_checkpointing_gives_the_same_training(tokens, tmp_path):
    runs = {}
    for flag in (False, True):
        out = tmp_path / f"ac{int(flag)}"
        pretrain(build(PretrainConfig, tiny_config(tokens, max_steps=3, activation_checkpointing=flag, eval_every=0)),
                 str(out), progress=False)
        runs[flag] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert runs[True] == runs[False]


def test_max_tokens_sets_the_number_of_steps(tokens, tmp_path):
    summary = pretrain(build(PretrainConfig, tiny_config(tokens, max_steps=None, max_tokens=3 * 4 * 32 - 5,
                                                         eval_every=0)), str(tmp_path / "r"), progress=False)
    assert summary["step"] == summary["max_steps"] == 3 and summary["tokens_seen"] == 3 * 4 * 32


# -- data categories (docs/data.md) ---------------------------------------------------------------

CATS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def cat_tokens(tmp_path_factory) -> Path:
    """learnable_docs in three categories of unequal size (a: half the documents)."""
    docs = learnable_docs(300, seed=1)
    names = [CATS[0] if i % 2 else CATS[1 + (i // 2) % 2] for i in range(len(docs))]
    return write_token_shards(tmp_path_factory.mktemp("cat") / "tokens", docs, vocab_size=VOCAB, categories=names)


def cat_config(tokens: Path, **train) -> dict:
    return tiny_config(tokens, **{"max_steps": 6, "save_every": 3, "eval_every": 3, "log_every": 1, **train})


def train_of(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def cat_runs(cat_tokens, tmp_path_factory) -> dict[str, Path]:
    """6 steps of batch 4 x 32: straight through, stopped at 3 and resumed, and as 2 x 2 accumulated."""
    root = tmp_path_factory.mktemp("catruns")
    pretrain(build(PretrainConfig, cat_config(cat_tokens)), str(root / "full"), progress=False)
    pretrain(build(PretrainConfig, cat_config(cat_tokens, halt_at_step=3)), str(root / "resumed"), progress=False)
    pretrain(build(PretrainConfig, cat_config(cat_tokens)), str(root / "resumed"), resume=True, progress=False)
    pretrain(build(PretrainConfig, cat_config(cat_tokens, micro_batch_size=2, grad_accum_steps=2)),
             str(root / "accum"), progress=False)
    return {"full": root / "full", "resumed": root / "resumed", "accum": root / "accum"}


def _scored_per_category(batches, steps: int, micro: int) -> list[np.ndarray]:
    """Per step, the scored targets of each category, counted from the batches themselves."""
    out = []
    for _ in range(steps):
        n = np.zeros(len(CATS))
        for _ in range(micro):
            b = next(batches)
            n += np.bincount(b["category"][b["targets"] != -100].numpy(), minlength=len(CATS))
        out.append(n)
    return out


def test_category_metrics_add_up_to_the_step(cat_runs, cat_tokens):
    train = train_of(cat_runs["full"])
    objective = PretrainObjective(build(PretrainConfig, cat_config(cat_tokens)).data, 32, 4)
    scored = _scored_per_category(objective.train_batches(0, 1), 6, 1)
    seen = np.zeros(len(CATS))
    for r, n in zip(train, scored):
        # tokens: every position counts for its document's category, so they add up to the engine's
        now = np.array([r[f"tokens_seen/{c}"] for c in CATS])
        assert now.sum() == r["tokens_seen"] and (now - seen).sum() == r["tokens"] == 4 * 32
        seen = now
        # loss: token-weighted, the categories' losses give the step's (one micro-batch) loss
        losses = np.array([r.get(f"loss/{c}", 0.0) for c in CATS])
        assert all((f"loss/{c}" in r) == (n[i] > 0) for i, c in enumerate(CATS))
        assert (losses * n).sum() / n.sum() == pytest.approx(r["loss"], rel=1e-6)


def test_too_many_categories_log_none(cat_tokens, monkeypatch, capsys):
    # a plain jsonl corpus of many part files has a category per file: past the cap, none are logged
    from openllama.train import objectives

    assert objectives.PretrainObjective(build(PretrainConfig, cat_config(cat_tokens)).data, 32, 4).tally is not None
    monkeypatch.setattr(objectives, "MAX_LOGGED_CATEGORIES", len(CATS) - 1)
    objective = objectives.PretrainObjective(build(PretrainConfig, cat_config(cat_tokens)).data, 32, 4)
    assert objective.tally is None and objective.step_sums(torch.device("cpu")) is None
    assert f"{len(CATS)} data categories" in capsys.readouterr().out


def test_validation_loss_per_category_is_token_weighted(cat_runs, cat_tokens):
    from openllama.data.packing import eval_batches

    evals = [r for r in read_metrics(cat_runs["full"] / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    objective = PretrainObjective(build(PretrainConfig, cat_config(cat_tokens)).data, 32, 4, eval_batches=4)
    (val,) = objective.val
    n = _scored_per_category(eval_batches(val, 32, 4, 4, CATS), 1, 4)[0]
    for r in evals:
        losses = np.array([r[f"val_loss/{c}"] for c in CATS])
        assert (losses * n).sum() / n.sum() == pytest.approx(r["val_loss"], rel=1e-6)


def test_category_counts_survive_resume_and_add_over_accumulation(cat_runs):
    full, resumed, accum = (train_of(cat_runs[k]) for k in ("full", "resumed", "accum"))
    keys = [f"tokens_seen/{c}" for c in CATS] + [f"loss/{c}" for c in CATS]
    assert [[r.get(k) for k in keys] for r in resumed] == [[r.get(k) for k in keys] for r in full]
    state = torch.load(cat_runs["resumed"] / "checkpoints/step_0000006/state/objective.pt", weights_only=True)
    assert state == {"category_tokens_seen": {c: full[-1][f"tokens_seen/{c}"] for c in CATS}}
    # 2 micro-batches of 2 are the 4 samples of one micro-batch of 4: sums, not averages, per category
    for a, b in zip(full, accum):
        assert [a[f"tokens_seen/{c}"] for c in CATS] == [b[f"tokens_seen/{c}"] for c in CATS]
    # the same weights at step 1: the same per-category loss (for the categories the step holds)
    losses = {k: v for k, v in full[0].items() if k.startswith("loss/")}
    assert len(losses) >= 2 and losses == pytest.approx({k: v for k, v in accum[0].items() if k.startswith("loss/")},
                                                        rel=1e-5)


def test_plot_draws_the_categories(cat_runs, monkeypatch):
    from matplotlib.figure import Figure

    from openllama.train.plot import plot_run

    drawn = {}
    save = Figure.savefig

    def record(fig, path, *args, **kwargs):
        drawn[Path(path).name] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    paths = plot_run(cat_runs["full"])
    assert paths[-1].name == "categories.png" and paths[-1].read_bytes()[:4] == b"\x89PNG"
    assert sorted(drawn["categories.png"]) == sorted([f"{c} (train)" for c in CATS] + [f"{c} (val)" for c in CATS]
                                                     + CATS)


def test_category_weights_config(cat_tokens):
    def objective(**data):
        cfg = cat_config(cat_tokens)
        cfg["data"].update(data)
        return PretrainObjective(build(PretrainConfig, cfg).data, 32, 4)

    with pytest.raises(UserError, match=r"data.category_weights.d: no such category in data.train \(its categories: a, b, c\)"):
        objective(category_weights={"a": 1, "b": 1, "c": 1, "d": 1})
    with pytest.raises(UserError, match="no weight for c"):
        objective(category_weights={"a": 1, "b": 1})
    with pytest.raises(UserError, match=r"data.train\[0\].weight"):
        objective(train=[{"path": str(cat_tokens), "weight": 2}], category_weights={"a": 1, "b": 1, "c": 1})
    with pytest.raises(UserError, match="category_weights"):  # typed: a negative weight is refused by the config
        objective(category_weights={"a": -1, "b": 1, "c": 1})
    # honoured: the tokens of each category in what training reads follow the weights
    batches = objective(category_weights={"a": 1, "b": 3, "c": 0}).train_batches(0, 1)
    counts = sum(np.bincount(next(batches)["category"].flatten().numpy(), minlength=3) for _ in range(50))
    assert counts[2] == 0 and counts[1] / counts.sum() == pytest.approx(0.75, abs=0.01)


def test_fused_loss_hands_out_its_per_token_losses():
    """`row_losses`: the per-token losses of the same pass, in every chunk, without changing the
    loss or its gradients (what the per-category tally rests on)."""
    from openllama.model import linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(50, 16, generator=gen, requires_grad=True), torch.randn(40, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 40, (50,), generator=gen)
    targets[::7] = -100
    ref = linear_cross_entropy(h, w, targets, reduction="none")
    grads = torch.autograd.grad(ref.sum() / (targets != -100).sum(), (h, w))
    for chunk_bytes in (4 * 40 * 8, None):  # chunks of 8 rows, and one chunk
        rows = torch.full((50,), float("nan"))
        loss = linear_cross_entropy(h, w, targets, chunk_bytes=chunk_bytes, row_losses=rows)
        torch.testing.assert_close(rows, ref.detach())
        torch.testing.assert_close(loss, rows.sum() / (targets != -100).sum())
        for got, want in zip(torch.autograd.grad(loss, (h, w)), grads):
            torch.testing.assert_close(got, want)
    with torch.no_grad():  # evaluation's path (no gradients formed)
        rows = torch.full((50,), float("nan"))
        total = linear_cross_entropy(h, w, targets, reduction="sum", row_losses=rows)
        torch.testing.assert_close(rows, ref.detach())
        torch.testing.assert_close(total, rows.sum())
