"""Instruction and chat data: formats -> conversations -> token ids with a loss mask on replies.

The chat templates and their tokenisation (`ChatTemplate`, `Example`) live in
`openllama.chat_template`, beside the tokenizer that carries them; they are re-exported here for
the callers that still import them from data.chat.

Pipeline:
  read_conversations(path, fmt)   alpaca / self_instruct / BELLE (+ multi-turn Human:/Assistant:
                                  text) / school_math / BELLE eval / BELLE seed tasks / ShareGPT /
                                  OpenAI-TRL messages / prompt-completion -> list[Conversation]
  ChatTemplate.encode(conv, tok)  (chat_template.py) render the whole conversation with the jinja
                                  template (exactly as transformers' `apply_chat_template` does),
                                  tokenise it once, and
                                  label only the tokens that overlap an assistant reply (+ the text
                                  the template closes it with, e.g. eos), so our ids equal
                                  `apply_chat_template(messages, tokenize=True)` on the exported
                                  tokenizer.
  fit_length(example, max_len)    truncation only at the end of an assistant turn, or drop.
  pack(examples, seq_len)         several conversations per row with doc_ids (no cross-attention).
  EpochBatches                    shuffled, rank-sharded batches with a state_dict for exact resume.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..chat_template import Example
from ..errors import UserError
from ..labels import IGNORE_INDEX
from ..records import json_records

ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------------------------
# The conversation type


@dataclass
class Conversation:
    """A list of {role, content} messages; `source` says where it came from (for error messages)."""

    messages: list[dict[str, str]]
    source: str = ""

    def __post_init__(self) -> None:
        for i, m in enumerate(self.messages):
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be {{role: system|user|assistant, content: str}}, got {m!r}")
        if not any(m["role"] == "assistant" for m in self.messages):
            raise ValueError("conversation has no assistant reply to train on")


class RecordError(ValueError):
    """A record that does not fit its format; the reader adds file and line."""


def _text(record: dict, key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in record else f"a {type(value).__name__}"
        raise RecordError(f"key {key!r} must be a string ({got})")
    return value


def _instruction_prompt(instruction: str, inp: str) -> str:
    """The seed's prompt for alpaca-style records: the instruction, then the input on its own line."""
    return f"{instruction}\n{inp}" if inp.strip() else instruction


_TURN_MARKER = re.compile(r"(?:^|\n)\s*(Human|Assistant)\s*[:：]")


def split_turns(text: str) -> list[tuple[str, str]]:
    """`Human: a\nAssistant: b\nHuman: c` -> [("user", "a"), ("assistant", "b"), ("user", "c")].
    Text before the first marker is an error (returns [] when there is no marker at all)."""
    marks = list(_TURN_MARKER.finditer(text))
    if not marks:
        return []
    if text[: marks[0].start()].strip():
        raise RecordError("text before the first 'Human:'/'Assistant:' marker")
    turns = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        role = "user" if m.group(1) == "Human" else "assistant"
        turns.append((role, text[m.end():end].strip()))
    return turns


def from_alpaca(record: dict) -> list[Conversation]:
    """alpaca / self_instruct / BELLE / BELLE school_math: instruction, input, output. A BELLE
    multi-turn record holds `Human: ... Assistant: ... Human: ... Assistant:` in its instruction,
    with the final reply in output."""
    instruction = _text(record, "instruction")
    inp = _text(record, "input", required=False)
    output = _text(record, "output")
    turns = split_turns(instruction) if instruction.lstrip().startswith("Human") else []
    if turns:
        if turns[-1] == ("assistant", ""):
            turns.pop()  # the open "Assistant:" the output answers
        if turns[-1][0] != "user":
            raise RecordError("multi-turn instruction must end with a Human turn (then 'Assistant:')")
        if inp.strip():
            turns[-1] = ("user", _instruction_prompt(turns[-1][1], inp))
        messages = [{"role": r, "content": c} for r, c in turns]
    else:
        messages = [{"role": "user", "content": _instruction_prompt(instruction, inp)}]
    return [Conversation(messages + [{"role": "assistant", "content": output}])]


def from_belle_eval(record: dict) -> list[Conversation]:
    """BELLE eval set: question, std_answer (class ignored)."""
    return [Conversation([{"role": "user", "content": _text(record, "question")},
                          {"role": "assistant", "content": _text(record, "std_answer")}])]


def from_belle_seed(record: dict) -> list[Conversation]:
    """BELLE seed tasks: one instruction with several instances[{input, output}] -> one
    conversation per instance."""
    instruction = _text(record, "instruction")
    instances = record.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RecordError("key 'instances' must be a non-empty list of {input, output}")
    out = []
    for j, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise RecordError(f"instances[{j}] must be an object with input and output")
        try:
            prompt = _instruction_prompt(instruction, _text(inst, "input", required=False))
            out.append(Conversation([{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": _text(inst, "output")}]))
        except RecordError as exc:
            raise RecordError(f"instances[{j}]: {exc}") from None
    return out


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}


def from_sharegpt(record: dict) -> list[Conversation]:
    """ShareGPT: conversations[{from: human/gpt/system, value}]."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("key 'conversations' must be a non-empty list of {from, value}")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in _SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise RecordError(f"conversations[{j}] must be {{from: human|gpt|system, value: str}}, got {turn!r:.80}")
        messages.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return [Conversation(messages)]


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"key {key!r} must be a non-empty list of {{role, content}}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RecordError(f"{key}[{j}] must be {{role: system|user|assistant, content: str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def from_messages(record: dict) -> list[Conversation]:
    """OpenAI / TRL conversational format: messages[{role, content}]."""
    return [Conversation(_messages(record.get("messages"), "messages"))]


def from_prompt_completion(record: dict) -> list[Conversation]:
    """prompt/completion pairs; each may be a string or (TRL conversational) a message list."""
    prompt, completion = record.get("prompt"), record.get("completion")
    p = [{"role": "user", "content": _text(record, "prompt")}] if not isinstance(prompt, list) else _messages(prompt, "prompt")
    if isinstance(completion, list):
        c = _messages(completion, "completion")
    else:
        c = [{"role": "assistant", "content": _text(record, "completion")}]
    return [Conversation(p + c)]


@dataclass(frozen=True)
class ChatFormat:
    name: str
    keys: tuple[str, ...]  # what a record of this format must hold (detection + error messages)
    read: Callable[[dict], list[Conversation]]


CHAT_FORMATS = {f.name: f for f in (
    ChatFormat("sharegpt", ("conversations",), from_sharegpt),
    ChatFormat("messages", ("messages",), from_messages),
    ChatFormat("prompt_completion", ("prompt", "completion"), from_prompt_completion),
    ChatFormat("belle_eval", ("question", "std_answer"), from_belle_eval),
    ChatFormat("belle_seed", ("instruction", "instances"), from_belle_seed),
    ChatFormat("alpaca", ("instruction", "output"), from_alpaca),
)}
# Other names for the same record shapes.
FORMAT_ALIASES = {"self_instruct": "alpaca", "belle": "alpaca", "school_math": "alpaca",
                  "openai": "messages", "trl": "messages"}
FORMAT_NAMES = tuple(CHAT_FORMATS) + tuple(FORMAT_ALIASES)


def detect_format(record: Any) -> ChatFormat | None:
    """The first format whose keys the record has (checked most specific first)."""
    if not isinstance(record, dict):
        return None
    for fmt in CHAT_FORMATS.values():
        if all(k in record for k in fmt.keys):
            return fmt
    return None


def resolve_format(name: str) -> ChatFormat | None:
    """None for "auto"; a UserError for an unknown name."""
    if name == "auto":
        return None
    name = FORMAT_ALIASES.get(name, name)
    if name not in CHAT_FORMATS:
        raise UserError(f"unknown chat format {name!r}: expected auto or one of {', '.join(FORMAT_NAMES)}")
    return CHAT_FORMATS[name]


# ----------------------------------------------------------------------------------------------
# Reading files


@dataclass
class ReadReport:
    """What a reader did with one file: the format used, records read, and the records skipped,
    counted by reason (`skipped` keeps every message, for printing the first few). Every record
    read is either used or skipped (a raised error ends the read), so `used` is derived."""

    format: str = ""
    records: int = 0
    skipped: list[str] = field(default_factory=list)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return self.records - len(self.skipped)

    def skip(self, reason: str, message: str) -> None:
        self.skipped.append(message)
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1

    def malformed(self, message: str, on_error: str) -> None:
        """A record that does not fit its format: a UserError, or with on_error="skip" counted."""
        if on_error == "raise":
            raise UserError(message) from None
        self.skip("malformed", message)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "records": self.records, "used": self.used,
                "skipped": len(self.skipped), "skipped_by_reason": dict(sorted(self.skipped_by_reason.items()))}


def read_records(path: str | Path, fmt: str | ChatFormat | None, reader_kind: str,
                 detect: Callable[[Any], Any], on_error: str, report: ReadReport) -> Iterator[tuple[str, Any, Any]]:
    """Shared by the chat, preference and prompt readers: yields (where, record, format) for every
    record of a JSON / JSON-lines file (plain, .gz or .zst, streamed; `where` is "path:LINE" or
    "path: array index N"), the format detected from the first record (or given). The caller
    turns a record that does not fit into `report.malformed(...)`."""
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    chosen = fmt
    for where, record in json_records(path):
        report.records += 1
        if chosen is None:
            chosen = detect(record)
            if chosen is None:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{where}: cannot tell the {reader_kind} format from keys {keys}; "
                                f"name it with --format")
            report.format = chosen.name
        yield where, record, chosen


def read_conversations(path: str | Path, fmt: str = "auto", on_error: str = "raise",
                       report: ReadReport | None = None) -> list[Conversation]:
    """All conversations in a JSON / JSON-lines file (plain, .gz or .zst). `fmt` is a format name
    or "auto" (detected from the first record). A malformed record is a UserError naming file,
    line and what was expected, or with on_error="skip", counted in `report` as "malformed"."""
    report = report if report is not None else ReadReport()
    given = resolve_format(fmt)
    if given is not None:
        report.format = given.name
    out: list[Conversation] = []
    for where, record, chat_fmt in read_records(path, given, "chat", detect_format, on_error, report):
        try:
            if not isinstance(record, dict):
                raise RecordError(f"expected a JSON object, got {type(record).__name__}")
            convs = chat_fmt.read(record)
        except (RecordError, ValueError) as exc:  # ValueError: Conversation's own checks
            report.malformed(f"{where}: {exc} (format {chat_fmt.name} expects keys {', '.join(chat_fmt.keys)})",
                             on_error)
            continue
        for c in convs:
            c.source = where
        out.extend(convs)
    return out


# ----------------------------------------------------------------------------------------------
# Length: truncate at turn boundaries or drop; packing


@dataclass
class LengthReport:
    kept: int = 0
    truncated: int = 0  # later turns removed (cut at the end of an earlier assistant turn)
    dropped: int = 0  # not even the first reply fits


def fit_length(example: Example, max_len: int, report: LengthReport | None = None) -> Example | None:
    """The example itself if it fits; else cut after the last assistant turn that fits (never
    inside a reply); None (dropped) when the first reply does not fit. Counted in `report`."""
    report = report if report is not None else LengthReport()
    if len(example) <= max_len:
        report.kept += 1
        return example
    fitting = [e for e in example.turn_ends if e <= max_len]
    if not fitting:
        report.dropped += 1
        return None
    cut = fitting[-1]
    report.truncated += 1
    return Example(example.ids[:cut], example.labels[:cut], fitting)


def pad_examples(examples: Sequence[Example], pad_id: int):
    """tokens and labels (B, T) of examples right-padded to the longest (labels IGNORE_INDEX there)."""
    import torch

    T = max(len(e) for e in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        tokens[i, :len(e)] = torch.tensor(e.ids)
        labels[i, :len(e)] = torch.tensor(e.labels)
    return tokens, labels


@dataclass
class PackedRow:
    ids: list[int]
    labels: list[int]
    doc_ids: list[int]


def pack(examples: Iterable[Example], seq_len: int, pad_id: int) -> list[PackedRow]:
    """Greedy packing in order: examples go into the current row while they fit, else a new row.
    doc_ids number the conversations within a row (padding gets its own id), so the model's
    document mask keeps attention inside each conversation. Examples must fit `seq_len`."""
    rows: list[PackedRow] = []
    cur = PackedRow([], [], [])
    for ex in examples:
        if len(ex) > seq_len:
            raise ValueError(f"example of {len(ex)} tokens does not fit seq_len {seq_len}; fit_length first")
        if cur.ids and len(cur.ids) + len(ex) > seq_len:
            rows.append(cur)
            cur = PackedRow([], [], [])
        doc = cur.doc_ids[-1] + 1 if cur.doc_ids else 0
        cur.ids += ex.ids
        cur.labels += ex.labels
        cur.doc_ids += [doc] * len(ex)
    if cur.ids:
        rows.append(cur)
    for row in rows:
        n = seq_len - len(row.ids)
        if n:
            row.ids += [pad_id] * n
            row.labels += [IGNORE_INDEX] * n
            row.doc_ids += [row.doc_ids[-1] + 1] * n
    return rows


def collate_rows(rows: Sequence[PackedRow]) -> dict[str, Any]:
    import torch

    return {"tokens": torch.tensor([r.ids for r in rows], dtype=torch.long),
            "labels": torch.tensor([r.labels for r in rows], dtype=torch.long),
            "doc_ids": torch.tensor([r.doc_ids for r in rows], dtype=torch.long)}


# ----------------------------------------------------------------------------------------------
# Batches with exact resume


class EpochBatches:
    """Endless batches over a fixed list of items: each epoch shuffles the items with (seed, epoch),
    optionally regroups them (`arrange`, e.g. packing), gives rank r the rows r, r+world, ..., and
    cuts them into batches. The position (epoch, batch) is the whole state, so resume is exact.
    Every rank gets the same number of batches per epoch (the tail that does not divide is dropped)."""

    def __init__(self, items: Sequence[Any], batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, arrange: Callable[[list[Any]], list[Any]] | None = None,
                 collate: Callable[[list[Any]], Any] = list):
        if not items:
            raise UserError("no training examples left (check the data file and the length limit)")
        self.items, self.batch_size, self.rank, self.world = list(items), batch_size, rank, world
        self.seed, self.shuffle, self.arrange, self.collate = seed, shuffle, arrange, collate
        self.epoch, self.batch = 0, 0
        self._rows: list[Any] | None = None
        self._rows_epoch = -1

    def rows(self, epoch: int) -> list[Any]:
        if self._rows_epoch != epoch:
            order = list(range(len(self.items)))
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(order)
            rows = [self.items[i] for i in order]
            if self.arrange is not None:
                rows = self.arrange(rows)
            self._rows, self._rows_epoch = rows, epoch
        return self._rows

    def batches_per_epoch(self) -> int:
        n = len(self.rows(self.epoch)) // self.world
        return max(n // self.batch_size, 1 if n else 0)

    def __iter__(self) -> "EpochBatches":
        return self

    def __next__(self) -> Any:
        per_epoch = self.batches_per_epoch()
        if per_epoch == 0:
            raise UserError(f"too few examples for batch size {self.batch_size} on {self.world} ranks")
        if self.batch >= per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        mine = self.rows(self.epoch)[self.rank::self.world]
        chunk = mine[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
        self.batch += 1
        return self.collate(chunk)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "world": self.world,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # the position counts per-rank batches: on another world size or batch size it would name
        # other rows, so resuming there would silently repeat or skip data
        for key in ("world", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise UserError(f"data position in checkpoint has {key}={state[key]}, this run has "
                                f"{getattr(self, key)}: resume with the same number of ranks and "
                                f"train.micro_batch_size")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.seed = int(state.get("seed", self.seed))
