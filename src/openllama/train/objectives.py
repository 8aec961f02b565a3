"""Objectives: what a batch holds and what its loss is. The loop itself is in engine.py.

`Objective` is the contract every stage's objective follows (pretraining here; sft, reward, dpo and
grpo in their stage modules): the engine calls its methods and nothing else, and the optional
hooks have do-nothing defaults, so the engine never asks what an objective happens to have.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import Field, field_validator

from ..config import Section
from ..data.packing import PackedBatches, TokenCorpus
from ..errors import UserError
from ..evaluate import evaluate_corpus
from ..labels import IGNORE_INDEX


class Objective:
    """What the engine trains on. Subclasses implement `train_batches` and `loss`."""

    # True when the objective generates with the model (GRPO): a sharded model cannot do that rank
    # by rank, so the engine refuses train.strategy=fsdp2 for it
    needs_full_model: bool = False

    def train_batches(self, rank: int, world: int) -> Iterator[dict[str, Any]]:
        """Endless dict batches for this rank, with `state_dict()` / `load_state_dict()` (the data
        position, saved in checkpoints so a resume continues exactly)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float], int]:
        """(micro-batch mean loss, metrics averaged over micro-batches and ranks, tokens the model
        processed without padding: for tokens/s, MFU and tokens_seen)."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out numbers, called on every rank in eval mode under no_grad; {}: nothing to report."""
        return {}

    def setup(self, accelerator) -> None:
        """Once, after the model is prepared (e.g. move a frozen reference model to the device)."""

    def state_dict(self) -> dict[str, Any] | None:
        """The objective's own state to checkpoint (None: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CorpusSource(Section):
    path: str  # a token-shard directory (`openllama data tokenize`)
    weight: float = Field(1.0, gt=0)  # mixing weight; shares are weight / sum(weights)


class PretrainData(Section):
    """Token shards to train on, with mixing weights, and the held-out text for evaluation:
    `val` (a separate token-shard directory), or else the last documents of every training corpus
    (`val_docs` each, or `val_fraction` of them), which training then never sees."""

    train: list[CorpusSource] = []
    val: str | None = None
    val_docs: int | None = Field(None, gt=0)
    val_fraction: float = Field(0.01, ge=0, lt=1)
    # sha256 of every token shard against its manifest before training: None (default) does it for
    # directories up to VERIFY_AUTO_BYTES (about a second per GiB); sizes and indexes are always checked
    verify_sha256: bool | None = None

    @field_validator("train", mode="before")
    @classmethod
    def _paths_as_sources(cls, value):
        # `data.train=DIR` or a list of dirs is shorthand for weight 1 each
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [{"path": v} if isinstance(v, str) else v for v in value]
        return value


def tokenizer_dir_of(token_dir: str | Path) -> Path | None:
    """Where the tokenizer files of a token-shard directory are: beside the shards, in a
    `tokenizer/` subfolder, or at the path the manifest records."""
    token_dir = Path(token_dir)
    manifest = TokenCorpus(token_dir).manifest if (token_dir / "manifest.json").is_file() else {}
    candidates = [token_dir, token_dir / "tokenizer"]
    source = manifest.get("source")
    recorded = source.get("tokenizer_dir") if isinstance(source, dict) else None
    if recorded:  # recorded as given to `data tokenize`: absolute, or relative to where it ran
        candidates += [Path(recorded), token_dir / recorded, token_dir.parent / recorded]
    for c in candidates:
        if (c / "tokenizer.json").is_file() or (c / "tokenizer.model").is_file():
            return c
    return None


VERIFY_AUTO_BYTES = 1 << 30


def check_token_dir(path: str | Path, key: str, verify_sha256: bool | None = None) -> None:
    """Before any training: the shards' bytes match their manifest (sha256) and the tokenizer that
    goes with them is the one that made them (fingerprint). A mismatch is a one-line UserError."""
    from ..data.tokens import TokenShards

    shards = TokenShards(path)  # sizes and document indexes against the manifest
    size = sum(f.stat().st_size for f in Path(path).glob("*.bin"))
    if verify_sha256 or (verify_sha256 is None and size <= VERIFY_AUTO_BYTES):
        shards.verify()
    source = shards.manifest.get("source")
    recorded = source.get("tokenizer_dir") if isinstance(source, dict) else None
    tok_dir = tokenizer_dir_of(path)
    if tok_dir is None:
        if recorded:
            raise UserError(f"{key}: the tokenizer that made {path} ({recorded}) is missing; put its files "
                            f"in {Path(path) / 'tokenizer'}")
        return
    from ..tokenizer import Tokenizer

    made_with = shards.manifest.get("tokenizer", {}).get("fingerprint")
    found = Tokenizer.load(tok_dir).fingerprint
    if made_with != found:
        raise UserError(f"{key}: {path} was tokenized with tokenizer {str(made_with)[:12]} but the tokenizer "
                        f"at {tok_dir} is {found[:12]}; re-run `openllama data tokenize` or restore the tokenizer")


class PretrainObjective(Objective):
    """Next-token prediction on packed windows; loss is the mean cross-entropy over the predicted
    tokens of a micro-batch (labels that cross a document boundary are ignored)."""

    def __init__(self, data: PretrainData, seq_len: int, micro_batch_size: int, seed: int = 0,
                 eval_batches: int = 8, vocab_size: int | None = None, eval_tasks: list[str] | None = None,
                 eval_tasks_limit: float | None = None):
        if not data.train:
            raise UserError("data.train: no token shards given (set data.train=DIR or a list of {path, weight})")
        self.seq_len, self.micro_batch_size, self.seed, self.eval_batches = seq_len, micro_batch_size, seed, eval_batches
        self.weights = [s.weight for s in data.train]
        self.corpora: list[TokenCorpus] = []
        self.val: list[TokenCorpus] = []
        for i, source in enumerate(data.train):
            full = TokenCorpus(source.path)
            tok = full.manifest.get("tokenizer", {})
            if vocab_size is not None and tok.get("vocab_size", 0) > vocab_size:
                raise UserError(f"data.train[{i}].path: {source.path} was tokenized with vocab_size "
                                f"{tok['vocab_size']}, larger than model.vocab_size {vocab_size}")
            if i and tok.get("fingerprint") != self.corpora[0].manifest.get("tokenizer", {}).get("fingerprint"):
                raise UserError(f"data.train[{i}].path: {source.path} uses another tokenizer than data.train[0]")
            held = 0
            if data.val is None:
                if data.val_docs:
                    held = data.val_docs
                elif data.val_fraction:
                    held = max(1, math.ceil(full.num_docs * data.val_fraction))
                if held >= full.num_docs:
                    raise UserError(f"data.train[{i}].path: holding out {held} of {full.num_docs} documents leaves "
                                    f"nothing to train on (lower data.val_docs / data.val_fraction)")
            self.corpora.append(TokenCorpus(source.path, (0, full.num_docs - held)) if held else full)
            if held:
                self.val.append(TokenCorpus(source.path, (full.num_docs - held, full.num_docs)))
        if data.val is not None:
            self.val = [TokenCorpus(data.val)]
        for corpus in self.val:
            if corpus.num_tokens < seq_len + 1:
                raise UserError(f"{corpus.path}: held-out part has {corpus.num_tokens} tokens, fewer than one window of "
                                f"train.seq_len {seq_len} + 1 (raise data.val_docs or give data.val)")
        self.tokenizer_dir = tokenizer_dir_of(data.train[0].path)
        for i, source in enumerate(data.train):
            check_token_dir(source.path, f"data.train[{i}].path", data.verify_sha256)
        if data.val is not None:
            check_token_dir(data.val, "data.val", data.verify_sha256)
        self.lm_eval = None  # train.eval_tasks: lm-eval tasks loaded now, so a bad name fails before step 1
        if eval_tasks:
            from ..lm_eval_backend import TaskSuite
            from ..tokenizer import Tokenizer

            if self.tokenizer_dir is None:
                raise UserError("train.eval_tasks: the token shards have no tokenizer beside them to encode the tasks")
            self.lm_eval = TaskSuite(eval_tasks, Tokenizer.load(self.tokenizer_dir), limit=eval_tasks_limit)

    def train_batches(self, rank: int, world: int) -> PackedBatches:
        return PackedBatches(self.corpora, self.weights, self.seq_len, self.micro_batch_size, self.seed, rank, world)

    def loss(self, model, batch: dict[str, torch.Tensor]):
        # the model's fused output projection + cross-entropy: the (B, T, vocab) logits never exist
        # (same value and gradients as logits + F.cross_entropy, less time and memory)
        loss = model(batch["tokens"], doc_ids=batch["doc_ids"], targets=batch["targets"], ignore_index=IGNORE_INDEX)
        return loss, {}, batch["tokens"].numel()

    def evaluate(self, model) -> dict[str, float]:
        """Validation loss and bits per byte, weighted over the held-out corpora by mixing weight, and
        the train.eval_tasks scores (`lm_eval/<task>/<metric>`, `core`): every rank runs the same
        items, so the numbers agree everywhere."""
        out: dict[str, float] = {}
        if self.val:
            results = [evaluate_corpus(model, c, self.seq_len, self.micro_batch_size, self.eval_batches)
                       for c in self.val]
            weights = self.weights if len(results) == len(self.weights) else [1.0] * len(results)
            total = sum(weights)
            for key in ("loss", "bits_per_byte"):
                out[f"val_{key}"] = sum(w * r[key] for w, r in zip(weights, results)) / total
            if len(results) > 1:
                for i, r in enumerate(results):
                    out[f"val_loss_{i}"], out[f"val_bits_per_byte_{i}"] = r["loss"], r["bits_per_byte"]
        if self.lm_eval is not None:
            out.update(self.lm_eval.scores(model))
        return out
