"""Exact-match task accuracy with a 95% Wilson interval.

A task file is JSON lines of `{"messages": [...], "answer": "...", "family"?, "lang"?}` (what
`data/builtin.py` writes): the conversation's last assistant turn is the reference and the model
answers the turns before it. An answer is right when its first line, with surrounding spaces and
closing punctuation removed, equals the reference exactly (digits as written: "7" is not "07").

Eval sets here are small (a few hundred problems), so every accuracy carries its interval: the
Wilson score interval, which stays inside [0, 1] and behaves at 0% and 100%, unlike p +- 1.96 SE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import UserError

Z95 = 1.959963984540054  # two-sided 95% normal quantile

_CLOSING = " \t.。!！,，;；"


def normalize_answer(text: str) -> str:
    """The first non-empty line, trimmed of spaces and closing punctuation, inner spaces collapsed."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return " ".join(first.strip(_CLOSING).split())


def is_correct(generated: str, reference: str) -> bool:
    return normalize_answer(generated) == normalize_answer(reference)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (0 <= lo <= k/n <= hi <= 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact ends at 0 and n (rounding would leave 0.9999999...)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{100 * self.value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={self.n})"

    def to_json(self) -> dict:
        lo, hi = self.interval
        return {"accuracy": self.value, "low": lo, "high": hi, "correct": self.correct, "n": self.n}


def clearly_better(a: Accuracy, b: Accuracy) -> bool:
    """a beats b beyond the intervals: a's lower bound is above b's upper bound (conservative)."""
    return a.interval[0] > b.interval[1]


def load_tasks(path: str | Path) -> list[dict]:
    """Read a task file (JSON lines or a JSON array, plain, .gz or .zst); a malformed record is a
    UserError naming the file and line."""
    from .records import json_records

    out = []
    for where, row in json_records(path):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict) \
                or msgs[-1].get("role") != "assistant":
            raise UserError(f"{where}: key 'messages' must be a conversation ending with the "
                            f"assistant's reference answer")
        if not isinstance(row.get("answer", msgs[-1].get("content")), str):
            raise UserError(f"{where}: key 'answer' must be a string")
        row.setdefault("answer", msgs[-1]["content"])
        out.append(row)
    if not out:
        raise UserError(f"{path}: no tasks")
    return out


@dataclass
class TaskResult:
    overall: Accuracy
    by_family: dict[str, Accuracy]
    samples: list[dict]  # {"prompt", "answer", "output", "correct", "family"} for every task

    def to_json(self) -> dict:
        return {"overall": self.overall.to_json(),
                "by_family": {k: v.to_json() for k, v in sorted(self.by_family.items())}}


def score(tasks: Sequence[dict], outputs: Sequence[str]) -> TaskResult:
    """Exact-match scores of `outputs` (one per task) overall and per family."""
    if len(tasks) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {len(tasks)} tasks")
    per: dict[str, list[int]] = {}
    samples = []
    for t, out in zip(tasks, outputs):
        ok = is_correct(out, t["answer"])
        fam = t.get("family", "all")
        per.setdefault(fam, []).append(int(ok))
        samples.append({"prompt": t["messages"][-2]["content"], "answer": t["answer"], "output": out,
                        "correct": ok, "family": fam})
    total = sum(sum(v) for v in per.values())
    return TaskResult(Accuracy(total, len(tasks)), {k: Accuracy(sum(v), len(v)) for k, v in per.items()}, samples)


def evaluate_tasks(tasks: Sequence[dict], answer: Callable[[list[list[dict]]], list[str]],
                   batch_size: int = 64) -> TaskResult:
    """Ask `answer` (prompt conversations -> replies) every task, in batches, and score it."""
    outputs: list[str] = []
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i:i + batch_size]
        outputs.extend(answer([t["messages"][:-1] for t in chunk]))
    return score(tasks, outputs)


def chat_answerer(model, tokenizer, *, max_new_tokens: int = 16, template: str | None = None,
                  temperature: float = 0.0, seed: int = 0) -> Callable[[list[list[dict]]], list[str]]:
    """Replies of a model in the chat format. Prompts are `ChatTemplate.generation_ids`: the
    conversation + generation prompt minus trailing whitespace tokens, which training counts as
    the start of the reply (as serve and GRPO build them)."""
    from .chat_template import ChatTemplate
    from .generate import Generator, SamplingParams

    tpl = ChatTemplate.for_tokenizer(tokenizer, template)
    gen = Generator(model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop=("\n",), seed=seed)

    def answer(prompts: list[list[dict]]) -> list[str]:
        ids = [tpl.generation_ids(msgs, tokenizer) for msgs in prompts]
        return [c.text.strip() for c in gen.generate(ids, params)]

    return answer


def reply_loss(model, tokenizer, tasks: Sequence[dict], *, template: str | None = None,
               batch_size: int = 32) -> tuple[float, int]:
    """Mean cross-entropy (nats per token) of the reference answers given their prompts, in the chat
    format (loss on the final reply and its end-of-sequence token only), and the tokens counted."""
    import torch

    from .chat_template import ChatTemplate
    from .data.chat import pad_examples
    from .labels import IGNORE_INDEX, token_logprobs

    tpl = ChatTemplate.for_tokenizer(tokenizer, template)
    examples = [tpl.encode(t["messages"], tokenizer, only_last=True) for t in tasks]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            tokens, labels = pad_examples(chunk, pad)
            total -= float(token_logprobs(model, tokens, labels).sum())
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    model.train(was_training)
    return (total / count if count else float("nan")), count


def task_report(model, tokenizer, tasks: Sequence[dict], *, max_new_tokens: int = 24,
                template: str | None = None, batch_size: int = 64, progress: bool = True) -> dict:
    """Exact-match accuracy (greedy, chat format) with its 95% interval overall and per family,
    the held-out reply loss, and every model answer."""
    from tqdm import tqdm

    answer = chat_answerer(model, tokenizer, max_new_tokens=max_new_tokens, template=template)
    bar = tqdm(total=len(tasks), desc="tasks", unit="task", disable=not progress, dynamic_ncols=True)

    def answer_with_progress(prompts):
        out = answer(prompts)
        bar.update(len(prompts))
        return out

    result = evaluate_tasks(tasks, answer_with_progress, batch_size=batch_size)
    bar.close()
    loss, n_tokens = reply_loss(model, tokenizer, tasks, template=template)
    return {**result.to_json(), "reply_loss": loss, "reply_tokens": n_tokens, "samples": result.samples}
