"""DPO: the chosen-over-rejected margin on held-out pairs grows relative to the frozen reference;
checkpoints resume exactly; the loss pieces match their formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment_helpers import make_start, metrics, write_jsonl
from openllama.cli import main
from openllama.train.dpo import preference_loss
from test_reward import preference_rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    start = make_start(root / "start", dim=32, n_layers=1)
    train = write_jsonl(root / "train.jsonl", preference_rows(64, 0))
    valid = write_jsonl(root / "valid.jsonl", preference_rows(32, 1))
    return root, start, train, valid


def test_sigmoid_loss_formula():
    pi_c, pi_r, ref_c, ref_r = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0])
    loss, m = preference_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    assert m["reward_chosen"] == pytest.approx(0.5) and m["reward_rejected"] == pytest.approx(-0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), rel=1e-6)
    assert m["reward_accuracy"] == 1.0


def test_ipo_loss_formula():
    # IPO (Azar et al. 2023): (h - 1/(2 beta))^2 with h the log-ratio difference, here
    # ((-2 - -4) - (-6 - -5)) = 3; beta 0.25 -> (3 - 2)^2 = 1 for the first pair, and for the
    # second h = (0 - 0) - (1 - 0) = -1 -> (-1 - 2)^2 = 9; the loss is their mean
    pi_c, pi_r = torch.tensor([-2.0, 0.0]), torch.tensor([-6.0, 1.0])
    ref_c, ref_r = torch.tensor([-4.0, 0.0]), torch.tensor([-5.0, 0.0])
    loss, m = preference_loss(pi_c, pi_r, ref_c, ref_r, beta=0.25, kind="ipo")
    assert loss.item() == pytest.approx((1.0 + 9.0) / 2)
    assert m["reward_margin"] == pytest.approx(0.25 * (3 + -1) / 2) and m["reward_accuracy"] == 0.5


def test_reference_scores_split_across_ranks_reassemble_in_order(setup):
    # precompute splits the pairs between ranks (rank r scores r, r + w, ...), pads each share to
    # the same length and gathers them: reassembled they equal one process scoring every pair
    from openllama.chat_template import ChatTemplate
    from openllama.data.preference import encode_pairs, read_preferences
    from openllama.model import load_model
    from openllama.tokenizer import Tokenizer
    from openllama.train.dpo import pair_logprobs, unshard_rows

    root, start, train, _ = setup
    tok = Tokenizer.load(start)
    model = load_model(start).eval()
    pairs = encode_pairs(read_preferences(train)[:7], ChatTemplate.for_tokenizer(tok), tok, 64)
    whole = pair_logprobs(model, pairs, tok.pad_id, 3)
    shares = [pair_logprobs(model, pairs[rank::3], tok.pad_id, 3) for rank in range(3)]  # 3, 2, 2 pairs
    gathered = torch.cat([torch.cat([p, torch.full((3 - len(p), 2), float("nan"))]) for p in shares])
    torch.testing.assert_close(unshard_rows(gathered, 7, 3), whole)


@pytest.mark.parametrize("reference", ["precompute", "online"])
def test_dpo_raises_held_out_margin(setup, reference):
    root, start, train, valid = setup
    out = root / f"run_{reference}"
    assert main(["dpo", "--model", str(start), "--data", str(train), "--out", str(out), "--no-progress",
                 f"data.valid=[{valid}]", f"dpo.reference={reference}", "dpo.beta=0.1", "train.max_steps=12",
                 "train.micro_batch_size=8", "train.seq_len=64", "optim.lr=3e-3", "optim.schedule=constant"]) == 0
    s = json.loads((out / "summary.json").read_text())
    # the policy starts as the reference: zero margin; afterwards chosen replies gain on rejected ones
    assert s["before"]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert s["after"]["reward_margin"] > 0.5 and s["after"]["reward_accuracy"] > 0.9
    train_rows = metrics(out, "train")
    assert {"reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"} <= set(train_rows[-1])


def test_dpo_lora_resume_is_exact(setup):
    root, start, train, _ = setup
    common = ["--model", str(start), "--data", str(train), "--no-progress", "train.max_steps=4",
              "train.micro_batch_size=4", "train.seq_len=64", "optim.lr=1e-3", "lora.r=4"]
    assert main(["dpo", "--out", str(root / "a"), *common]) == 0
    assert main(["dpo", "--out", str(root / "b"), *common, "train.halt_at_step=2"]) == 0
    assert main(["dpo", "--out", str(root / "b"), "--resume", "--no-progress"]) == 0
    from safetensors.torch import load_file

    for name in ("model.safetensors", "lora_adapter.safetensors"):
        a = load_file(str(root / "a" / "checkpoints" / "step_0000004" / "model" / name))
        b = load_file(str(root / "b" / "checkpoints" / "step_0000004" / "model" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(root / "a", "train")] == [r["loss"] for r in metrics(root / "b", "train")]
    # the merged weights differ from the start only in LoRA target matrices
    from openllama.model import load_model

    base, tuned = load_model(start).state_dict(), load_model(root / "a").state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.split(".")[-2] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for k in changed)


def _as_hh(row: dict, turns: str = "") -> dict:
    """A pair written as Anthropic HH releases it: whole dialogues, the shared turns repeated."""
    start = f"{turns}\n\nHuman: {row['prompt']}\n\nAssistant:"
    return {"chosen": f"{start} {row['chosen']}", "rejected": f"{start} {row['rejected']}"}


def test_dpo_trains_on_hh_as_released_gz_irregular_records_counted(setup, tmp_path):
    # the HH release: *.jsonl.gz, several shared turns, a turn marker without its blank line inside a
    # turn, and records with no shared prompt. The default on_error trains, and counts what it skips.
    import gzip

    root, start, _, _ = setup
    rows = [_as_hh(r) for r in preference_rows(24, 2)]
    rows += [_as_hh(r, "\n\nHuman: hello\n\nAssistant: hi.  Human: and more on the same line") for r in
             preference_rows(6, 3)]
    rows += [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}] * 3
    rows += [{"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: r"}] * 2
    data = tmp_path / "hh.jsonl.gz"
    data.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")))
    out = tmp_path / "run"
    assert main(["dpo", "--model", str(start), "--data", str(data), "--out", str(out), "--no-progress",
                 "train.max_steps=2", "train.micro_batch_size=4", "train.seq_len=64"]) == 0
    (report,) = json.loads((out / "summary.json").read_text())["data"]["files"]
    assert report == {"path": str(data), "format": "hh", "records": 35, "used": 30, "skipped": 5,
                      "skipped_by_reason": {"empty_reply": 2, "no_shared_prompt": 3}}
