"""Text generation: one decode core for every caller (offline batches, the server, the terminal).

The core, `SlotBatch`, holds the sequences being decoded, one per row ("slot") of a preallocated
KV cache, each at its own length. `admit(rows)` prefills new sequences (right-padded, causal, so
no mask is needed) straight into free slots and samples their first token; `step()` runs ONE
forward for every active sequence (per-row cache positions, `model.slot_attention_mask`) and
samples the next token of each; a sequence that finishes leaves at once and the last active slot
moves into its place, so active slots stay rows 0..B-1. Offline batches (`Generator.generate`,
GRPO, tasks) run it in the calling thread; `serve.scheduler.Scheduler` runs it in a thread and
lets requests join and leave between steps (continuous batching).

- `SamplingParams`: greedy (temperature 0), temperature, top-k, top-p, repetition penalty,
  OpenAI's presence / frequency penalties, logit bias, logprobs, stop strings, EOS, max new
  tokens, seed. Rows of one batch may each have their own.
- `sample(logits, SamplingBatch)`: the whole sampling step for a batch, pure torch, row by row
  independent (bias -> penalties -> temperature -> top-k -> top-p -> draw). Each sampled row draws
  from its own `torch.Generator`, so seeded runs reproduce and a row's tokens never depend on what
  else is in the batch. Greedy rows take the argmax.
- `Generator(model, tokenizer)`: `.generate(prompts, params)` -> `Completion`s;
  `.stream(prompt, params)` -> text pieces; `.start(prompts, params)` -> a `Generation` to iterate
  step by step (one text piece per row per step) and to `cancel()` from another thread.
- Streaming never splits a multi-byte character: text is decoded with a few tokens of context
  and held back while it ends in an incomplete UTF-8 sequence (U+FFFD) or could still be the
  start of a stop string.
- `load_for_inference(path)`: an openllama model dir, a training step dir, a run dir (newest step)
  or an exported Hugging Face dir, with the tokenizer found beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .errors import UserError
from .artifacts import CONFIG_FILE
from .model import KVCache, Llama, slot_attention_mask

# -- sampling ------------------------------------------------------------------------------------

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy.

    presence_penalty / frequency_penalty are OpenAI's: logit[j] -= frequency * count[j] +
    presence * (count[j] > 0), count = times token j was generated so far (the prompt does not
    count). logit_bias: token id -> a value added to its logit. logprobs: None for none, 0 for the
    chosen token's log-probability, k for that and the k most likely tokens (of the model's own
    distribution, before bias, penalties and temperature, as vLLM reports them)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off (CTRL-style, as transformers applies it)
    stop: Sequence[str] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks decode a fixed number of tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", math.isfinite(self.presence_penalty), "must be a finite number"),
            ("frequency_penalty", math.isfinite(self.frequency_penalty), "must be a finite number"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"must be in [0, {MAX_TOP_LOGPROBS}]"),
            ("logit_bias", all(math.isfinite(v) for v in (self.logit_bias or {}).values()),
             "values must be finite numbers"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise UserError(f"sampling: {name} {why} (got {getattr(self, name)!r})")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()} or None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the argmax of the model's output."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias and self.logprobs is None)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """Make tokens already in the text less likely: positive logits / penalty, negative * penalty.
    `penalty` a float, or (B, 1) for one per row."""
    if isinstance(penalty, float) and penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: logits - frequency * counts - presence * (counts > 0); counts (B, V) of
    the tokens generated so far, presence / frequency (B, 1)."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set with mass >= top_p
    (top-p measured after top-k, as transformers chains its warpers). Either may be one value or
    one per row ((B,) tensors); top_k 0 and top_p 1 are off."""
    B, V = logits.shape
    k = torch.as_tensor(top_k, device=logits.device).expand(B)
    on = (k > 0) & (k < V)
    if bool(on.any()):
        k = torch.where(on, k, V)
        top = torch.topk(logits, int(k.max()), dim=-1).values
        kth = top.gather(1, (k - 1)[:, None])  # ties with the k-th stay, as in transformers
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = torch.as_tensor(top_p, device=logits.device, dtype=torch.float32).expand(B)
    if bool((p < 1.0).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass
class SamplingBatch:
    """The sampling settings of B rows as tensors (None: no row uses that setting) and the rows'
    histories: `seen` (B, V) bool, tokens of the prompt and the reply (repetition penalty);
    `counts` (B, V) float, times each token was generated (presence / frequency penalties)."""

    temperature: torch.Tensor  # (B,), 0 = greedy
    top_k: torch.Tensor | None = None  # (B,) long, 0 = off
    top_p: torch.Tensor | None = None  # (B,), 1 = off
    repetition_penalty: torch.Tensor | None = None  # (B,)
    presence_penalty: torch.Tensor | None = None  # (B,)
    frequency_penalty: torch.Tensor | None = None  # (B,)
    logit_bias: torch.Tensor | None = None  # (B, V), added to the logits
    seen: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    generators: Sequence[torch.Generator | None] = ()  # one per row; None for greedy rows
    top_logprobs: int = -1  # -1: no log-probabilities; 0: the chosen token's; k: and the k most likely
    all_greedy: bool = False  # a hint: every temperature is 0 (skips a device-to-host check per step)


@dataclass
class Sampled:
    """What `sample` picked: ids (B,); with logprobs, the chosen tokens' log-probabilities (B,) and
    the most likely tokens (B, k) with theirs."""

    ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def process_logits(logits: torch.Tensor, s: SamplingBatch) -> torch.Tensor:
    """The deterministic part, before temperature: logit bias, then the penalties (vLLM's order)."""
    logits = logits.float()
    if s.logit_bias is not None:
        logits = logits + s.logit_bias
    if s.repetition_penalty is not None:
        logits = apply_repetition_penalty(logits, s.seen, s.repetition_penalty[:, None])
    if s.presence_penalty is not None or s.frequency_penalty is not None:
        zero = torch.zeros(logits.shape[0], device=logits.device)
        presence = s.presence_penalty if s.presence_penalty is not None else zero
        frequency = s.frequency_penalty if s.frequency_penalty is not None else zero
        logits = apply_presence_frequency(logits, s.counts, presence[:, None], frequency[:, None])
    return logits


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling, one uniform in [0, 1) per row: the first token whose cumulative
    probability exceeds u * total. Tokens of probability 0 are never drawn. One random number per
    row (drawn from the row's own generator) instead of a multinomial call per row."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, s: SamplingBatch) -> Sampled:
    """(B, V) logits of each row's last position -> the next token of each row (+ log-probs)."""
    if s.all_greedy and s.top_logprobs < 0 and s.logit_bias is None and s.repetition_penalty is None \
            and s.presence_penalty is None and s.frequency_penalty is None:
        return Sampled(logits.argmax(-1))  # plain greedy: nothing else to do
    x = process_logits(logits, s)
    ids = x.argmax(-1)
    greedy = s.temperature == 0
    if not s.all_greedy and not bool(greedy.all()):
        t = torch.where(greedy, torch.ones_like(s.temperature), s.temperature)
        x = x / t[:, None]
        if s.top_k is not None or s.top_p is not None:
            x = filter_top_k_top_p(x, s.top_k if s.top_k is not None else 0, s.top_p if s.top_p is not None else 1.0)
        zero = torch.zeros((), device=x.device)
        u = torch.stack([torch.rand((), generator=g, device=x.device) if g is not None else zero
                         for g in s.generators])
        ids = torch.where(greedy, ids, draw(x.softmax(-1), u))
    out = Sampled(ids)
    if s.top_logprobs >= 0:
        lp = torch.log_softmax(logits.float(), -1)
        out.logprobs = lp.gather(1, ids[:, None]).squeeze(1)
        if s.top_logprobs > 0:
            out.top_logprobs, out.top_ids = lp.topk(s.top_logprobs, dim=-1)
    return out


# -- streaming text ------------------------------------------------------------------------------

class TextStream:
    """Turns one row's token ids into text pieces that never split a character or leak a stop string.

    Each new token is decoded together with a few tokens before it (tokenizers drop or change a
    leading space when a piece is decoded alone), and only the new suffix is emitted; while the
    decoded text ends in U+FFFD the token is an incomplete UTF-8 sequence and is held back.
    """

    CONTEXT = 4  # tokens of left context for decoding a new token

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (), strip_prefix: str = ""):
        self.tokenizer = tokenizer
        self.strip_prefix = strip_prefix  # text the prompt already holds (a chat template's trailing space)
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0  # ids[prefix:read] is the decoded context
        self.read = len(self.ids)
        self.stop = tuple(stop)
        self.text = ""  # all text decoded so far (cut at a stop string once one appears)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to show (maybe '')."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        if self.strip_prefix:
            if self.text.startswith(self.strip_prefix):
                self.text, self.strip_prefix = self.text[len(self.strip_prefix):], ""
            elif self.strip_prefix.startswith(self.text):
                return ""  # not decided yet
            else:
                self.strip_prefix = ""
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: flush what was held back (an incomplete character stays U+FFFD)."""
        if self.read < len(self.ids) and not self.stopped:
            before = self._decode(self.ids[self.prefix:self.read])
            after = self._decode(self.ids[self.prefix:])
            self.text += after[len(before):]
            self.read = len(self.ids)
        if self.strip_prefix and self.strip_prefix.startswith(self.text):
            self.text = ""  # the reply was nothing but (part of) the prefix
        elif self.strip_prefix and self.text.startswith(self.strip_prefix):
            self.text = self.text[len(self.strip_prefix):]
        self.strip_prefix = ""
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)  # bos / pad / role markers are not text

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.emitted - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        end = len(self.text)
        if self.stop and not self.stopped and not final:
            end -= self._partial_stop_suffix()
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of `text` that is the beginning of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


# -- one sequence, one batch of them ---------------------------------------------------------------


class _NoText:
    """Stands in for `TextStream` when a Generator has no tokenizer: ids only, no text."""

    stopped, text = False, ""

    def push(self, token: int) -> str:
        return ""

    def finish(self) -> str:
        return ""


@dataclass
class TokenLogprob:
    """A generated token's log-probability and, when asked for, the most likely tokens at its place."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """One finished row: its text, ids and why it stopped ('stop' = EOS or a stop string, 'length').
    `logprobs`: one entry per generated token (the EOS that ends a row has none), when asked for."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class Row:
    """One sequence being generated: prompt, settings, its own sampling generator, the text so far,
    where it stands in the KV cache, and what it produced since the last `take()`."""

    def __init__(self, prompt: list[int], params: SamplingParams, seed: int, max_new: int, stream, device,
                 owner=None):
        self.prompt, self.params, self.seed, self.max_new, self.stream = prompt, params, seed, max_new, stream
        self.owner = owner  # the Generation it belongs to
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        self.out: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.finish: str | None = None
        self.length = 0  # tokens in the KV cache
        self.next_token = -1  # sampled, not yet in the cache
        self._piece, self._sent_logprobs = "", 0

    def accept(self, token: int, eos_id: int | None, entry: TokenLogprob | None) -> None:
        """A newly sampled token: text, stop conditions."""
        self.out.append(token)
        self.next_token = token
        if token == eos_id and not self.params.ignore_eos:
            self.finish = "stop"
            self._piece += self.stream.finish()
            return
        if entry is not None:
            self.logprobs.append(entry)
        self._piece += self.stream.push(token)
        if self.stream.stopped:
            self.finish = "stop"
        elif len(self.out) >= self.max_new:
            self.end("length")

    def end(self, reason: str = "length") -> None:
        """Stopped from outside (cancelled) or out of room: flush the text held back."""
        if self.finish is None:
            self.finish = reason
            self._piece += self.stream.finish()

    def take(self) -> tuple[str, list[TokenLogprob]]:
        """Text and log-prob entries produced since the last call."""
        piece, self._piece = self._piece, ""
        new = []
        if self.logprobs is not None:
            new, self._sent_logprobs = self.logprobs[self._sent_logprobs:], len(self.logprobs)
        return piece, new

    def completion(self) -> Completion:
        return Completion(self.stream.text, list(self.out), self.finish or "length", len(self.prompt),
                          list(self.logprobs) if self.logprobs is not None else None)


class StepPieces(list):
    """One step of a Generation: the new text of each row (a list of str, '' when nothing new), and
    in `.logprobs` each row's new log-prob entries (empty lists unless asked for)."""

    def __init__(self, pieces: list[str], logprobs: list[list[TokenLogprob]]):
        super().__init__(pieces)
        self.logprobs = logprobs


class Generation:
    """One request: a few rows (prompts x n) generated together. Iterate it to run it in this thread,
    one list of text pieces per step (one per row); or hand it to `serve.scheduler.Scheduler`,
    which decodes it in one batch with every other running request. `completions` is filled when
    it ends. `cancel()` (any thread) stops it before the next step."""

    def __init__(self, gen: "Generator", rows: list[Row]):
        self.gen, self.rows = gen, rows
        self.prompts = [r.prompt for r in rows]
        self.params = rows[0].params
        self.completions: list[Completion] = []
        self._cancel = threading.Event()
        for r in rows:
            r.owner = self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return all(r.finish is not None for r in self.rows)

    def take_step(self) -> StepPieces:
        taken = [r.take() for r in self.rows]
        return StepPieces([t for t, _ in taken], [lp for _, lp in taken])

    def finalize(self) -> None:
        for r in self.rows:
            r.end()
        self.completions = [r.completion() for r in self.rows]

    def __iter__(self) -> Iterator[StepPieces]:
        return self.gen._run(self)

    def run(self) -> list[Completion]:
        for _ in self:
            pass
        return self.completions


class SlotBatch:
    """The decode core: the active sequences, one per KV-cache row ("slot"), rows 0..B-1.

    `admit(rows)` prefills new sequences into the next free slots (right-padded and causal, so no
    mask: a padded position is never seen by a real one, and its junk keys sit beyond the row's
    length, where the decode mask hides them until they are overwritten) and samples their first
    token. `step()` is one forward over every active sequence, each at its own length (per-row
    positions and cache columns), and samples the next token of each. Finished sequences leave at
    once; the last active slot moves into the hole. The cache grows (rows and columns, by copying)
    as the batch needs it, up to `max_rows` x the context, so a server that never sees long
    sequences never allocates for them. Not thread-safe: one thread drives it."""

    def __init__(self, gen: "Generator", max_rows: int, prefill_tokens: int | None = None):
        self.gen, self.max_rows, self.prefill_tokens = gen, max_rows, prefill_tokens
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.cap_rows = self.cap_len = 0
        self.state: dict[str, torch.Tensor] = {}  # "seen", "counts", "bias": (cap_rows, vocab) per slot
        self._settings: SamplingBatch | None = None  # of all active rows, until the batch changes
        self._next_ids: torch.Tensor | None = None  # the last step's sampled ids (valid with _settings)

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    # -- memory ----------------------------------------------------------------------------------

    def reserve(self, rows: int, length: int) -> None:
        """Room for `rows` slots of `length` tokens (grown geometrically, so rarely)."""
        if self.cache is not None and rows <= self.cap_rows and length <= self.cap_len:
            return
        if rows > self.max_rows or length > self.gen.max_seq_len:
            raise ValueError(f"KV cache: {rows} rows x {length} > {self.max_rows} x {self.gen.max_seq_len}")
        new_rows = min(self.max_rows, max(rows, 2 * self.cap_rows, 4)) if self.cache is not None else rows
        new_len = min(self.gen.max_seq_len, max(_round_up(length, 64), 2 * self.cap_len))
        cache = KVCache(self.gen.cfg, new_rows, new_len, device=self.gen.device, dtype=self.gen.dtype)
        if self.cache is not None:
            n = len(self.rows)
            for new, old in zip((*cache.k, *cache.v), (*self.cache.k, *self.cache.v)):
                new[:n, :, :self.cap_len] = old[:n]
        self.cache, self.cap_rows, self.cap_len = cache, new_rows, new_len
        for name, old in self.state.items():
            self.state[name] = torch.zeros((new_rows, old.shape[1]), dtype=old.dtype, device=old.device)
            self.state[name][:old.shape[0]] = old
        self._settings = None

    def _state(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if name not in self.state:
            self.state[name] = torch.zeros((self.cap_rows, self.gen.cfg.vocab_size), dtype=dtype,
                                           device=self.gen.device)
            self._settings = None
        return self.state[name]

    def _start_state(self, lo: int, rows: list[Row]) -> None:
        """Per-slot sampling state of newly admitted rows (a slot may hold an old sequence's)."""
        if any(r.params.repetition_penalty != 1.0 for r in rows):
            self._state("seen", torch.bool)
        if any(r.params.presence_penalty or r.params.frequency_penalty for r in rows):
            self._state("counts", torch.float32)
        if any(r.params.logit_bias for r in rows):
            self._state("bias", torch.float32)
        for t in self.state.values():
            t[lo:lo + len(rows)] = 0
        for i, r in enumerate(rows, start=lo):
            if r.params.repetition_penalty != 1.0:
                self.state["seen"][i, torch.tensor(r.prompt, device=self.gen.device)] = True
            if r.params.logit_bias:
                ids = torch.tensor(list(r.params.logit_bias), device=self.gen.device)
                if int(ids.min()) < 0 or int(ids.max()) >= self.gen.cfg.vocab_size:
                    raise UserError(f"logit_bias: token ids must be in [0, {self.gen.cfg.vocab_size})")
                self.state["bias"][i, ids] = torch.tensor(list(r.params.logit_bias.values()), device=self.gen.device)

    # -- sampling --------------------------------------------------------------------------------

    def _sampling(self, rows: list[Row], lo: int) -> SamplingBatch:
        ps = [r.params for r in rows]
        dev, hi = self.gen.device, lo + len(rows)

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=dev)

        s = SamplingBatch(column([p.temperature for p in ps]), generators=[r.generator for r in rows],
                          all_greedy=all(p.greedy for p in ps))
        if any(p.top_k for p in ps):
            s.top_k = column([p.top_k for p in ps], torch.long)
        if any(p.top_p < 1.0 for p in ps):
            s.top_p = column([p.top_p for p in ps])
        if any(p.repetition_penalty != 1.0 for p in ps):
            s.repetition_penalty, s.seen = column([p.repetition_penalty for p in ps]), self.state["seen"][lo:hi]
        if any(p.presence_penalty or p.frequency_penalty for p in ps):
            s.presence_penalty = column([p.presence_penalty for p in ps])
            s.frequency_penalty = column([p.frequency_penalty for p in ps])
            s.counts = self.state["counts"][lo:hi]
        if any(p.logit_bias for p in ps):
            s.logit_bias = self.state["bias"][lo:hi]
        s.top_logprobs = max((p.logprobs for p in ps if p.logprobs is not None), default=-1)
        return s

    def _record(self, rows: list[Row], lo: int, out: Sampled) -> None:
        """Hand each row its sampled token; update the penalty histories."""
        n = len(rows)
        if self.state:
            rng = torch.arange(n, device=out.ids.device)
            if "counts" in self.state:
                self.state["counts"][lo:lo + n][rng, out.ids] += 1
            if "seen" in self.state:
                self.state["seen"][lo:lo + n][rng, out.ids] = True
        ids = out.ids.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        tops = list(zip(out.top_ids.tolist(), out.top_logprobs.tolist())) if out.top_ids is not None else None
        eos = self.gen.eos_id
        for i, (r, tok) in enumerate(zip(rows, ids)):
            entry = None
            if r.logprobs is not None:
                k = r.params.logprobs
                entry = TokenLogprob(tok, lps[i], list(zip(tops[i][0][:k], tops[i][1][:k])) if k else [])
            r.accept(tok, eos, entry)

    # -- running ---------------------------------------------------------------------------------

    def admit(self, rows: list[Row]) -> None:
        """Prefill `rows` into free slots (in groups of at most `prefill_tokens` padded tokens) and
        sample their first tokens. Rows that finish at once (EOS, one token) leave again."""
        if len(rows) > self.free:
            raise ValueError(f"{len(rows)} sequences, {self.free} free slots")
        # shortest first, a new group when padding would exceed a quarter of the group's tokens
        # (or the budget): right-padding computes the pad tokens too
        group: list[Row] = []
        real = 0
        for r in sorted(rows, key=lambda r: len(r.prompt)):
            width = len(r.prompt)  # the longest so far
            padded = width * (len(group) + 1)
            over_budget = self.prefill_tokens is not None and padded > self.prefill_tokens
            if group and (over_budget or padded > 1.25 * (real + width)):
                self._prefill(group)
                group, real = [], 0
            group.append(r)
            real += width
        if group:
            self._prefill(group)
        self._evict_finished()

    def _prefill(self, group: list[Row]) -> None:
        lens = [len(r.prompt) for r in group]
        head = getattr(self.gen.model, "output", None)  # a wrapper (LoRA) may not expose it
        if min(lens) != max(lens) and not isinstance(head, torch.nn.Module):
            for length in sorted(set(lens)):  # one prefill per prompt length: no padding needed
                self._prefill([r for r in group if len(r.prompt) == length])
            return
        lo, n = len(self.rows), len(group)
        T = max(lens)
        self.reserve(lo + n, T)
        # rows with the same prompt (n samples of a request, GRPO's group of G) share one prefill:
        # the distinct prompts run in rows lo.., then every row copies its prompt's keys/values
        first: dict[tuple[int, ...], int] = {}
        distinct: list[Row] = []
        source = []  # row i of the group copies distinct[source[i]]
        for r in group:
            if tuple(r.prompt) not in first:
                first[tuple(r.prompt)] = len(distinct)
                distinct.append(r)
            source.append(first[tuple(r.prompt)])
        u, ulens = len(distinct), [len(r.prompt) for r in distinct]
        tokens = torch.full((u, T), self.gen.pad_id, dtype=torch.long)
        for i, r in enumerate(distinct):
            tokens[i, :ulens[i]] = torch.tensor(r.prompt, dtype=torch.long)
        tokens = tokens.to(self.gen.device)
        view = self.cache.rows(lo, lo + u)
        if min(ulens) == T:  # no padding: the plain causal prefill, last position only
            logits = self.gen._forward(tokens, None, None, view, 0)
        else:  # right-padded: each row's logits at its own last token (only those are projected)
            h = self.gen.model(tokens, cache=view, start_pos=0, return_hidden=True)
            logits = head(h[torch.arange(u, device=h.device), torch.tensor(ulens, device=h.device) - 1])
        if u < n:
            index = torch.tensor(source, device=self.gen.device)
            self.cache.spread_rows(lo, index, T)
            logits = logits[index]
        self.rows.extend(group)
        self._settings = None
        for r, length in zip(group, lens):
            r.length = length
        self._start_state(lo, group)
        self._record(group, lo, sample(logits, self._sampling(group, lo)))

    def step(self) -> None:
        """One forward for every active sequence; each gets its next token."""
        rows = self.rows
        if not rows:
            return
        B = len(rows)
        lengths = [r.length for r in rows]
        longest = max(lengths)
        if B > self.cap_rows or longest >= self.cap_len:
            self.reserve(B, longest + 1)
        dev = self.gen.device
        if self._settings is not None:  # the same rows as the last step: its sampled ids, no host copy
            tokens = self._next_ids[:, None]
        else:
            tokens = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=dev)
        view = self.cache if B == self.cap_rows else self.cache.rows(0, B)
        if not self.gen.compiled and min(lengths) == max(lengths):
            # every row at the same length (always so for one sequence): no mask, one start column
            logits = self.gen._step(tokens, None, None, view, lengths[0])
        else:
            # compiled: attend over the whole cache so shapes change only with B (no recompiles per step)
            S = self.cap_len if self.gen.compiled else longest + 1
            starts = torch.tensor(lengths, dtype=torch.long, device=dev)
            logits = self.gen._step(tokens, starts[:, None], slot_attention_mask(starts, 1, S), view, starts)
        for r in rows:
            r.length += 1
        if self._settings is None:
            self._settings = self._sampling(rows, 0)
        out = sample(logits, self._settings)
        self._next_ids = out.ids
        self._record(rows, 0, out)
        self._evict_finished()

    def drop(self, rows: Sequence[Row]) -> None:
        """Remove rows before they finish (cancelled): their slots are free for the next step."""
        for r in rows:
            r.end()
        self._evict_finished()

    def _evict_finished(self) -> None:
        gone = [i for i, r in enumerate(self.rows) if r.finish is not None]
        for i in reversed(gone):
            last = len(self.rows) - 1
            if i != last:
                self.cache.move_row(last, i, self.rows[last].length)
                for t in self.state.values():
                    t[i] = t[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if gone:
            self._settings = None


# -- the generator -------------------------------------------------------------------------------


class Generator:
    """Generation with one model and its tokenizer. `compile=True` compiles the decode step.
    Without a tokenizer (benchmarks) it works on ids alone: no text, no EOS unless `eos_id` is set."""

    def __init__(self, model: Llama, tokenizer=None, *, compile: bool = False, max_seq_len: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.max_seq_len = max_seq_len or self.cfg.max_seq_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.eos_id = tokenizer.eos_id if tokenizer is not None else None
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_id = pad if pad is not None and 0 <= pad < self.cfg.vocab_size else 0
        self.compiled = compile
        self._step = self._forward
        if compile:  # shapes vary with the batch size: compiled once per size, then marked dynamic
            self._step = torch.compile(self._forward, fullgraph=False)

    def _forward(self, tokens, positions, mask, cache, start_pos=0):
        return self.model(tokens, positions=positions, attn_mask=mask, cache=cache, start_pos=start_pos,
                          last_only=True)[:, -1]

    # -- public ----------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("generate: text prompts need a tokenizer (pass token ids)")
            return self.tokenizer.encode(prompt, bos=True)
        return list(prompt)

    def row(self, prompt: str | Sequence[int], params: SamplingParams, seed: int, strip_prefix: str = "") -> Row:
        """One sequence to generate, checked against the context."""
        ids = self.encode(prompt)
        if not ids:
            raise UserError("generate: empty prompt (no tokens)")
        if len(ids) >= self.max_seq_len:
            raise UserError(f"generate: prompt has {len(ids)} tokens; the context holds {self.max_seq_len}")
        stream = _NoText() if self.tokenizer is None else TextStream(self.tokenizer, ids, params.stop, strip_prefix)
        max_new = min(params.max_new_tokens, self.max_seq_len - len(ids))
        return Row(ids, params, seed, max_new, stream, self.device)

    def start(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams,
              seeds: Sequence[int | None] | None = None, strip_prefix: str = "") -> Generation:
        """A batch ready to run. Row i samples with seed `seeds[i]`, else params.seed + i, else a
        random one. `strip_prefix`: text each reply starts with that the prompt already shows
        (`ChatPrompter.reply_prefix`), left out of the reply text."""
        if not prompts:
            raise UserError("generate: no prompts")
        base = params.seed if params.seed is not None else int.from_bytes(os.urandom(6), "little")
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError("one seed per prompt")
        rows = [self.row(p, params, s if s is not None else base + i, strip_prefix)
                for i, (p, s) in enumerate(zip(prompts, seeds))]
        return Generation(self, rows)

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
                 seeds: Sequence[int | None] | None = None, strip_prefix: str = "") -> list[Completion]:
        return self.start(prompts, params or SamplingParams(), seeds, strip_prefix).run()

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               strip_prefix: str = "") -> Iterator[str]:
        """Text pieces of one prompt as they are generated."""
        for pieces in self.start([prompt], params or SamplingParams(), strip_prefix=strip_prefix):
            if pieces[0]:
                yield pieces[0]

    # -- running one batch in this thread ----------------------------------------------------------

    def _run(self, g: Generation) -> Iterator[StepPieces]:
        # eval mode (no dropout) while generating; a model in training (GRPO rollouts) goes back after
        was_training = self.model.training
        self.model.eval()
        try:
            batch = SlotBatch(self, len(g.rows))
            need = max(len(r.prompt) + r.max_new - 1 for r in g.rows)
            batch.reserve(len(g.rows), min(self.max_seq_len, _round_up(need, 64)))
            with torch.inference_mode():
                batch.admit(g.rows)
            yield g.take_step()
            while batch.rows and not g.cancelled:
                with torch.inference_mode():
                    batch.step()
                yield g.take_step()
            g.finalize()
            tail = g.take_step()
            if any(tail):
                yield tail
        finally:
            self.model.train(was_training)


# -- loading -------------------------------------------------------------------------------------


@dataclass
class Loaded:
    model: Llama
    tokenizer: object
    model_dir: Path
    tokenizer_dir: Path
    name: str
    info: dict = field(default_factory=dict)


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / CONFIG_FILE).is_file()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype == "auto":
        # bf16 is emulated (slow) on most CPUs; GPUs run it natively
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in names:
        raise UserError(f"--dtype must be one of auto, {', '.join(names)} (got {dtype!r})")
    return names[dtype]


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       dtype: str | torch.dtype = "auto", require_tokenizer: bool = True) -> Loaded:
    """Model + tokenizer, ready for `Generator`, from any of: an openllama model dir, a checkpoint
    step dir, a run dir (its newest step) or an exported Hugging Face Llama dir (config.json);
    the tokenizer files are looked for beside the model, in its step dir and in its run dir.
    require_tokenizer=False (scoring token shards needs none): tokenizer and tokenizer_dir may be None."""
    from .artifacts import find_tokenizer_dir, resolve_model_dir
    from .model import load_model, use_cpu_decode_layout
    from .tokenizer import Tokenizer

    device = pick_device(device) if isinstance(device, str) else device
    dtype = pick_dtype(dtype, device) if isinstance(dtype, str) else dtype
    start = Path(path)
    if _is_hf_dir(start):
        from .hf import import_hf

        model_dir, kind = start, "hf"
        model = import_hf(start).to(device=device, dtype=dtype)
        tok_dir = start
        if not ((start / "tokenizer.model").is_file() or (start / "tokenizer.json").is_file()):
            tok_dir = None
    else:
        model_dir, kind = resolve_model_dir(start), "openllama"
        model = load_model(model_dir, device=device, dtype=dtype)
        tok_dir = find_tokenizer_dir(start)
    if tok_dir is None and require_tokenizer:
        raise UserError(f"{start}: no tokenizer files (tokenizer.model) beside the model, in its step "
                        f"directory or in its run directory")
    tokenizer = Tokenizer.load(tok_dir) if tok_dir is not None else None
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{tok_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.cfg.vocab_size}")
    if device.type == "cpu":
        use_cpu_decode_layout(model)
    return Loaded(model.eval(), tokenizer, model_dir, Path(tok_dir) if tok_dir is not None else None,
                  start.resolve().name, {"kind": kind})


# -- command line --------------------------------------------------------------------------------


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, on generated tokens")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, on generated tokens")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model dir, checkpoint step dir, run dir or HF dir")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is often fastest for small models)")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1 (got {args.threads})")
        torch.set_num_threads(args.threads)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop),
                          seed=args.seed, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[],
                        help="prompt text (repeatable: several prompts run as one batch); '-' reads stdin")
    parser.add_argument("--no-stream", action="store_true", help="print each result when done")
    parser.add_argument("--json", action="store_true", help="print results as JSON lines")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # the server's engine, so `openllama generate`, `openllama chat` and `openllama serve` share one
    # decode path (imported here: serve/ builds on this module, not the other way round)
    from .serve.scheduler import Scheduler

    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
    if not prompts:
        raise UserError("generate: give at least one --prompt")
    params = sampling_from_args(args)
    apply_threads(args)
    loaded = load_for_inference(args.model, args.device, args.dtype)
    engine = Scheduler(Generator(loaded.model, loaded.tokenizer, compile=args.compile), max_slots=len(prompts))
    try:
        return _print_results(engine, prompts, params, args)
    finally:
        engine.close()


def _print_results(engine, prompts: list[str], params: SamplingParams, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if len(prompts) == 1 and not (args.no_stream or args.json):
        for piece in engine.stream(prompts[0], params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    results = engine.generate(prompts, params)
    for prompt, c in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": c.text, "finish_reason": c.finish_reason,
                              "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}))
        else:
            print(c.text)
    n = sum(c.completion_tokens for c in results)
    print(f"[{n} tokens in {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
    return 0
