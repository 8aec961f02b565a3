"""Interop with stock transformers: export loads in LlamaForCausalLM with equal logits, import is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from openllama.cli import main as cli_main
from openllama.config import ModelConfig
from openllama.errors import UserError
from openllama.hf import export_hf, import_hf, to_hf_model
from openllama.model import Llama, load_model, save_model

TINY = dict(vocab_size=120, dim=48, n_layers=2, n_heads=4, multiple_of=16, max_seq_len=64, rope_theta=500.0)


def our_model(**kw) -> Llama:
    torch.manual_seed(0)
    model = Llama(ModelConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():  # non-trivial norms, so a missed or misplaced norm weight cannot go unnoticed
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def max_logit_diff(ours: Llama, hf: LlamaForCausalLM, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(tokens) - hf(input_ids=tokens).logits).abs().max().item()


@pytest.mark.parametrize("stable", [False, True], ids=["plain", "stable_emb"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_loads_in_stock_transformers_with_equal_logits(tmp_path, stable, tie):
    model = our_model(stable_embedding=stable, tie_embeddings=tie, n_kv_heads=2)
    out = export_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == (tie and not stable)
    if tie and not stable:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, 120, (3, 17))
    assert max_logit_diff(model, hf, tokens) < 1e-4


def test_in_memory_conversion_and_bf16_export(tmp_path):
    model = our_model(stable_embedding=True, tie_embeddings=True)
    assert max_logit_diff(model, to_hf_model(model), torch.randint(0, 120, (2, 9))) < 1e-4
    out = export_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    hf = LlamaForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _random_hf(tmp_path, **kw):
    torch.manual_seed(1)
    conf = LlamaConfig(vocab_size=150, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1234.0}, **kw)
    hf = LlamaForCausalLM(conf).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "src")
    return hf


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 2}, {"tie_word_embeddings": True, "num_key_value_heads": 1}],
                         ids=["mha", "gqa", "tied_mqa"])
def test_import_of_a_transformers_checkpoint_is_exact(tmp_path, kw):
    hf = _random_hf(tmp_path, **kw)
    ours = import_hf(tmp_path / "src")
    assert ours.cfg.rope_theta == 1234.0 and ours.cfg.norm_eps == 1e-6 and ours.cfg.ffn_hidden_dim == 96
    assert ours.cfg.kv_heads == kw.get("num_key_value_heads", 4)
    assert ours.cfg.tie_embeddings == kw.get("tie_word_embeddings", False)
    tokens = torch.randint(0, 150, (2, 13))
    assert max_logit_diff(ours, hf, tokens) < 1e-5
    # and back again: a round trip through our format and export is still the same function
    save_model(ours, tmp_path / "ours")
    again = LlamaForCausalLM.from_pretrained(export_hf(tmp_path / "ours", tmp_path / "again"))
    assert max_logit_diff(ours, again, tokens) < 1e-5


def test_import_rejects_what_we_cannot_represent(tmp_path):
    _random_hf(tmp_path, attention_bias=True)
    with pytest.raises(UserError, match="attention_bias"):
        import_hf(tmp_path / "src")
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok_mod = pytest.importorskip("openllama.tokenizer", reason="tokenizer module not in this build")
    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    if not text.is_file():
        pytest.skip(f"{text} not found (CI always has it)")
    out = tmp_path_factory.mktemp("tok")
    tok_mod.train_tokenizer([text.read_text(encoding="utf-8")[:200_000]], out, vocab_size=512, num_threads=1)
    return out


def test_export_and_import_commands_with_a_tokenizer(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from openllama.tokenizer import Tokenizer

    # a run directory as the engine writes it: checkpoints/step_*/model, checkpoints/latest, tokenizer files
    model = our_model(vocab_size=512, stable_embedding=True, tie_embeddings=True)
    run = tmp_path / "run"
    save_model(model, run / "checkpoints" / "step_0000003" / "model")
    (run / "checkpoints" / "step_0000003" / "COMPLETE").write_text("")
    (run / "checkpoints" / "latest").write_text("step_0000003\n")
    for f in tokenizer_dir.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    (run / "chat_template.jinja").write_text(template)  # transformers 5's file: travels with the tokenizer

    assert cli_main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf_dir = tmp_path / "hf"
    assert (hf_dir / "chat_template.jinja").read_text() == template
    ours_tok, hf_tok = Tokenizer.load(tokenizer_dir), AutoTokenizer.from_pretrained(hf_dir)
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler 123"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours_tok.encode(text)
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (ours_tok.bos_id, ours_tok.eos_id)
    hf = LlamaForCausalLM.from_pretrained(hf_dir)
    assert max_logit_diff(model, hf, torch.tensor([ours_tok.encode(text)])) < 1e-4

    # refuses to overwrite; then import the export back into our format
    assert cli_main(["export", str(run), "--out", str(hf_dir)]) == 2
    assert cli_main(["import", str(hf_dir), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    assert Tokenizer.load(tmp_path / "back").encode(text) == ours_tok.encode(text)  # the tokenizer came along
    assert (tmp_path / "back" / "chat_template.jinja").read_text() == template
    # a checkpoint of a run started from the imported model keeps the template too (one copy rule)
    from openllama.train import checkpoint as ckpt
    from openllama.train.engine import OptimConfig, build_optimizer

    optimizer = build_optimizer(back, OptimConfig(), torch.device("cpu"))
    saved = ckpt.CheckpointManager(tmp_path / "sft", tokenizer_dir=tmp_path / "back").save(
        1, back, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), {"step": 1})
    assert (saved / "model" / "chat_template.jinja").read_text() == template
    assert Tokenizer.load(tmp_path / "back").encode(text) == ours_tok.encode(text)
    tokens = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), model(tokens), atol=1e-4, rtol=0)


def test_evaluate_reads_our_run_dir_and_the_exported_hf_dir_alike(tmp_path, capsys):
    from test_packing import write_token_shards

    model = our_model(vocab_size=120)
    run = tmp_path / "run"
    save_model(model, run / "checkpoints" / "step_0000001" / "model")
    (run / "checkpoints" / "step_0000001" / "COMPLETE").write_text("")
    export_hf(model, tmp_path / "hf")
    gen = torch.Generator().manual_seed(1)
    tokens = write_token_shards(tmp_path / "tokens", [torch.randint(3, 120, (30,), generator=gen).tolist()
                                                      for _ in range(12)], vocab_size=120)
    results = []
    for model_dir in (run, tmp_path / "hf"):
        capsys.readouterr()
        assert cli_main(["evaluate", "--model", str(model_dir), "--data", str(tokens), "--seq-len", "32",
                         "--device", "cpu", "--dtype", "fp32"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    ours, hf = results
    assert (ours["device"], ours["dtype"]) == ("cpu", "float32") and ours["tokens"] == hf["tokens"] > 0
    assert ours["loss"] == pytest.approx(hf["loss"], rel=1e-5) and ours["loss"] > 1.0
    assert cli_main(["evaluate", "--model", str(run), "--data", str(tokens), "--dtype", "int3"]) == 2
