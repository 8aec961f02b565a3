"""Preference data: prompt/chosen/rejected and Anthropic HH readers, encoding and collation."""

from __future__ import annotations

import json

import pytest

from alignment_helpers import make_start, write_jsonl
from openllama.data.chat import IGNORE_INDEX, ChatTemplate, ReadReport
from openllama.data.preference import collate_pairs, encode_pair, read_preferences
from openllama.errors import UserError

HH = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: Four?\n\nHuman: Sure?\n\nAssistant: Yes, 4.",
      "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Four?\n\nHuman: Sure?\n\nAssistant: No idea."}


def test_hh_splits_shared_prompt_and_final_replies(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH])
    report = ReadReport()
    (pair,) = read_preferences(path, report=report)
    assert report.format == "hh"
    assert pair.prompt == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four?"},
                           {"role": "user", "content": "Sure?"}]
    assert (pair.chosen, pair.rejected) == ("Yes, 4.", "No idea.")


def test_pairs_format_strings_and_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
         "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
    ])
    a, b = read_preferences(path)
    assert a.prompt == [{"role": "user", "content": "hi"}] and (a.chosen, a.rejected) == ("hello", "go away")
    assert [m["role"] for m in b.prompt] == ["system", "user"] and (b.chosen, b.rejected) == ("a", "b")


def test_bad_records(tmp_path):
    diverging = dict(HH, rejected="\n\nHuman: Other?\n\nAssistant: No.")
    path = write_jsonl(tmp_path / "bad.jsonl", [HH, diverging, {"chosen": 1, "rejected": "x"}])
    with pytest.raises(UserError, match=r"bad\.jsonl: line 2: chosen and rejected differ before"):
        read_preferences(path)
    report = ReadReport()
    assert len(read_preferences(path, on_error="skip", report=report)) == 1
    assert len(report.skipped) == 2 and "line 3" in report.skipped[1]
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "y", "rejected": 5}])
    with pytest.raises(UserError, match=r"p\.jsonl: line 1: key 'rejected' must be a string"):
        read_preferences(p)
    with pytest.raises(UserError, match="unknown preference format"):
        read_preferences(p, "nope")


def test_encode_and_collate_pairs(tmp_path):
    from openllama.tokenizer import Tokenizer

    tok = Tokenizer.load(make_start(tmp_path / "start"))
    template = ChatTemplate.for_tokenizer(tok)
    (pair,) = read_preferences(write_jsonl(tmp_path / "hh.jsonl", [HH]))
    enc = encode_pair(pair, template, tok)
    for ex, reply in ((enc.chosen, " Yes, 4.</s>"), (enc.rejected, " No idea.</s>")):
        # only the final reply is trained: the earlier assistant turn belongs to the prompt
        assert tok.decode([i for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE_INDEX]) == reply
    batch = collate_pairs([enc], tok.pad_id)
    assert batch["tokens"].shape[0] == 2 and batch["lengths"].tolist() == [len(enc.chosen), len(enc.rejected)]
    short = min(len(enc.chosen), len(enc.rejected))
    row = 0 if len(enc.chosen) == short else 1
    assert (batch["tokens"][row, short:] == tok.pad_id).all() and (batch["labels"][row, short:] == IGNORE_INDEX).all()
    json.dumps(batch["lengths"].tolist())
