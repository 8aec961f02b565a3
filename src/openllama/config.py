"""Typed configs: YAML presets validated into pydantic models, with dotted command-line overrides.

Every config class derives from `Section`, which forbids unknown keys, so a typo is an error that
names its key path (`model.dimm: unknown key`), never a silently ignored setting. `load_config`
is the one entry point: YAML file(s) -> dict -> overrides (`a.b=c`, values parsed as YAML) ->
validated object. Any failure is a `UserError` (one line, exit code 2 in the CLI).

Stage-specific sections (sft, dpo, grpo, serve, ...) live beside their stage and derive from
`Section` too; the shared ones (model, optim, train loop) live here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import UserError

T = TypeVar("T", bound="Section")


class Section(BaseModel):
    """Base of every config block: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ----------------------------------------------------------------------------------------------
# Shared sections


class ModelConfig(Section):
    """A Llama architecture. Hidden size of the SwiGLU follows the Llama recipe:
    int(2/3 * 4 * dim * ffn_dim_multiplier) rounded up to `multiple_of`, unless `hidden_dim` is set."""

    vocab_size: int = 32000
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads
    hidden_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 1024
    dropout: float = 0.0
    stable_embedding: bool = False  # LayerNorm right after the token embedding (the seed's option)
    tie_embeddings: bool = False  # output projection shares the token embedding matrix
    init_std: float = 0.02

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head dimension (dim / n_heads) must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# ----------------------------------------------------------------------------------------------
# Loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise UserError(f"config error: {'.'.join(keys[: i + 1])} is not a section, cannot set {dotted}")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["a.b=3", "c=x"]` -> `{"a": {"b": 3}, "c": "x"}`; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise UserError(f"config error: override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """`{"a.b": 3, "c": None}` -> `{"a": {"b": 3}}`: dotted keys to sections (None values dropped)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if value is not None:
            _set_dotted(tree, key, value)
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 3}}` -> `{"a.b": 3}`: the inverse of `nested`, for comparing configs key by key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: `extra` wins; nested dicts are merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config error: {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"config error: {path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config error: {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def validation_message(exc: ValidationError, source: str = "") -> str:
    """The first validation problem as one line: `config error: <file>: model.dim: <why>`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] != "extra_forbidden" and "input" in err and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        parts.append(f"{loc}: {msg}")
    more = f" (+{len(parts) - 1} more)" if len(parts) > 1 else ""
    where = f"{source}: " if source else ""
    return f"config error: {where}{parts[0]}{more}"


def build(cls: type[T], data: dict[str, Any], source: str = "") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(validation_message(exc, source)) from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None) -> T:
    """YAML file (optional) + dotted overrides -> a validated `cls`. Errors are `UserError`s."""
    data = dict(defaults or {})
    if path is not None:
        data = merge(data, read_yaml(path))
    if overrides:
        data = merge(data, parse_overrides(overrides))
    return build(cls, data, str(path) if path else "")


def dump_config(cfg: Section) -> dict[str, Any]:
    """A plain dict (JSON/YAML-safe) of a config, for self-describing artefacts."""
    return cfg.model_dump(mode="json")


Precision = Literal["auto", "fp32", "bf16", "fp16"]
