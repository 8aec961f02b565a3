"""The single-file Llama: cache, document masking, padding, accounting, checkpointing, the fused loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from openllama.config import ModelConfig
from openllama.errors import UserError
from openllama.artifacts import COMPLETE, find_tokenizer_dir, resolve_model_dir
from openllama.model import (KVCache, Llama, count_params, flops_per_token, linear_cross_entropy, load_model,
                             padding_attention_mask, padding_positions, positions_from_doc_ids, save_model)

TINY = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, multiple_of=16, max_seq_len=64)


def tiny(**kw) -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(**{**TINY, **kw})).eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "stable_embedding": True, "tie_embeddings": True}])
def test_kv_cache_prefill_then_decode_equals_full_forward(kw):
    model = tiny(**kw)
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.cfg, 2, 16)
        steps = [model(tokens[:, :5], cache=cache, start_pos=0)]
        for i in range(5, 12):
            steps.append(model(tokens[:, i:i + 1], cache=cache, start_pos=i))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_full_forward():
    model = tiny(n_kv_heads=2)
    tokens = torch.randint(0, 97, (3, 15))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.cfg, 3, 15)
        chunks = [model(tokens[:, a:b], cache=cache, start_pos=a) for a, b in ((0, 4), (4, 11), (11, 15))]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error():
    model = tiny()
    cache = KVCache(model.cfg, 1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_packed_documents_do_not_see_each_other():
    model = tiny(n_kv_heads=2, stable_embedding=True)
    lengths = [5, 9, 2]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(docs, 1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], 1)
    with torch.no_grad():
        together = model(packed, doc_ids=doc_ids)
        alone = torch.cat([model(d) for d in docs], 1)
        leaky = model(packed)  # without doc_ids later documents do see earlier ones
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (leaky[:, 5:] - alone[:, 5:]).abs().max() > 1e-3


def test_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [4, 4, 4, 4, 4, 4]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_left_padded_batch_with_cache_equals_each_row_alone():
    model = tiny(n_kv_heads=2)
    prompts = [torch.randint(1, 97, (n,)) for n in (7, 3, 5)]
    S, P, new = 7, 0, 4
    tokens = torch.full((3, S), P)
    valid = torch.zeros(3, S, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, S - len(p):] = p
        valid[i, S - len(p):] = True
    with torch.no_grad():
        cache = KVCache(model.cfg, 3, S + new)
        logits = model(tokens, positions=padding_positions(valid), attn_mask=padding_attention_mask(valid, S), cache=cache)
        assert torch.isfinite(logits).all()
        outs, nxt = [], logits[:, -1].argmax(-1)
        for step in range(new):
            outs.append(nxt)
            valid = torch.cat([valid, torch.ones(3, 1, dtype=torch.bool)], 1)
            logits = model(nxt[:, None], positions=padding_positions(valid)[:, -1:],
                           attn_mask=padding_attention_mask(valid, 1), cache=cache, start_pos=S + step)
            nxt = logits[:, -1].argmax(-1)
        batched = torch.stack(outs, 1)
        for i, p in enumerate(prompts):  # greedy, one row alone, no padding, no cache
            seq = p[None]
            for _ in range(new):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
            assert batched[i].tolist() == seq[0, len(p):].tolist()


@pytest.mark.parametrize("kw", [
    {}, {"n_kv_heads": 2}, {"tie_embeddings": True}, {"stable_embedding": True},
    {"stable_embedding": True, "tie_embeddings": True, "n_kv_heads": 1},
    {"hidden_dim": 50}, {"ffn_dim_multiplier": 1.3, "multiple_of": 32},
])
def test_count_params_matches_the_module(kw):
    model = tiny(**kw)
    assert count_params(model.cfg) == model.num_params() == sum(p.numel() for p in set(model.parameters()))


def test_seed_7b_counts_exactly_on_meta():
    cfg = ModelConfig(vocab_size=100_000, dim=4096, n_layers=32, n_heads=32, max_seq_len=1024,
                      stable_embedding=True, tie_embeddings=True)
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.num_params() == count_params(cfg) == 6_885_879_808


def test_flops_per_token():
    cfg = ModelConfig(**TINY)
    model = Llama(cfg)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in n)
    assert flops_per_token(cfg, 64) == 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * 64
    tied = ModelConfig(**TINY, tie_embeddings=True)  # the shared matrix is still an output matmul
    assert flops_per_token(tied, 64) == flops_per_token(cfg, 64)
    assert flops_per_token(cfg, 128) > flops_per_token(cfg, 64)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny(n_kv_heads=2).train()
    tokens = torch.randint(0, 97, (2, 10))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(tokens[:, :-1], doc_ids=doc_ids[:, :-1], targets=tokens[:, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_dropout_is_active_only_in_training():
    model = tiny(dropout=0.5)
    tokens = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model(tokens))
        model.train()
        assert not torch.equal(model(tokens), model(tokens))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_equals_logits_then_cross_entropy(reduction):
    model = tiny(tie_embeddings=True).train()
    tokens = torch.randint(0, 97, (2, 11))
    targets = tokens[:, 1:].clone()
    targets[0, :3] = -100
    fused = model(tokens[:, :-1], targets=targets, reduction=reduction)
    fused.backward()
    g_fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), targets.flatten(), reduction=reduction)
    plain.backward()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_fused[n], p.grad, atol=1e-6, rtol=1e-4)


def test_per_token_loss_equals_cross_entropy_none_with_weighted_gradients():
    # reduction="none": each token's loss, and gradients of any weighting of them (GRPO / DPO use
    # per-token log-probs with per-sequence weights), as logits + F.cross_entropy gives
    model = tiny(tie_embeddings=False).train()
    tokens = torch.randint(0, 97, (2, 11))
    targets = tokens[:, 1:].clone()
    targets[1, 4:] = -100
    weights = torch.randn(2, 10)
    per_token = model(tokens[:, :-1], targets=targets, reduction="none")
    assert per_token.shape == (2, 10) and per_token.dtype == torch.float32
    (per_token * weights).sum().backward()
    g_fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), targets, reduction="none")
    (plain * weights).sum().backward()
    torch.testing.assert_close(per_token, plain, atol=1e-5, rtol=1e-5)
    assert torch.all(per_token[1, 4:] == 0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_fused[n], p.grad, atol=1e-6, rtol=1e-4)
    h, w = torch.randn(50, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (50,))
    for chunk_bytes in (4 * 30, 4 * 30 * 7):  # chunk boundaries: 1 row, 7 rows
        torch.testing.assert_close(linear_cross_entropy(h, w, t, reduction="none", chunk_bytes=chunk_bytes),
                                   F.cross_entropy(h @ w.t(), t, reduction="none"))


def test_linear_cross_entropy_chunks_and_no_grad():
    h, w = torch.randn(50, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (50,))
    ref = F.cross_entropy(h @ w.t(), t)
    for chunk_bytes in (4 * 30, 4 * 30 * 7, 2**24):  # 1 row, 7 rows, everything at once
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk_bytes=chunk_bytes), ref)


def test_save_load_round_trip_and_resolver(tmp_path):
    model = tiny(tie_embeddings=True, stable_embedding=True)
    tokens = torch.randint(0, 97, (1, 6))
    run = tmp_path / "run"
    for step in (10, 20, 30):
        save_model(model, run / "checkpoints" / f"step_{step:07d}" / "model")
    for step in (10, 20):  # step 30 never got its COMPLETE marker (killed mid-write)
        (run / "checkpoints" / f"step_{step:07d}" / COMPLETE).write_text("")
    (run / "checkpoints" / "latest").write_text("step_0000020\n")
    (run / "tokenizer.json").write_text("{}")
    assert resolve_model_dir(run) == run / "checkpoints" / "step_0000020" / "model"
    assert resolve_model_dir(run / "checkpoints" / "step_0000010") == run / "checkpoints" / "step_0000010" / "model"
    assert find_tokenizer_dir(run) == run
    # a pointer that lags (killed between the rename and the pointer write): the newest complete
    # step, the same rule --resume follows
    (run / "checkpoints" / "latest").write_text("step_0000010\n")
    assert resolve_model_dir(run).parent.name == "step_0000020"
    (run / "checkpoints" / "latest").unlink()  # no pointer: the highest complete step
    assert resolve_model_dir(run).parent.name == "step_0000020"
    loaded = load_model(run)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)
    meta = json.loads((run / "checkpoints" / "step_0000020" / "model" / "openllama.json").read_text())
    assert meta["format"] == "openllama" and meta["model"]["tie_embeddings"] is True


def test_tokenizer_is_not_taken_from_outside_the_run(tmp_path):
    """A bare model dir without tokenizer files must not pick up one three levels up."""
    model = tiny()
    (tmp_path / "tokenizer.json").write_text("{}")
    save_model(model, tmp_path / "a" / "b" / "model")
    assert find_tokenizer_dir(tmp_path / "a" / "b" / "model") is None


def test_resolver_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_0000005")
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_model_dir(tmp_path)


PRESET_SIZES = {"tiny": (3e6, 8e6), "125m": (1.1e8, 1.4e8), "1b": (0.95e9, 1.2e9), "7b": (6_885_879_808,) * 2,
                "13b": (12.5e9, 13.5e9), "33b": (32e9, 33.5e9), "65b": (64.5e9, 66e9)}


@pytest.mark.parametrize("name", sorted(PRESET_SIZES))
def test_presets_count_on_the_meta_device(name):
    from pathlib import Path

    from openllama.config import read_yaml

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = ModelConfig.model_validate(read_yaml(path)["model"])
    with torch.device("meta"):
        model = Llama(cfg)
    n = model.num_params()
    assert n == count_params(cfg)
    low, high = PRESET_SIZES[name]
    assert low <= n <= high, f"{name}: {n:,} parameters"


def test_linear_cross_entropy_under_bf16_autocast():
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_bytes=4 * 50 * 16)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    ref = F.cross_entropy(h @ w.t(), t)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_rope_table_built_during_inference_serves_training():
    """GRPO generates (inference mode) and then trains the same model: the cached RoPE table
    first built under inference mode must be usable by autograd."""
    import torch

    from openllama.config import ModelConfig
    from openllama.model import Llama

    model = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    tokens = torch.randint(0, 64, (1, 8))
    with torch.inference_mode():
        model(tokens)
    model(tokens).sum().backward()
    assert model.tok_embeddings.weight.grad is not None


def test_cpu_decode_layout_keeps_the_function():
    """Column-major weights for CPU decoding: same shapes, same values, logits equal to rounding,
    tied embeddings still one tensor, greedy tokens unchanged."""
    import copy

    import torch

    from openllama.config import ModelConfig
    from openllama.generate import Generator, SamplingParams
    from openllama.model import Llama, use_cpu_decode_layout

    model = Llama(ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              max_seq_len=64, tie_embeddings=True)).eval()
    relaid = use_cpu_decode_layout(copy.deepcopy(model))
    assert relaid.output.weight is relaid.tok_embeddings.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), relaid.state_dict().items()):
        assert torch.equal(a, b), name
    assert not relaid.layers[0].attention.wq.weight.is_contiguous()  # the layout really changed
    tokens = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(relaid(tokens), model(tokens), rtol=0, atol=1e-4)
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    prompt = tokens[0].tolist()
    assert Generator(relaid).generate([prompt], params)[0].token_ids == Generator(model).generate([prompt], params)[0].token_ids
