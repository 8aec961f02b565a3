"""Preference data: a prompt (a conversation ending with a user turn) and a chosen and a
rejected reply, for reward models and DPO.

Formats:
  pairs  {"prompt", "chosen", "rejected"}: the prompt a string or a message list; each reply a
         string or (TRL conversational) a list holding one assistant message.
  hh     Anthropic HH-RLHF {"chosen", "rejected"}: whole dialogues as `\\n\\nHuman: ...\\n\\nAssistant:
         ...` text; the shared turns become the prompt and the differing final replies the pair.

Encoding renders prompt + reply with the chat template (loss mask on the final reply only) and
`collate_pairs` stacks chosen rows then rejected rows, right-padded, with each row's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from .chat import (ROLES, ChatTemplate, Example, LengthReport, ReadReport, RecordError, pad_examples,
                   read_records, split_turns)


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str = ""


def _prompt_messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        out = []
        for j, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise RecordError(f"prompt[{j}] must be {{role, content}}, got {m!r:.80}")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "user":
            raise RecordError("prompt must end with a user message")
        return out
    raise RecordError("key 'prompt' must be a string or a non-empty list of {role, content}")


def _reply(record: dict, key: str) -> str:
    value = record.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    got = "missing" if key not in record else f"a {type(value).__name__}"
    raise RecordError(f"key {key!r} must be a string or [{{role: assistant, content}}] ({got})")


def from_pairs(record: dict) -> PreferencePair:
    return PreferencePair(_prompt_messages(record.get("prompt")), _reply(record, "chosen"), _reply(record, "rejected"))


def from_hh(record: dict) -> PreferencePair:
    """Split HH dialogues into the shared prompt and the two final assistant replies."""
    sides = []
    for key in ("chosen", "rejected"):
        text = record.get(key)
        if not isinstance(text, str):
            raise RecordError(f"key {key!r} must be a string of Human:/Assistant: turns")
        turns = split_turns(text)
        if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
            raise RecordError(f"{key!r} must end with a Human turn then an Assistant reply")
        sides.append(turns)
    chosen, rejected = sides
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("chosen and rejected differ before their final Assistant reply (no shared prompt)")
    prompt = [{"role": r, "content": c} for r, c in chosen[:-1]]
    return PreferencePair(prompt, chosen[-1][1], rejected[-1][1])


@dataclass(frozen=True)
class PreferenceFormat:
    name: str
    keys: tuple[str, ...]
    read: Any


PREFERENCE_FORMATS = {f.name: f for f in (
    PreferenceFormat("pairs", ("prompt", "chosen", "rejected"), from_pairs),
    PreferenceFormat("hh", ("chosen", "rejected"), from_hh),
)}


def detect_preference_format(record: Any) -> PreferenceFormat | None:
    if not isinstance(record, dict):
        return None
    for fmt in PREFERENCE_FORMATS.values():
        if all(k in record for k in fmt.keys):
            return fmt
    return None


def read_preferences(path: str | Path, fmt: str = "auto", on_error: str = "raise",
                     report: ReadReport | None = None) -> list[PreferencePair]:
    """All pairs in a JSON / JSON-lines file; errors name file, line and the expected keys."""
    report = report if report is not None else ReadReport()
    given = None
    if fmt != "auto":
        if fmt not in PREFERENCE_FORMATS:
            raise UserError(f"unknown preference format {fmt!r}: expected auto, {', '.join(PREFERENCE_FORMATS)}")
        given = PREFERENCE_FORMATS[fmt]
        report.format = fmt
    out = []
    for where, record, pfmt in read_records(path, given, "preference", detect_preference_format, on_error, report):
        try:
            if not isinstance(record, dict):
                raise RecordError(f"expected a JSON object, got {type(record).__name__}")
            pair = pfmt.read(record)
            pair.source = f"{path}: {where}"
            out.append(pair)
        except RecordError as exc:
            msg = f"{path}: {where}: {exc} (format {pfmt.name} expects keys {', '.join(pfmt.keys)})"
            if on_error == "raise":
                raise UserError(msg) from None
            report.skipped.append(msg)
    return out


# ----------------------------------------------------------------------------------------------
# Tokens


@dataclass
class EncodedPair:
    chosen: Example
    rejected: Example


def encode_pair(pair: PreferencePair, template: ChatTemplate, tokenizer: Any) -> EncodedPair:
    """prompt + each reply rendered and tokenised whole; labels only on the final reply."""
    def one(reply: str) -> Example:
        return template.encode(pair.prompt + [{"role": "assistant", "content": reply}], tokenizer, only_last=True)
    return EncodedPair(one(pair.chosen), one(pair.rejected))


def encode_pairs(pairs: Sequence[PreferencePair], template: ChatTemplate, tokenizer: Any, max_len: int,
                 report: LengthReport | None = None) -> list[EncodedPair]:
    """Encode and keep the pairs whose both sides fit `max_len` (the rest are dropped and counted:
    cutting a reply would change what is being compared)."""
    report = report if report is not None else LengthReport()
    out = []
    for pair in pairs:
        enc = encode_pair(pair, template, tokenizer)
        if max(len(enc.chosen), len(enc.rejected)) > max_len:
            report.dropped += 1
            continue
        report.kept += 1
        out.append(enc)
    return out


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, Any]:
    """tokens/labels (2B, T): chosen rows first, then rejected rows, right-padded; `lengths` (2B)."""
    import torch

    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tokens, labels = pad_examples(rows, pad_id)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return {"tokens": tokens, "labels": labels, "lengths": lengths}
