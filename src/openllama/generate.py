"""Text generation: prefill + cached decode, sampling, stop conditions, streaming, batches.

The loop is deliberately plain: one prefill over the (left-padded) prompts, then one forward pass
per new token over a preallocated KV cache whose shapes never change, so the decode step can be
handed to `torch.compile` once and reused for every position (no recompiles).

- `SamplingParams`: greedy (temperature 0), temperature, top-k, top-p, repetition penalty,
  stop strings, EOS, max new tokens, seed.
- `Generator(model, tokenizer)`: `.generate(prompts, params)` -> `Completion`s;
  `.stream(prompt, params)` -> text pieces; `.start(prompts, params)` -> a `Generation` to iterate
  step by step (one text piece per row per step) and to `cancel()` from another thread.
- Batches are left-padded: every row writes the same cache column each step, positions are per
  row (column - padding) and an attention mask hides the padding, so a row's tokens equal what
  the prompt gives alone. Sampling uses one `torch.Generator` per row: seeded runs reproduce.
- Streaming never splits a multi-byte character: text is decoded with a few tokens of context
  and held back while it ends in an incomplete UTF-8 sequence (U+FFFD) or could still be the
  start of a stop string.
- `load_for_inference(path)`: an openllama model dir, a training step dir, a run dir (newest step)
  or an exported Hugging Face dir, with the tokenizer found beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import UserError
from .artifacts import CONFIG_FILE
from .model import KVCache, Llama

# -- sampling ------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off (CTRL-style, as transformers applies it)
    stop: Sequence[str] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks decode a fixed number of tokens

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise UserError(f"sampling: {name} {why} (got {getattr(self, name)!r})")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the text less likely: positive logits / penalty, negative * penalty."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set with mass >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                generators: list[torch.Generator]) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next token ids."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    # one generator per row: a row's samples do not depend on what else is in the batch
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


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


# -- the generator -------------------------------------------------------------------------------


class StaticKVCache(KVCache):
    """A KV cache whose buffers are allocated once for the whole generation.

    Eager (`static` False): a plain `KVCache`: writes at `start`, attention sees the filled columns.
    Compiled (`static` True): `update` writes at the columns in `write_idx` (a tensor the generator
    sets before each forward) and returns the full buffers, the attention mask hiding the unwritten
    columns; `start` is ignored, so the model is called with a constant `start_pos` and the compiled
    decode step never recompiles as the position advances.
    """

    def __init__(self, cfg, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__(cfg, batch_size, max_len, device=device, dtype=dtype)
        self.write_idx = torch.zeros(1, dtype=torch.long, device=device)
        self.static = False

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        if not self.static:
            return super().update(layer, start, k, v)
        self.k[layer].index_copy_(2, self.write_idx, k)
        self.v[layer].index_copy_(2, self.write_idx, v)
        return self.k[layer], self.v[layer]


@dataclass
class Completion:
    """One finished row: its text, ids and why it stopped ('stop' = EOS or a stop string, 'length')."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class Generation:
    """One running batch. Iterate it to advance one token at a time: each item is a list with the
    new text of every row ('' when a row has nothing new or is done). `completions` is filled
    when iteration ends. `cancel()` (any thread) stops it before the next step."""

    def __init__(self, gen: "Generator", prompts: list[list[int]], params: SamplingParams,
                 seeds: Sequence[int | None] | None, strip_prefix: str = ""):
        self.gen, self.params = gen, params
        self.strip_prefix = strip_prefix
        self.prompts = prompts
        self.completions: list[Completion] = []
        self._cancel = threading.Event()
        base = params.seed if params.seed is not None else int.from_bytes(os.urandom(6), "little")
        seeds = list(seeds) if seeds is not None else [base + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError("one seed per prompt")
        self.seeds = [s if s is not None else base + i for i, s in enumerate(seeds)]

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[list[str]]:
        return self.gen._run(self)

    def run(self) -> list[Completion]:
        for _ in self:
            pass
        return self.completions


class _NoText:
    """Stands in for `TextStream` when a Generator has no tokenizer: ids only, no text."""

    stopped, text = False, ""

    def push(self, token: int) -> str:
        return ""

    def finish(self) -> str:
        return ""


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
        if compile:
            self._step = torch.compile(self._forward, fullgraph=False, dynamic=False)

    def _forward(self, tokens, positions, mask, cache, start_pos: int = 0):
        # compiled: positions and cache.write_idx carry the position, start_pos stays 0 on purpose
        return self.model(tokens, positions=positions, attn_mask=mask, cache=cache, start_pos=start_pos,
                          last_only=True)[:, -1]

    # -- public ----------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("generate: text prompts need a tokenizer (pass token ids)")
            return self.tokenizer.encode(prompt, bos=True)
        return list(prompt)

    def start(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams,
              seeds: Sequence[int | None] | None = None, strip_prefix: str = "") -> Generation:
        """A batch ready to run. `strip_prefix`: text each reply starts with that the prompt already
        shows (`ChatPrompter.reply_prefix`), left out of the reply text."""
        ids = [self.encode(p) for p in prompts]
        if not ids:
            raise UserError("generate: no prompts")
        for row in ids:
            if not row:
                raise UserError("generate: empty prompt (no tokens)")
            if len(row) >= self.max_seq_len:
                raise UserError(f"generate: prompt has {len(row)} tokens; the context holds {self.max_seq_len}")
        return Generation(self, ids, params, seeds, strip_prefix)

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
                 seeds: Sequence[int | None] | None = None, strip_prefix: str = "") -> list[Completion]:
        return self.start(prompts, params or SamplingParams(), seeds, strip_prefix).run()

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               strip_prefix: str = "") -> Iterator[str]:
        """Text pieces of one prompt as they are generated."""
        for pieces in self.start([prompt], params or SamplingParams(), strip_prefix=strip_prefix):
            if pieces[0]:
                yield pieces[0]

    # -- the loop --------------------------------------------------------------------------------

    def _run(self, g: Generation) -> Iterator[list[str]]:
        # eval mode (no dropout) while generating; a model in training (GRPO rollouts) goes back after
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._decode(g)
        finally:
            self.model.train(was_training)

    @torch.inference_mode()  # on a generator, torch enters/leaves it around each step, not across yields
    def _decode(self, g: Generation) -> Iterator[list[str]]:
        params, prompts, dev = g.params, g.prompts, self.device
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        T = int(lens.max())
        new_max = min(params.max_new_tokens, self.max_seq_len - T)
        # cache length rounded up, so repeated requests of similar size reuse compiled shapes
        S = min(_round_up(T + new_max, 64), max(self.max_seq_len, T + new_max))
        pad = T - lens  # left padding per row
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            tokens[i, T - len(p):] = torch.tensor(p, dtype=torch.long, device=dev)

        cols = torch.arange(S, device=dev)
        valid = cols[None, :] >= pad[:, None]  # (B, S): real (non-padding) columns
        valid[:, T:] = False
        # prefill mask: causal, no padding keys; a padding query sees itself so no row is all-masked
        q_cols = torch.arange(T, device=dev)
        causal = cols[None, :] <= q_cols[:, None]  # (T, S)
        mask = (causal[None] & valid[:, None, :]) | (cols[None, None, :] == q_cols[None, :, None])
        positions = (q_cols[None, :] - pad[:, None]).clamp(min=0)

        padded = bool((pad > 0).any())
        cache = StaticKVCache(self.cfg, B, S, device=dev, dtype=self.dtype)
        # prefill runs eager, on the plain cache (columns 0..T-1); without padding it is simply causal
        logits = self._forward(tokens, positions if padded else None, mask[:, None, :, :T] if padded else None, cache)
        cache.static = self.compiled

        seen = torch.zeros(B, self.cfg.vocab_size, dtype=torch.bool, device=dev)
        if params.repetition_penalty != 1.0:
            for i, p in enumerate(prompts):  # the prompt's own tokens count as seen (not the padding)
                seen[i, torch.tensor(p, device=dev)] = True
        gens = []
        if not params.greedy:
            for s in g.seeds:
                gen = torch.Generator(device=dev)
                gen.manual_seed(s)
                gens.append(gen)
        if self.tokenizer is None:
            streams = [_NoText() for _ in prompts]
        else:
            streams = [TextStream(self.tokenizer, p, params.stop, g.strip_prefix) for p in prompts]
        out_ids: list[list[int]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B

        for step in range(new_max):
            if g.cancelled:
                break
            next_ids = pick_tokens(logits, params, seen, gens)
            host = next_ids.tolist()
            pieces = [""] * B
            for i, tok in enumerate(host):
                if finish[i] is not None:
                    continue
                out_ids[i].append(tok)
                if tok == self.eos_id and not params.ignore_eos:
                    finish[i] = "stop"
                    pieces[i] = streams[i].finish()
                    continue
                pieces[i] = streams[i].push(tok)
                if streams[i].stopped:
                    finish[i] = "stop"
            yield pieces
            if all(f is not None for f in finish) or step == new_max - 1:
                break
            if params.repetition_penalty != 1.0:
                seen.scatter_(1, next_ids[:, None], True)
            col = T + step
            if self.compiled:  # one shape every step: full cache, mask over the unwritten columns
                valid[:, col] = True
                cache.write_idx = cols[col:col + 1]
                logits = self._step(next_ids[:, None], (col - pad)[:, None], valid[:, None, None, :], cache)
            elif padded:  # the cache's filled columns; the mask hides the padding
                valid[:, col] = True
                logits = self._step(next_ids[:, None], (col - pad)[:, None], valid[:, None, None, :col + 1], cache, col)
            else:  # every row at the same position: no mask, positions from start_pos
                logits = self._step(next_ids[:, None], None, None, cache, col)

        tail = [""] * B
        for i in range(B):
            if finish[i] is None:
                finish[i] = "length"
                tail[i] = streams[i].finish()
        if any(tail):
            yield tail
        g.completions = [Completion(s.text, ids, f, len(p))
                         for s, ids, f, p in zip(streams, out_ids, finish, prompts)]


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
                          seed=args.seed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[],
                        help="prompt text (repeatable: several prompts run as one batch); '-' reads stdin")
    parser.add_argument("--no-stream", action="store_true", help="print each result when done")
    parser.add_argument("--json", action="store_true", help="print results as JSON lines")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
    if not prompts:
        raise UserError("generate: give at least one --prompt")
    params = sampling_from_args(args)
    apply_threads(args)
    loaded = load_for_inference(args.model, args.device, args.dtype)
    gen = Generator(loaded.model, loaded.tokenizer, compile=args.compile)
    t0 = time.perf_counter()
    if len(prompts) == 1 and not (args.no_stream or args.json):
        for piece in gen.stream(prompts[0], params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    results = gen.generate(prompts, params)
    for prompt, c in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": c.text, "finish_reason": c.finish_reason,
                              "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}))
        else:
            print(c.text)
    n = sum(c.completion_tokens for c in results)
    print(f"[{n} tokens in {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
    return 0
