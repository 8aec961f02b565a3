"""Preference data: a prompt (a conversation ending with a user turn) and a chosen and a
rejected reply, for reward models and DPO.

Formats:
  pairs  {"prompt", "chosen", "rejected"}: the prompt a string or a message list; each reply a
         string or (TRL conversational) a list holding one assistant message.
  hh     Anthropic HH-RLHF {"chosen", "rejected"}: whole dialogues as `\\n\\nHuman: ...\\n\\nAssistant:
         ...` text, as released (irregular: see `from_hh`); the shared start becomes the prompt and
         the two remainders the pair.

Encoding renders prompt + reply with the chat template (loss mask on the final reply only) and
`collate_pairs` stacks chosen rows then rejected rows, right-padded, with each row's length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..chat_template import ChatTemplate, Example
from ..errors import UserError
from .chat import ROLES, LengthReport, ReadReport, RecordError, pad_examples, read_records


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


class IrregularRecord(Exception):
    """A well-formed record that yields no pair (released data is irregular, not malformed):
    skipped and counted under `reason` whatever on_error says."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_HH_REPLY = "\n\nAssistant:"
# only the blank-line form (or the very start) begins a turn: HH has "...  Human: ..." inside
# turns, which stays text
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def _common_prefix(a: str, b: str) -> str:
    """The longest common prefix, by bisection on slice equality (C speed on long dialogues)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return a[:lo]


def _hh_turns(text: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: a\\n\\nAssistant: b...` -> messages; [] when it does not start with a Human turn."""
    parts = _HH_TURN.split(text)  # [before the first marker, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        return []
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def from_hh(record: dict) -> PreferencePair:
    """TRL's rule for HH-RLHF: the prompt is the longest common start of chosen and rejected, cut
    back to its last "\\n\\nAssistant:" marker; the replies are what follows it on each side."""
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise RecordError(f"key {key!r} must be a string of Human:/Assistant: turns")
    chosen, rejected = record["chosen"], record["rejected"]
    end = _common_prefix(chosen, rejected).rfind(_HH_REPLY)
    prompt = _hh_turns(chosen[:end]) if end >= 0 else []
    if not prompt:
        raise IrregularRecord("no_shared_prompt", "chosen and rejected share no Human turn then '\\n\\nAssistant:'")
    replies = [text[end + len(_HH_REPLY):].strip() for text in (chosen, rejected)]
    if not all(replies):
        raise IrregularRecord("empty_reply", f"the {'chosen' if not replies[0] else 'rejected'} reply is empty")
    return PreferencePair(prompt, replies[0], replies[1])


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
    """All pairs in a JSON / JSON-lines file (plain, .gz or .zst); a malformed record is a
    UserError naming file, line and the expected keys (or with on_error="skip" counted as
    "malformed"); an irregular HH record is always skipped and counted by its reason."""
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
        except IrregularRecord as exc:
            report.skip(exc.reason, f"{where}: {exc}")
            continue
        except RecordError as exc:
            report.malformed(f"{where}: {exc} (format {pfmt.name} expects keys {', '.join(pfmt.keys)})", on_error)
            continue
        pair.source = where
        out.append(pair)
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
