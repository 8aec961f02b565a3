"""Objectives: what a batch holds and what its loss is. The loop itself is in engine.py.

`Objective` is the contract every stage's objective follows (pretraining here; sft, reward, dpo and
grpo in their stage modules): the engine calls its methods and nothing else, and the optional
hooks have do-nothing defaults, so the engine never asks what an objective happens to have.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Iterator

import torch
from pydantic import Field, field_validator

from ..config import Section
from ..data.packing import PackedBatches, TokenCorpus, eval_batches, split_by_category
from ..errors import UserError
from ..evaluate import bits_per_byte, language_model_loss
from ..labels import IGNORE_INDEX
from .metrics import CategoryTally


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

    def step_sums(self, device: torch.device) -> torch.Tensor | None:
        """Numbers this rank gathered over the micro-batches of the step now ending: a 1-D float64
        tensor, the same length on every rank, that the engine sums over ranks (in the all-reduce
        it makes anyway) and hands to `step_metrics`. None: nothing."""
        return None

    def step_metrics(self, summed: torch.Tensor) -> dict[str, float]:
        """The step's metrics from `step_sums` summed over ranks (logged as they are, not averaged)."""
        return {}


class CorpusSource(Section):
    path: str  # a token-shard directory (`openllama data tokenize`)
    weight: float = Field(1.0, gt=0)  # mixing weight; shares are weight / sum(weights)


class PretrainData(Section):
    """Token shards to train on, with mixing weights, and the held-out text for evaluation:
    `val` (a separate token-shard directory), or else the last documents of every training corpus
    (`val_docs` each, or `val_fraction` of them), which training then never sees."""

    train: list[CorpusSource] = []
    # mixing by data category instead of by directory (docs/data.md): {category: weight}, shares
    # weight / sum(weights); every category of the training data needs one (0 leaves it out)
    category_weights: dict[str, Annotated[float, Field(ge=0)]] = {}
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


# Beyond this many categories per-category metrics are left out: a plain jsonl corpus of 1,000 part
# files has one category per file stem, which would put 2,000 keys in every metrics line.
MAX_LOGGED_CATEGORIES = 64


def check_category_weights(data: PretrainData, corpora: list[TokenCorpus]) -> None:
    """data.category_weights against the categories the training documents have: each named one
    exists, each present one has a weight, some weight is positive, directory weights stay 1."""
    present = sorted({n for c in corpora for n in c.category_tokens()})
    given = data.category_weights
    unknown = sorted(set(given) - set(present))
    if unknown:
        raise UserError(f"data.category_weights.{unknown[0]}: no such category in data.train "
                        f"(its categories: {', '.join(present)})")
    missing = [n for n in present if n not in given]
    if missing:
        raise UserError(f"data.category_weights: no weight for {', '.join(missing)} (every category of "
                        f"data.train needs one; 0 leaves a category out)")
    if not any(given[n] > 0 for n in present):
        raise UserError("data.category_weights: every weight is 0, nothing left to train on")
    fixed = [i for i, s in enumerate(data.train) if s.weight != 1]
    if fixed:
        raise UserError(f"data.train[{fixed[0]}].weight: per-directory weights and data.category_weights "
                        f"exclude each other (leave the directory weights at 1)")


class PretrainObjective(Objective):
    """Next-token prediction on packed windows; loss is the mean cross-entropy over the predicted
    tokens of a micro-batch (labels that cross a document boundary are ignored). With more than one
    data category, also the loss and tokens seen per category (`CategoryTally`) and the
    validation loss per category."""

    def __init__(self, data: PretrainData, seq_len: int, micro_batch_size: int, seed: int = 0,
                 eval_batches: int = 8, vocab_size: int | None = None, eval_tasks: list[str] | None = None,
                 eval_tasks_limit: float | None = None):
        if not data.train:
            raise UserError("data.train: no token shards given (set data.train=DIR or a list of {path, weight})")
        self.seq_len, self.micro_batch_size, self.seed, self.eval_batches = seq_len, micro_batch_size, seed, eval_batches
        self.weights = [s.weight for s in data.train]
        self.corpora, self.val = self._load_corpora(data, seq_len, vocab_size)
        self.categories = sorted({n for c in self.corpora + self.val for n in c.categories})
        self.tally = CategoryTally(self.categories) if 1 < len(self.categories) <= MAX_LOGGED_CATEGORIES else None
        if len(self.categories) > MAX_LOGGED_CATEGORIES:
            print(f"pretrain: {len(self.categories)} data categories (e.g. one per input file of a plain "
                  f"jsonl corpus): more than {MAX_LOGGED_CATEGORIES}, so no per-category metrics are logged")
        self.streams, self.stream_weights = self.corpora, self.weights
        if data.category_weights:
            check_category_weights(data, self.corpora)
            self.streams, self.stream_weights = split_by_category(self.corpora, data.category_weights,
                                                                  min_tokens=seq_len + 1)
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

    @staticmethod
    def _load_corpora(data: PretrainData, seq_len: int, vocab_size: int | None):
        """(training corpora, held-out corpora): the held-out part is data.val, or else the last
        documents of every training directory."""
        corpora, val = [], []
        for i, source in enumerate(data.train):
            full = TokenCorpus(source.path)
            tok = full.manifest.get("tokenizer", {})
            if vocab_size is not None and tok.get("vocab_size", 0) > vocab_size:
                raise UserError(f"data.train[{i}].path: {source.path} was tokenized with vocab_size "
                                f"{tok['vocab_size']}, larger than model.vocab_size {vocab_size}")
            if i and tok.get("fingerprint") != corpora[0].manifest.get("tokenizer", {}).get("fingerprint"):
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
            corpora.append(TokenCorpus(source.path, (0, full.num_docs - held)) if held else full)
            if held:
                val.append(TokenCorpus(source.path, (full.num_docs - held, full.num_docs)))
        if data.val is not None:
            val = [TokenCorpus(data.val)]
        for corpus in val:
            if corpus.num_tokens < seq_len + 1:
                raise UserError(f"{corpus.path}: held-out part has {corpus.num_tokens} tokens, fewer than one window of "
                                f"train.seq_len {seq_len} + 1 (raise data.val_docs or give data.val)")
        return corpora, val

    def train_batches(self, rank: int, world: int) -> PackedBatches:
        return PackedBatches(self.streams, self.stream_weights, self.seq_len, self.micro_batch_size, self.seed, rank,
                             world, categories=self.categories)

    def loss(self, model, batch: dict[str, torch.Tensor]):
        # the model's fused output projection + cross-entropy: the (B, T, vocab) logits never exist
        # (same value and gradients as logits + F.cross_entropy, less time and memory); its per-token
        # losses come from the same pass (`row_losses`), so the per-category tally costs no matmul
        targets = batch["targets"]
        rows = torch.empty(targets.numel(), dtype=torch.float32, device=targets.device) if self.tally else None
        loss = model(batch["tokens"], doc_ids=batch["doc_ids"], targets=targets, ignore_index=IGNORE_INDEX,
                     row_losses=rows)
        if self.tally is not None:
            self.tally.add(rows, targets, batch["category"], IGNORE_INDEX)
        return loss, {}, batch["tokens"].numel()

    def step_sums(self, device: torch.device) -> torch.Tensor | None:
        return self.tally.pending(device) if self.tally is not None else None

    def step_metrics(self, summed: torch.Tensor) -> dict[str, float]:
        return self.tally.finish(summed) if self.tally is not None else {}

    def state_dict(self) -> dict[str, Any] | None:
        return {"category_tokens_seen": self.tally.state_dict()} if self.tally is not None else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.tally is not None and "category_tokens_seen" in state:
            self.tally.load_state_dict(state["category_tokens_seen"])

    @torch.no_grad()
    def _held_out(self, model, corpus: TokenCorpus, sums: torch.Tensor | None) -> tuple[float, int]:
        """(mean loss, scored targets) on a held-out corpus, as `openllama evaluate` computes it; its
        per-token losses go into `sums` ((2, K + 1): loss and scored targets per category, bin K
        unscored)."""
        def per_category(batch: dict, targets: torch.Tensor, rows: torch.Tensor) -> None:
            valid = targets.reshape(-1) != IGNORE_INDEX
            scored = torch.where(valid, batch["category"].to(rows.device).reshape(-1), len(self.categories))
            sums[0].index_add_(0, scored, rows.double())
            sums[1].index_add_(0, scored, torch.ones_like(rows, dtype=torch.float64))

        batches = eval_batches(corpus, self.seq_len, self.micro_batch_size, self.eval_batches, self.categories)
        return language_model_loss(model, batches, per_token=per_category if sums is not None else None)

    def _validation(self, model) -> dict[str, float]:
        """val_loss / val_bits_per_byte weighted over the held-out corpora by mixing weight (and each
        corpus's when there are several); val_loss/<category>: token-weighted over all of them."""
        device = next(model.parameters()).device
        sums = torch.zeros(2, len(self.categories) + 1, dtype=torch.float64, device=device) if self.tally else None
        losses, bpbs = [], []
        for corpus in self.val:
            losses.append(self._held_out(model, corpus, sums)[0])
            bpbs.append(bits_per_byte(losses[-1], corpus.tokens_per_byte))
        weights = self.weights if len(losses) == len(self.weights) else [1.0] * len(losses)
        out = {"val_loss": sum(w * x for w, x in zip(weights, losses)) / sum(weights),
               "val_bits_per_byte": sum(w * x for w, x in zip(weights, bpbs)) / sum(weights)}
        if len(losses) > 1:
            for i, (loss, bpb) in enumerate(zip(losses, bpbs)):
                out[f"val_loss_{i}"], out[f"val_bits_per_byte_{i}"] = loss, bpb
        if sums is not None:
            loss, scored = sums.tolist()
            out.update({f"val_loss/{n}": loss[k] / scored[k] for k, n in enumerate(self.categories) if scored[k] > 0})
        return out

    def evaluate(self, model) -> dict[str, float]:
        """Validation loss and bits per byte (`_validation`) and the train.eval_tasks scores
        (`lm_eval/<task>/<metric>`, `core`): every rank runs the same items, so the numbers agree
        everywhere."""
        out: dict[str, float] = self._validation(model) if self.val else {}
        if self.lm_eval is not None:
            out.update(self.lm_eval.scores(model))
        return out
