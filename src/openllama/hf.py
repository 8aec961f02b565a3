"""Exact conversion between our `Llama` and `transformers.LlamaForCausalLM`, and `openllama export`.

Our layout already follows transformers (half-split RoPE, float32 RMSNorm, no biases), so most of
the conversion is a renaming of tensors. The two seed options need care:

- `stable_embedding` (a LayerNorm right after the token lookup) has no counterpart in
  LlamaForCausalLM. A LayerNorm acts on each embedding row on its own, so `LN(W)[ids] == LN(W[ids])`:
  exporting `embed_tokens = LN(W)` gives the same function exactly.
- `tie_embeddings` with `stable_embedding`: the output projection uses the raw `W` while the input
  side now holds `LN(W)`, so the export is untied (`tie_word_embeddings=False`). Without the
  LayerNorm a tied model stays tied.

An exported directory holds `config.json`, `generation_config.json`, `model.safetensors` and, when
a tokenizer is given, its files, and loads with stock `from_pretrained` and no custom code.
`import_hf` reads such a directory back (any LlamaForCausalLM checkpoint in safetensors).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from .artifacts import CONFIG_FILE, find_tokenizer_dir, resolve_model_dir
from .config import ModelConfig
from .errors import UserError
from .model import Llama, StoredWeights, write_safetensors
from .tokenizer import copy_tokenizer_files

# our name -> transformers name, per layer ("{i}" is the layer index)
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


# ----------------------------------------------------------------------------------------------
# openllama -> transformers


def hf_config(cfg: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """config.json contents for a LlamaForCausalLM with the same function as `Llama(cfg)`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": exports_tied(cfg),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def exports_tied(cfg: ModelConfig) -> bool:
    """A tied model stays tied in transformers unless the embedding LayerNorm had to be folded in."""
    return cfg.tie_embeddings and not cfg.stable_embedding


@torch.no_grad()
def to_hf_state_dict(model: Llama, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, with the embedding LayerNorm folded into the rows."""
    cfg = model.cfg
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    emb = ours["tok_embeddings.weight"]
    if model.embedding_norm is not None:
        # the same kernel as the forward pass, applied to every row at once
        emb = model.embedding_norm(emb)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": emb, "model.norm.weight": ours["norm.weight"]}
    if not exports_tied(cfg):
        out["lm_head.weight"] = ours["tok_embeddings.weight"] if cfg.tie_embeddings else ours["output.weight"]
    for i in range(cfg.n_layers):
        for mine, theirs in _LAYER_NAMES.items():
            out[f"model.layers.{i}.{theirs}"] = ours[f"layers.{i}.{mine}"]
    return {k: (v.to(dtype) if dtype is not None else v).contiguous().cpu().clone() for k, v in out.items()}


def to_hf_model(model: Llama, dtype: torch.dtype = torch.float32):
    """An in-memory `LlamaForCausalLM` with the same function (used by the tests and benchmarks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig.from_dict(hf_config(model.cfg, dtype=dtype))
    with torch.device("meta"):
        hf = LlamaForCausalLM(conf)
    state = to_hf_state_dict(model, dtype)
    if exports_tied(model.cfg):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True, assign=True)
    if exports_tied(model.cfg):
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # buffers (rotary inv_freq) were created on meta: rebuild them on the CPU
    hf.model.rotary_emb = type(hf.model.rotary_emb)(conf)
    return hf.eval()


def _token_ids(tokenizer_dir: Path | None) -> dict[str, int | None]:
    if tokenizer_dir is None:
        return {"bos_id": None, "eos_id": None, "pad_id": None}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {"bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id}


def export_hf(model_or_dir: Llama | str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write a transformers LlamaForCausalLM directory. `model_or_dir` is a `Llama`, a model dir, a
    checkpoint step dir (of a sharded run too) or a run dir (see `resolve_model_dir`); from a
    directory the weights stream tensor by tensor (peak memory: about one tensor, not the model).
    The tokenizer, when found beside the model or given, is copied too. Written to a temp dir and
    renamed, so a failure leaves nothing."""
    if isinstance(model_or_dir, Llama):
        cfg, tok_dir = model_or_dir.cfg, Path(tokenizer_dir) if tokenizer_dir else None
        tensors = _model_tensors(model_or_dir, dtype)
    else:
        weights = StoredWeights(model_or_dir)
        cfg = weights.cfg
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else find_tokenizer_dir(model_or_dir)
        tensors = _stored_tensors(weights, dtype)
    if tok_dir is not None and not any((tok_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{tok_dir}: no tokenizer.json or tokenizer.model in this tokenizer directory")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: output directory exists and is not empty")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ids = _token_ids(tok_dir)
        conf = hf_config(cfg, dtype=dtype, **ids)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n", encoding="utf-8")
        gen = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"],
               "do_sample": True, "temperature": 0.7, "top_p": 0.9}
        (tmp / "generation_config.json").write_text(
            json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2) + "\n", encoding="utf-8")
        write_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        if tok_dir is not None:
            copy_tokenizer_files(tok_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


# a tensor to write: (name, shape, a function giving its values when it is written)
HFTensor = tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]


def _hf_layout(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(transformers name, our name) of every exported tensor, in file order; our name
    "tok_embeddings.weight+norm" is the embedding with the stable-embedding LayerNorm folded in."""
    emb = "tok_embeddings.weight+norm" if cfg.stable_embedding else "tok_embeddings.weight"
    pairs = [("model.embed_tokens.weight", emb)]
    for i in range(cfg.n_layers):
        pairs += [(f"model.layers.{i}.{theirs}", f"layers.{i}.{mine}") for mine, theirs in _LAYER_NAMES.items()]
    pairs.append(("model.norm.weight", "norm.weight"))
    if not exports_tied(cfg):
        pairs.append(("lm_head.weight", "tok_embeddings.weight" if cfg.tie_embeddings else "output.weight"))
    return pairs


def _stored_tensors(weights: StoredWeights, dtype: torch.dtype) -> list[HFTensor]:
    def read(ours: str) -> torch.Tensor:
        if ours.endswith("+norm"):  # the same kernel as the model's embedding LayerNorm (eps 1e-5)
            emb = weights.get("tok_embeddings.weight")
            norm = (weights.get("embedding_norm.weight"), weights.get("embedding_norm.bias"))
            return torch.nn.functional.layer_norm(emb, emb.shape[-1:], *norm, eps=1e-5).to(dtype)
        return weights.get(ours).to(dtype)

    shape = {name: spec[0] for name, spec in weights.specs.items()}
    shape["tok_embeddings.weight+norm"] = shape["tok_embeddings.weight"]
    return [(hf, shape[ours], lambda ours=ours: read(ours)) for hf, ours in _hf_layout(weights.cfg)]


def _model_tensors(model: Llama, dtype: torch.dtype) -> list[HFTensor]:
    state = to_hf_state_dict(model, dtype)
    return [(name, tuple(t.shape), lambda t=t: t) for name, t in state.items()]


# ----------------------------------------------------------------------------------------------
# transformers -> openllama


def config_from_hf(conf: dict, source: str = "config.json") -> ModelConfig:
    """A transformers Llama config.json -> ModelConfig; features we do not model are errors."""
    if conf.get("model_type") != "llama":
        raise UserError(f"{source}: model_type is {conf.get('model_type')!r}, only 'llama' can be imported")
    rope = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"{source}: rope type {rope_type!r} is not supported (only plain RoPE)")
    for key in ("attention_bias", "mlp_bias"):
        if conf.get(key):
            raise UserError(f"{source}: {key}=true is not supported (our Llama has no biases)")
    if conf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {conf['hidden_act']!r} is not supported (only silu)")
    dim, heads = conf["hidden_size"], conf["num_attention_heads"]
    if conf.get("head_dim") not in (None, dim // heads):
        raise UserError(f"{source}: head_dim {conf['head_dim']} != hidden_size / num_attention_heads is not supported")
    kv = conf.get("num_key_value_heads") or heads
    return ModelConfig(
        vocab_size=conf["vocab_size"], dim=dim, n_layers=conf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=None if kv == heads else kv, hidden_dim=conf["intermediate_size"],
        norm_eps=conf.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", conf.get("rope_theta", 10000.0)),
        max_seq_len=conf.get("max_position_embeddings", 2048), tie_embeddings=bool(conf.get("tie_word_embeddings")),
        stable_embedding=False, init_std=conf.get("initializer_range", 0.02),
    )


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{hf_dir}: no model.safetensors (or sharded index); save the model with "
                        f"safe_serialization=True")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(hf_dir / name)))
    return state


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers tensor names -> ours (our `output.weight` is omitted when tied)."""
    state = {k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in state.items()}
    out = {"tok_embeddings.weight": state["embed_tokens.weight"], "norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        if "lm_head.weight" not in state:
            raise UserError("lm_head.weight missing from an untied checkpoint")
        out["output.weight"] = state["lm_head.weight"]
    reverse = {theirs: mine for mine, theirs in _LAYER_NAMES.items()}
    for i in range(cfg.n_layers):
        for theirs, mine in reverse.items():
            key = f"layers.{i}.{theirs}"
            if key not in state:
                raise UserError(f"checkpoint has no tensor model.{key}")
            out[f"layers.{i}.{mine}"] = state[key]
    return out


def import_hf(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> Llama:
    """Load a transformers LlamaForCausalLM directory (config.json + safetensors) as our `Llama`."""
    hf_dir = Path(hf_dir)
    conf_path = hf_dir / "config.json"
    if not conf_path.is_file():
        raise UserError(f"{hf_dir}: no config.json (not a transformers model directory)")
    try:
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{conf_path}: invalid JSON ({exc})") from None
    cfg = config_from_hf(conf, str(conf_path))
    state = from_hf_state_dict(_read_hf_weights(hf_dir), cfg)
    with torch.device("meta"):
        model = Llama(cfg)
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


# ----------------------------------------------------------------------------------------------
# `openllama export`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a model dir (openllama.json), a checkpoint step dir or a run dir "
                                     "(its checkpoints/latest is used)")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: found beside the model or in the run dir)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def run(args: argparse.Namespace) -> int:
    model_dir = resolve_model_dir(args.path)
    tok_dir = Path(args.tokenizer) if args.tokenizer else find_tokenizer_dir(args.path)
    out = export_hf(model_dir, args.out, tokenizer_dir=tok_dir, dtype=getattr(torch, args.dtype))
    note = f" with tokenizer from {tok_dir}" if tok_dir else " (no tokenizer found: pass --tokenizer)"
    print(f"exported {model_dir} -> {out}{note}")
    return 0


__all__ = ["export_hf", "import_hf", "to_hf_model", "to_hf_state_dict", "hf_config", "config_from_hf",
           "from_hf_state_dict", "copy_tokenizer_files", "CONFIG_FILE"]
