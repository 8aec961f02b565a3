"""SFT: the loss on replies falls, prompts carry no loss, the exported tokenizer's
apply_chat_template gives our ids, LoRA merges into an exportable model, and runs resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from alignment_helpers import make_start, metrics, write_jsonl
from openllama.cli import main
from openllama.labels import IGNORE_INDEX

LETTERS = "abcdefghi"


def copy_chats(correct_every: int = 1) -> list[dict]:
    """The toy skill: `say c` -> `c`; with correct_every=2 every other reply is the wrong `j`."""
    return [{"messages": [{"role": "user", "content": f"say {c}"},
                          {"role": "assistant", "content": c if k % correct_every == 0 else "j"}]}
            for c in LETTERS for k in range(8)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    start = make_start(root / "start", dim=32, n_layers=1)
    data = write_jsonl(root / "train.jsonl", copy_chats())
    return root, start, data


def test_sft_loss_falls_and_prompts_carry_no_loss(setup, shared_data):
    root, start, data = setup
    out = root / "full"
    assert main(["sft", "--model", str(start), "--data", str(data), "--out", str(out), "--no-progress",
                 f"data.valid=[{data}]", "train.max_steps=12", "train.micro_batch_size=4", "train.seq_len=64",
                 "optim.lr=3e-3", "optim.schedule=constant"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["after"]["reply_loss"] < 0.75 * s["before"]["reply_loss"]
    losses = [r["loss"] for r in metrics(out, "train")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    # the label tensor of a real batch: labels only where the reply (and its eos) is
    from openllama.chat_template import ChatTemplate
    from openllama.data.chat import read_conversations
    from openllama.tokenizer import Tokenizer
    from openllama.train.sft import SFTObjective, encode_conversations
    from openllama.data.chat import LengthReport

    tok = Tokenizer.load(start)
    template = ChatTemplate.for_tokenizer(tok)
    convs = read_conversations(shared_data / "alpaca_cleaned_1000.json")[:20]
    examples = encode_conversations(convs, template, tok, 256, LengthReport())
    batch = next(SFTObjective(examples, [], 256, 2, tok.pad_id).train_batches(0, 1))
    tokens, labels, docs = batch["tokens"], batch["labels"], batch["doc_ids"]
    trained = labels != IGNORE_INDEX
    assert trained.any() and (labels[trained] == tokens[trained]).all()
    for row in range(tokens.shape[0]):
        for doc in docs[row].unique():
            ids = tokens[row][docs[row] == doc].tolist()
            labs = labels[row][docs[row] == doc].tolist()
            if ids[0] != tok.bos_id:
                continue  # padding
            text = tok.decode([i for i, lab in zip(ids, labs) if lab == IGNORE_INDEX])
            assert text.startswith("<s>user: ") and text.endswith("\nsystem:")  # the prompt, untrained
            assert labs[-1] == tok.eos_id


def test_exported_tokenizer_renders_our_ids(setup, tmp_path):
    from transformers import AutoTokenizer

    from openllama.chat_template import ChatTemplate
    from openllama.hf import export_hf
    from openllama.tokenizer import Tokenizer

    root, start, data = setup
    out = root / "chatml"
    assert main(["sft", "--model", str(start), "--data", str(data), "--out", str(out), "--no-progress",
                 "data.template=chatml", "data.valid_fraction=0", "train.max_steps=1", "train.micro_batch_size=2",
                 "train.seq_len=64"]) == 0
    export_hf(out, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    tok = Tokenizer.load(tmp_path / "hf")
    messages = [{"role": "user", "content": "say b"}, {"role": "assistant", "content": "b"}]
    ours = ChatTemplate.for_tokenizer(tok, "chatml").encode(messages, tok).ids
    theirs = hf.apply_chat_template(messages, tokenize=True)
    assert ours == list(theirs["input_ids"] if not isinstance(theirs, list) else theirs)
    assert "<|im_start|>" in hf.apply_chat_template(messages, tokenize=False)


def test_lora_sft_merges_and_resumes_exactly(setup, capsys):
    root, start, data = setup
    common = ["--model", str(start), "--data", str(data), "--no-progress", "lora.r=4", "lora.targets=[wq,wv,w2]",
              "train.max_steps=4", "train.micro_batch_size=2", "train.seq_len=64", "optim.lr=1e-2"]
    assert main(["sft", "--out", str(root / "a"), *common]) == 0
    assert main(["sft", "--out", str(root / "b"), *common, "train.halt_at_step=2"]) == 0
    # --resume reads b's config.yaml; what is given with it must agree (run-control keys aside)
    assert main(["sft", "--out", str(root / "b"), "--resume", "--no-progress", "optim.lr=1e-3"]) == 2
    assert "the run has optim.lr=0.01 but this command gives 0.001" in capsys.readouterr().err
    assert main(["sft", "--out", str(root / "b"), "--resume", "--no-progress",
                 *common]) == 0
    assert [r["loss"] for r in metrics(root / "a", "train")] == [r["loss"] for r in metrics(root / "b", "train")]

    from safetensors.torch import load_file

    from openllama.model import load_model
    from openllama.train.lora import LoraConfig, LoraLlama

    ckpt = root / "a" / "checkpoints" / "step_0000004" / "model"
    merged = load_model(ckpt).eval()
    wrapped = LoraLlama(load_model(start), LoraConfig(r=4, targets=["wq", "wv", "w2"]))
    wrapped.load_checkpoint(ckpt)
    wrapped.eval()
    x = torch.randint(0, merged.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(merged(x), wrapped(x), atol=1e-5)  # merged weights == base + adapters
    b = load_file(str(root / "b" / "checkpoints" / "step_0000004" / "model" / "lora_adapter.safetensors"))
    a = load_file(str(ckpt / "lora_adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_data_is_a_user_error(setup, tmp_path, capsys):
    root, start, _ = setup
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    assert main(["sft", "--model", str(start), "--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress",
                 "train.max_steps=1"]) == 2
    assert "bad.jsonl:2: key 'output' must be a string" in capsys.readouterr().err
    assert main(["sft", "--data", str(bad), "--out", str(tmp_path / "o"), "train.max_steps=1"]) == 2
    assert "no starting model" in capsys.readouterr().err
    # the length is explicit (no hidden default), and counted in steps: max_tokens is pretraining's
    assert main(["sft", "--model", str(start), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "no training length: pass train.max_steps=N" in capsys.readouterr().err
    assert main(["sft", "--model", str(start), "--data", str(bad), "--out", str(tmp_path / "o"),
                 "train.max_tokens=1000"]) == 2
    assert "train.max_tokens is for pretraining" in capsys.readouterr().err
