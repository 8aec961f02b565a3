"""lm-evaluation-harness on our models: the lm-eval model "openllama", task loading, and the scores
a training run logs.

`OpenLlamaLM` is an lm-eval `TemplateLM` over our own model and tokenizer (a model, step, run or
exported Hugging Face directory, through `generate.load_for_inference`, or objects in memory):

- log-likelihoods: requests whose contexts are equal share one packed row: the context once, then
  every continuation (less its last token, which is only predicted) with a tree attention mask
  (a continuation sees the context and itself, never its siblings) and positions that restart
  after the context for each. Multiple choice with k answers costs one context, not k. The final
  hidden states of the scored positions only are projected to the vocabulary, so the (B, T, V)
  logits never exist. Rows are batched longest first by tokens: `batch_size` rows of the full
  context, or as many shorter rows as that holds.
- `generate_until`: our `Generator` (KV cache, the slot-batched decode core that gives each row what it
  gives alone, batched by the same token budget), greedy unless a task asks to sample; the text
  ends where `hf` (at batch size 1, where its output does not depend on the other rows) ends it.
- tokenisation: what lm-eval's `hf` backend does with the exported tokenizer (`openllama export`):
  our tokenizer_config.json says `add_bos_token: false`, so no BOS is added unless a prompt
  starts with `<s>` itself or `add_bos_token=True` is given (as `hf` takes it); an empty context
  is the BOS token (lm-eval's prefix token). Contexts are cut from the left to the model's context.

Exactness: tests/test_lm_eval.py runs lm-eval's own `hf` backend on `openllama export` of the same
model: same metrics, per-item log-likelihoods within 1e-4.

`evaluate_tasks` runs task names, YAML files and directories of YAMLs through `simple_evaluate`;
`TaskSuite` keeps loaded tasks for evaluation during training (every rank runs it: the scores are
the same everywhere); `flat_scores` / `core_score` turn results into `lm_eval/<task>/<metric>`
numbers and the centred average over tasks (accuracy above chance, as nanochat's CORE).
lm-eval is an optional extra (`pip install 'openllama[eval]'`); without it only the scoring
functions here work.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import UserError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # the optional extra is missing: the packing and scoring functions still work
    TemplateLM, register_model = object, None

INSTALL_HINT = "lm-eval is not installed: pip install 'openllama[eval]' (or 'lm-eval[hf]>=0.4,<0.5')"
ACCURACY_METRICS = ("acc", "exact_match")  # the metric a task's centred score is taken from, in order


def require_lm_eval() -> None:
    if register_model is None:
        raise UserError(INSTALL_HINT)


# -- log-likelihoods: shared-context packing ---------------------------------------------------


@dataclass
class Row:
    """One packed input row: a context, then continuations that each see the context and themselves."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the context; j + 1: continuation j
    scored: list[tuple[int, list[int], list[int]]] = field(default_factory=list)
    # (request index, row positions whose next-token distribution is scored, their target ids)

    def add(self, index: int, continuation: list[int], context_len: int) -> None:
        start, seg = len(self.tokens), len(self.scored) + 1
        fed = continuation[:-1]  # the last token is predicted, never fed
        self.tokens += fed
        self.positions += range(context_len, context_len + len(fed))
        self.segments += [seg] * len(fed)
        self.scored.append((index, [context_len - 1, *range(start, start + len(fed))], continuation))


def pack_requests(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
                  max_row: int | None = None) -> list[Row]:
    """Rows for (context ids, continuation ids) pairs. Each pair is first cut to the model's
    context as lm-eval's `hf` backend cuts it (the last max_length + 1 tokens of context +
    continuation); pairs left with equal contexts share a row while it stays under `max_row`."""
    max_row = max_row or 2 * max_length
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (context, continuation) in enumerate(pairs):
        continuation = list(continuation)
        if not continuation or len(continuation) > max_length:
            raise UserError(f"lm-eval request {i}: continuation of {len(continuation)} tokens; it must have "
                            f"1..{max_length} (the model's context)")
        full = (list(context) + continuation)[-(max_length + 1):]
        prefix = tuple(full[:len(full) - len(continuation)])
        if not prefix:
            raise UserError(f"lm-eval request {i}: empty context (lm-eval gives the BOS token for one)")
        groups.setdefault(prefix, []).append((i, continuation))
    rows: list[Row] = []
    for prefix, members in groups.items():
        row = None
        for i, continuation in members:
            if row is None or len(row.tokens) + len(continuation) - 1 > max_row:
                row = Row(list(prefix), list(range(len(prefix))), [0] * len(prefix))
                rows.append(row)
            row.add(i, continuation, len(prefix))
    return rows


def token_budget_batches(items: list, lengths: list[int], max_tokens: int) -> list[list]:
    """`items` (longest first) in batches whose rows x width (the first item's length) stays within
    `max_tokens`: as many short rows as batch_size rows of the full context would take."""
    batches: list[list] = []
    width = 0
    for item, length in zip(items, lengths):
        if batches and (len(batches[-1]) + 1) * width <= max_tokens:
            batches[-1].append(item)
        else:
            batches.append([item])
            width = length  # the first (longest) row sets the batch's width
    return batches


def row_batches(rows: list[Row], max_tokens: int) -> list[list[Row]]:
    """Rows longest first, batched by tokens: short rows (multiple choice) go many to a forward
    pass, where a fixed number of rows would leave each pass tiny."""
    ordered = sorted(rows, key=lambda r: -len(r.tokens))
    return token_budget_batches(ordered, [len(r.tokens) for r in ordered], max_tokens)


def batch_tensors(rows: list[Row], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, positions, attention mask (B, 1, T, T)) of right-padded rows."""
    B, T = len(rows), max(len(r.tokens) for r in rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.tokens)
        tokens[b, :n], positions[b, :n] = torch.tensor(r.tokens), torch.tensor(r.positions)
        segments[b, :n] = torch.tensor(r.segments)
    idx = torch.arange(T)
    causal = idx[:, None] >= idx[None, :]
    key_seg = segments[:, None, :]
    # a query sees earlier keys of the context and of its own continuation, never padding
    mask = causal & ((key_seg == 0) | (key_seg == segments[:, :, None])) & (key_seg >= 0)
    mask |= torch.eye(T, dtype=torch.bool)  # a padding query sees itself: no all-masked row
    return tokens.to(device), positions.to(device), mask[:, None].to(device)


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output projection as a plain tensor (gathered when FSDP2 shards it: every rank calls this)."""
    weight = model.output.weight
    full = getattr(weight, "full_tensor", None)
    return (full() if callable(full) else weight).detach()


def token_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 chunk_bytes: int = 2**26) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), target is the argmax) per row of `hidden` (N, d), in float32, a chunk of
    rows at a time so at most `chunk_bytes` of logits exist."""
    chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
    logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    greedy = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    w = weight.float()
    with torch.autocast(hidden.device.type, enabled=False):  # float32 scores under a bf16 evaluation
        for s in range(0, hidden.shape[0], chunk):
            logits = hidden[s:s + chunk].float() @ w.t()
            t = targets[s:s + chunk, None]
            logp[s:s + chunk] = (logits.gather(1, t) - torch.logsumexp(logits, -1, keepdim=True)).squeeze(1)
            greedy[s:s + chunk] = logits.argmax(-1) == t.squeeze(1)
    return logp, greedy


@torch.no_grad()
def score_rows(model: torch.nn.Module, rows: list[Row], weight: torch.Tensor) -> list[tuple[int, float, bool]]:
    """(request index, summed log-probability, every token greedy) of each continuation in `rows`,
    from one forward pass to the final hidden states."""
    tokens, positions, mask = batch_tensors(rows, weight.device)
    hidden = model(tokens, positions=positions, attn_mask=mask, return_hidden=True)
    where_b, where_t, targets, owners = [], [], [], []
    for b, row in enumerate(rows):
        for index, scored_at, target in row.scored:
            where_b += [b] * len(scored_at)
            where_t += scored_at
            targets += target
            owners.append((index, len(target)))
    picked = hidden[torch.tensor(where_b, device=hidden.device), torch.tensor(where_t, device=hidden.device)]
    logp, greedy = token_scores(picked, weight, torch.tensor(targets, device=hidden.device))
    out, k = [], 0
    for index, n in owners:
        out.append((index, float(logp[k:k + n].sum()), bool(greedy[k:k + n].all())))
        k += n
    return out


def score_continuations(model: torch.nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        max_length: int, batch_size: int = 16, progress: bool = False) -> list[tuple[float, bool]]:
    """lm-eval's loglikelihood for token pairs: (log p(continuation | context), greedy) each, in order."""
    from tqdm import tqdm

    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    weight = output_weight(model)
    # batch_size rows of the full context: the token budget of one forward pass
    batches = row_batches(pack_requests(pairs, max_length), batch_size * max_length)
    try:
        for batch in tqdm(batches, desc="log-likelihoods", unit="batch", disable=not progress):
            for index, logp, greedy in score_rows(model, batch, weight):
                results[index] = (logp, greedy)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


# -- the lm-eval model ---------------------------------------------------------------------------


def _flag(value: Any) -> bool | None:
    """A model_args value ("True", "false", True, None) as a bool or None."""
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes")


class OpenLlamaLM(TemplateLM):
    """lm-eval's view of an openllama model: `simple_evaluate(model="openllama", model_args=
    "pretrained=DIR")` once this module is imported, or `OpenLlamaLM(model=..., tokenizer=...)`."""

    backend = "causal"

    def __init__(self, pretrained: str | None = None, *, model: torch.nn.Module | None = None, tokenizer: Any = None,
                 device: str | None = "cpu", dtype: str = "auto", batch_size: int | str | None = 16,
                 max_batch_size: int | None = None,  # lm-eval passes it; batches are budgeted by tokens
                 max_length: int | None = None, add_bos_token: Any = None,
                 max_gen_toks: int = 256, progress: Any = False, name: str | None = None) -> None:
        require_lm_eval()
        super().__init__()
        if model is None:
            if pretrained is None:
                raise UserError("the openllama lm-eval model needs pretrained=DIR (a model, step, run or HF dir)")
            from .generate import load_for_inference

            loaded = load_for_inference(pretrained, device=device or "cpu", dtype=dtype)
            model, tokenizer = loaded.model, loaded.tokenizer
        if tokenizer is None:
            raise UserError("the openllama lm-eval model needs a tokenizer")
        self.model, self.tok = model, tokenizer
        self.name = name or str(pretrained or "openllama")
        self._max_length = int(max_length or model.cfg.max_seq_len)
        # "auto" (lm-eval's batch-size search) has nothing to search here: rows are budgeted by tokens
        self._batch_size = 16 if batch_size in (None, "auto") else int(batch_size)
        self.add_bos_token = _flag(add_bos_token)
        self._max_gen_toks = int(max_gen_toks)
        self.progress = bool(_flag(progress))
        self._bos_text = tokenizer.decode([tokenizer.bos_id])
        self._generator = None
        self._encoded: dict[str, list[int]] = {}  # filled per request batch by `_prefetch`
        self._plain_ids: dict[int, bool] = {}

    # -- what lm-eval asks of a TemplateLM ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # lm-eval's hf backend: BOS when the tokenizer has one

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Ids as the `hf` backend's tok_encode gives them with our exported tokenizer: special tokens
        are "added" unless told not to or the text starts with BOS, and adding them adds the BOS
        only when add_bos_token=True (our tokenizer_config.json says false)."""
        if add_special_tokens is None:
            add_special_tokens = False if string.startswith(self._bos_text) else \
                (self.add_bos_token if self.add_bos_token is not None else True)
        ids = self._encoded.get(string)
        ids = list(ids) if ids is not None else self.tok.encode(string)
        if add_special_tokens and self.add_bos_token:
            ids.insert(0, self.tok.bos_id)
        left = kwargs.get("left_truncate_len")
        return ids[-left:] if left else ids

    def _prefetch(self, texts: Sequence[str]) -> None:
        """Encode every string lm-eval is about to ask for in one batched call: one at a time, the
        SentencePiece call costs ~75 us each, batched ~2 us."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._encoded]
        self._encoded.update(zip(todo, self.tok.encode_batch(todo)))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        texts = []
        for context, continuation in (req.args for req in requests):
            # what TemplateLM's _encode_pair encodes: the context less trailing spaces, and the whole
            texts += [context.rstrip(), context + continuation] if context else [continuation]
        self._prefetch(texts)
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._encoded.clear()

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(tokens), skip_special=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        answers = score_continuations(self.model, pairs, self._max_length, self._batch_size,
                                      progress=self.progress and not disable_tqdm)
        for (request, _, _), answer in zip(requests, answers):
            if request is not None:  # lm-eval's request cache (None: a rolling window)
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods in disjoint windows of the model's context, as `hf` forms them."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        self._prefetch([req.args[0] for req in requests])
        for i, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self._max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owner.append(i)
        self._encoded.clear()
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generations, grouped by their generation settings, in batches of similar prompt length."""
        texts: list[str] = [""] * len(requests)
        self._prefetch([req.args[0] for req in requests])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            outputs = self._generate_group([requests[i].args[0] for i in members], requests[members[0]].args[1])
            for i, text in zip(members, outputs):
                texts[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        self._encoded.clear()
        return texts

    def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from .generate import Generator, SamplingParams

        kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_new = int(kwargs.pop("max_gen_toks"))
        if max_new >= self._max_length:
            raise UserError(f"lm-eval: max_gen_toks {max_new} must be below the model's context {self._max_length}")
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
        params = SamplingParams(max_new_tokens=max_new, temperature=float(kwargs.get("temperature", 0)) if sample else 0.0,
                                top_p=float(kwargs.get("top_p", 1.0)) if sample else 1.0,
                                top_k=int(kwargs.get("top_k", 0) or 0) if sample else 0, stop=tuple(until),
                                seed=int(kwargs.get("seed", 1234)))
        # prompts cut from the left to leave room for max_gen_toks, as `hf` cuts them
        prompts = [self.tok_encode(c)[-(self._max_length - max_new):] for c in contexts]
        if self._generator is None:
            self._generator = Generator(self.model, self.tok)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out = [""] * len(prompts)
        for chunk in token_budget_batches(order, [len(prompts[i]) + max_new for i in order],
                                           self._batch_size * self._max_length):
            for i, done in zip(chunk, self._generator.generate([prompts[i] for i in chunk], params)):
                out[i] = postprocess_generated_text(self.tok_decode(self._hf_stop(done.token_ids, until)), until, None)
        return out

    def _hf_stop(self, ids: list[int], until: list[str]) -> list[int]:
        """The ids `hf` generates for a prompt alone. It stops once a stop string shows in the last
        few new tokens decoded on their own, special tokens as text (`<|user|>` holds an "e"; a
        byte token cut off from its character decodes as itself, a newline say), though its answer
        is the whole text without special tokens, cut at the first stop. Our generator stops on
        that answer text, never earlier: cut the ids back to where `hf` would have stopped."""
        if all(self._plain(t) for t in ids):
            return ids  # plain pieces decode alike alone and in context: a window shows what the text shows
        window = {s: len(self.tok.encode(s)) + 2 for s in until}  # hf: its stop's tokens + 2
        for k in range(1, len(ids) + 1):
            if any(s in self.tok_decode(ids[max(0, k - n):k], False) for s, n in window.items()):
                return ids[:k]
        return ids

    def _plain(self, token: int) -> bool:
        """Neither a special token nor a byte-fallback piece (`<0xE4>`) of a character."""
        known = self._plain_ids.get(token)
        if known is None:
            piece = self.tok.id_to_token(token) or ""
            known = not (piece.startswith("<0x") and piece.endswith(">")) and bool(self.tok_decode([token]))
            self._plain_ids[token] = known
        return known

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from .chat_template import ChatTemplate

        return ChatTemplate.for_tokenizer(self.tok).render(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        weight = next(self.model.parameters())
        return {"model_name": self.name, "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(weight.dtype).removeprefix("torch."), "backend": "openllama"}


if register_model is not None:
    # lm-eval fills its registry with its own models (lazily, as names) only while it is empty: let
    # it do so first, or registering ours would hide `hf` and the rest
    import lm_eval.models  # noqa: F401

    register_model("openllama")(OpenLlamaLM)


# -- tasks ------------------------------------------------------------------------------------


def quiet_lm_eval() -> None:
    """lm-eval logs every task it loads at INFO; warnings are what a user needs."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _group_members(path: Path) -> set[str]:
    """The names a group YAML lists (lm-eval's own tasks among them need lm-eval's index)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    listed = load_yaml(path, resolve_func=False).get("task")
    if not isinstance(listed, list):  # a task file: `task:` is its own name
        return set()
    return {t if isinstance(t, str) else str(t.get("task", t.get("group", ""))) for t in listed} - {""}


def _directory_tasks(manager, directory: Path) -> tuple[list[str], set[str]]:
    """(tasks and groups defined in a directory's YAMLs less those one of its groups already runs,
    every name its groups list)."""
    from lm_eval.tasks._index import Kind

    entries = [e for e in manager.task_index.values()
               if e.yaml_path is not None and directory in Path(e.yaml_path).absolute().parents
               and e.kind in (Kind.TASK, Kind.PY_TASK, Kind.GROUP)]
    members: set[str] = set()
    for e in entries:
        if e.kind is Kind.GROUP:
            members |= _group_members(Path(e.yaml_path))
    return sorted(e.name for e in entries if e.name not in members), members


def _sort_specs(specs: Sequence[str]) -> tuple[list[Path], list[Path], list[str]]:
    """(directories, YAML files, names) of the specs; a path that is not there is an error."""
    dirs, files, names = [], [], []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            dirs.append(path.resolve())
        elif path.suffix in (".yaml", ".yml") and path.is_file():
            files.append(path.resolve())
        elif spec.endswith((".yaml", ".yml")) or "/" in spec:
            raise UserError(f"--lm-eval: {spec}: no such task file or directory")
        else:
            names.append(spec)
    return dirs, files, names


def _linked(files: list[Path]) -> Path:
    """A private directory of links to single YAML files, so lm-eval indexes just those files (not
    their whole folder, whose other files may reuse names; lm-eval cannot load a group from a path).
    The loader resolves links, so `include:` and `!function` still read beside the real file."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="openllama-lm-eval-"))
    atexit.register(shutil.rmtree, folder, True)
    for i, f in enumerate(files):
        (folder / f"{i:03d}_{f.name}").symlink_to(f)
    return folder


def task_manager_for(specs: Sequence[str]) -> tuple[Any, list[str]]:
    """lm-eval's TaskManager and the task list for `specs`: task or group names, YAML files and
    directories of YAMLs (every task and group defined there). lm-eval's own tasks are indexed
    (~10 s) only when a name, or a member of a given group, is not among the given files."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()
    dirs, files, names = _sort_specs(specs)
    shown = {d: str(d) for d in dirs}
    if files:
        shown[_linked(files)] = ", ".join(map(str, files))
    include = [str(d) for d in shown] or None
    manager = TaskManager(include_path=include, include_defaults=False)
    referenced: set[str] = set()  # what the given groups list (e.g. a local copy of `hellaswag`)
    for d, label in shown.items():
        found, members = _directory_tasks(manager, d)
        if not found:
            raise UserError(f"--lm-eval: {label}: defines no lm-eval task or group")
        names += found
        referenced |= members
    wanted = names + sorted(referenced)
    if any(n not in manager.task_index for n in wanted):
        manager = TaskManager(include_path=include, include_defaults=True)
        unknown = [n for n in wanted if n not in manager.task_index]
        if unknown:
            raise UserError(f"--lm-eval: unknown task(s) {', '.join(unknown)} (not lm-eval task names nor YAML "
                            f"files or directories; `lm_eval ls tasks` lists the names)")
    return manager, list(dict.fromkeys(names))


def split_specs(text: str | Sequence[str] | None) -> list[str]:
    """'hellaswag,configs/eval/demo' (or a list) -> the task specs."""
    if not text:
        return []
    parts = text.split(",") if isinstance(text, str) else list(text)
    return [p.strip() for p in parts if p and p.strip()]


def evaluate_tasks(lm: Any, specs: Sequence[str], *, limit: float | None = None, num_fewshot: int | None = None,
                   bootstrap_iters: int = 100000, log_samples: bool = True) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` on the tasks: its results dict as lm-eval returns it."""
    from lm_eval import simple_evaluate

    manager, names = task_manager_for(specs)
    results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    if results is None:  # lm-eval returns results on rank 0 only; our model is one process
        raise UserError("lm-eval returned no results (LOCAL_RANK is set to a non-zero rank)")
    return results


def save_results(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write results as lm-eval's command line writes them (EvaluationTracker: results_<date>.json
    and, when the samples were logged, samples_<task>_<date>.jsonl under out_dir/<model name>/)."""
    from lm_eval.loggers import EvaluationTracker

    results = dict(results)
    samples = results.pop("samples", None)
    tracker = EvaluationTracker(output_path=str(out_dir))
    name = str(results.get("config", {}).get("model_name") or "openllama")
    # the model's path names the results folder, as `pretrained=` does for lm-eval's own models
    tracker.general_config_tracker.log_experiment_args(model_source="openllama", model_args=f"pretrained={name}",
                                                       system_instruction=None, chat_template=None,
                                                       fewshot_as_multiturn=False)
    tracker.save_results_aggregated(results=results, samples=samples)
    if samples:
        for task in results.get("configs", {}):
            tracker.save_results_samples(task_name=task, samples=samples[task])
    return sorted(Path(out_dir).rglob("*.json*"))


# -- scores for training logs and reports ---------------------------------------------------


def _metric_name(key: str) -> str | None:
    """'acc,none' -> 'acc'; 'exact_match,strict-match' -> 'exact_match/strict-match'; stderr -> None."""
    metric, _, filt = key.partition(",")
    if "_stderr" in metric or not filt:
        return None
    return metric if filt == "none" else f"{metric}/{filt}"


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` numbers of every task and group, and `core` (see `core_score`)."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name = _metric_name(key)
            if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                out[f"lm_eval/{task}/{name}"] = float(value)
    core = core_score(results)
    if core is not None:
        out["core"] = core
    return out


def _chance(results: dict[str, Any], task: str) -> float:
    """Accuracy of guessing: the mean of 1 / choices over the logged items of a multiple-choice
    task (one request per choice); 0 for other task types."""
    config = results.get("configs", {}).get(task, {})
    samples = results.get("samples", {}).get(task) or []
    if config.get("output_type") != "multiple_choice" or not samples:
        return 0.0
    return sum(1.0 / max(1, len(s.get("arguments", []))) for s in samples) / len(samples)


def centred_accuracy(results: dict[str, Any], task: str) -> float | None:
    """(accuracy - chance) / (1 - chance) of a task, its accuracy being the first of ACCURACY_METRICS it
    reports (unfiltered preferred); a group: the mean over its members. None: no accuracy."""
    members = results.get("group_subtasks", {}).get(task)
    if members:
        values = [v for v in (centred_accuracy(results, m) for m in members) if v is not None]
        return sum(values) / len(values) if values else None
    metrics = results.get("results", {}).get(task, {})
    for wanted in ACCURACY_METRICS:
        keys = sorted((k for k in metrics if k.split(",")[0] == wanted), key=lambda k: not k.endswith(",none"))
        if keys and isinstance(metrics[keys[0]], (int, float)):
            chance = _chance(results, task)
            return (float(metrics[keys[0]]) - chance) / (1.0 - chance) if chance < 1 else None
    return None


def core_score(results: dict[str, Any]) -> float | None:
    """The centred accuracy averaged over the top-level tasks and groups (those no group contains):
    one number to watch, 0 at chance and 1 when every answer is right."""
    groups = results.get("group_subtasks", {})
    inner = {m for members in groups.values() for m in members}
    top = [t for t in results.get("results", {}) if t not in inner]
    values = [v for v in (centred_accuracy(results, t) for t in top) if v is not None]
    return sum(values) / len(values) if values else None


def short_table(results: dict[str, Any]) -> str:
    """lm-eval's own Markdown table of the results (and of the groups), then the centred average."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    core = core_score(results)
    if core is not None:
        text += f"\ncore (accuracy above chance, averaged over tasks): {core:.4f}\n"
    return text


# -- evaluation during training ---------------------------------------------------------------


class TaskSuite:
    """A fixed set of lm-eval tasks, loaded once and run on a model in memory (train.eval_tasks).

    Every rank runs the whole suite on the same items (lm-eval is told it is one process), so every
    rank gets the same scores and sharded models see the same forward calls on each rank. lm-eval's
    `evaluate` is called directly: `simple_evaluate` would reseed the global RNGs mid-training."""

    def __init__(self, specs: Sequence[str], tokenizer: Any, limit: float | None = None, batch_size: int = 16):
        manager, names = task_manager_for(specs)
        self.loaded = manager.load(names)
        for task in self.loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)  # simple_evaluate's default: the same few-shot examples every time
        self.tokenizer, self.limit, self.batch_size = tokenizer, limit, batch_size

    def run(self, model: torch.nn.Module) -> dict[str, Any]:
        """lm-eval's results dict for `model` (with the samples, from which chance levels are read)."""
        from lm_eval.evaluator import evaluate

        lm = OpenLlamaLM(model=model, tokenizer=self.tokenizer, batch_size=self.batch_size, name="training")
        results = evaluate(lm=lm, task_dict=self.loaded, limit=self.limit, bootstrap_iters=0, log_samples=True)
        if results is None:
            raise RuntimeError("lm-eval returned no results for a single-process model")
        return results

    def scores(self, model: torch.nn.Module) -> dict[str, float]:
        return flat_scores(self.run(model))


# -- the demo's tasks as lm-eval tasks ----------------------------------------------------------

DEMO_DATA = "runs/demo/data/tasks/test.jsonl"  # where `make demo` writes the built-in test tasks
_DEMO_HEADER = """\
# openllama's built-in tasks (`openllama data builtin` -> tasks/test.jsonl: JSON lines of messages,
# answer, wrong answers, family) as an lm-eval task, asked in the chat format as the demo asks them.
# Written by openllama.lm_eval_backend.write_demo_tasks; the demo writes a copy beside its own data.
# Another data file: change data_files below (relative paths are read from the current directory).
"""
_DEMO_COMMON = """\
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: !function openllama.lm_eval_backend.demo_prompt
"""
DEMO_TASKS = {
    # greedy answer, exact match by the demo's own checker: the demo's exact-match accuracy
    "demo_exact": """\
task: demo_exact
output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
process_results: !function openllama.lm_eval_backend.demo_exact_match
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    # the reference against the task's plausible wrong answers, by log-likelihood
    "demo_choice": """\
task: demo_choice
output_type: multiple_choice
doc_to_choice: !function openllama.lm_eval_backend.demo_choices
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    # is the reference the model's greedy continuation (acc), and how likely is it (perplexity); a
    # loglikelihood task adds no target_delimiter, so the space after `system:` is the target's own
    "demo_answer": """\
task: demo_answer
output_type: loglikelihood
doc_to_target: " {{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
""",
}


def demo_task_yamls(data_file: str | Path = DEMO_DATA, max_gen_toks: int = 24) -> dict[str, str]:
    """{file name: YAML text} of the demo's tasks over `data_file`."""
    out = {}
    for name, body in DEMO_TASKS.items():
        text = _DEMO_HEADER + body.format(max_gen_toks=max_gen_toks) + _DEMO_COMMON.format(data=data_file)
        out[f"{name}.yaml"] = text + "metadata:\n  version: 1.0\n"
    return out


def write_demo_tasks(out_dir: str | Path, data_file: str | Path = DEMO_DATA, max_gen_toks: int = 24) -> Path:
    """Write the demo's lm-eval task YAMLs (configs/eval/demo holds them for runs/demo) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in demo_task_yamls(data_file, max_gen_toks).items():
        (out / name).write_text(text, encoding="utf-8")
    return out


def demo_prompt(doc: dict) -> str:
    """A built-in task's prompt as `tasks.chat_answerer` gives it: the seed chat template up to the
    generation prompt, less its trailing space (which training counts as the start of the reply)."""
    from .chat_template import ChatTemplate

    return ChatTemplate().render(doc["messages"][:-1], add_generation_prompt=True).rstrip()


def demo_choices(doc: dict) -> list[str]:
    """The reference answer first (the target is choice 0), then the plausible wrong ones."""
    return [doc["answer"], *[w for w in doc.get("wrong") or [] if w != doc["answer"]]]


def demo_exact_match(doc: dict, results: list[str]) -> dict[str, float]:
    """The demo's exact-match check (`tasks.is_correct`) of the generated answer."""
    from .tasks import is_correct

    return {"exact_match": float(is_correct(results[0], doc["answer"]))}
