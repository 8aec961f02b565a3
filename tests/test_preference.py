"""Preference data: prompt/chosen/rejected and Anthropic HH readers, encoding and collation."""

from __future__ import annotations

import gzip
import json

import pytest

from alignment_helpers import make_start, write_jsonl
from openllama.chat_template import ChatTemplate
from openllama.data.chat import ReadReport
from openllama.data.preference import collate_pairs, encode_pair, read_preferences
from openllama.errors import UserError
from openllama.labels import IGNORE_INDEX

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


def _hh(prompt: str, chosen: str, rejected: str) -> dict:
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


# Shaped like the released HH-RLHF files: whole dialogues, shared turns, irregular markers.
HH_RELEASED = [
    _hh("\n\nHuman: What is 2+2?\n\nAssistant:", " It is 4.", " It is 5."),  # replies share "It is "
    HH,  # two shared turns before the final replies
    # turn markers without their blank line, inside an Assistant turn: text, not new turns
    _hh("\n\nHuman: Can you check my essay?\n\nAssistant: Sure.  Human: it is about dogs.\nAssistant: ok"
        "\n\nHuman: Here it is.\n\nAssistant:", " Looks good.", " No."),
    # the replies differ from their first character and one goes on for more turns: all of it is the reply
    _hh("\n\nHuman: Hi\n\nAssistant: ", "Hello!", "Go away.\n\nHuman: Rude.\n\nAssistant: Yes."),
    {"chosen": "\n\nHuman: Cats?\n\nAssistant: Cats.", "rejected": "\n\nHuman: Dogs?\n\nAssistant: Dogs."},
    _hh("\n\nHuman: Anything?\n\nAssistant:", "", " Something."),
    _hh("\n\nHuman: Say it.\n\nAssistant: ", "Said.", "  "),
]


def test_hh_as_released_shared_start_is_the_prompt(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in HH_RELEASED).encode("utf-8")))
    report = ReadReport()
    pairs = read_preferences(path, report=report)  # default on_error: irregular records never stop the read
    assert report.to_json() == {"format": "hh", "records": 7, "used": 4, "skipped": 3,
                                "skipped_by_reason": {"empty_reply": 2, "no_shared_prompt": 1}}
    assert [s.split(": ")[0] for s in report.skipped] == [f"{path}:5", f"{path}:6", f"{path}:7"]
    one, two, essay, hello = pairs
    assert (one.prompt, one.chosen, one.rejected) == ([{"role": "user", "content": "What is 2+2?"}], "It is 4.", "It is 5.")
    assert len(two.prompt) == 3 and (two.chosen, two.rejected) == ("Yes, 4.", "No idea.")
    assert essay.prompt == [{"role": "user", "content": "Can you check my essay?"},
                            {"role": "assistant", "content": "Sure.  Human: it is about dogs.\nAssistant: ok"},
                            {"role": "user", "content": "Here it is."}]
    assert (essay.chosen, essay.rejected, essay.source) == ("Looks good.", "No.", f"{path}:3")
    assert hello.prompt == [{"role": "user", "content": "Hi"}]
    assert (hello.chosen, hello.rejected) == ("Hello!", "Go away.\n\nHuman: Rude.\n\nAssistant: Yes.")


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
    # a malformed record follows on_error (raise by default); an irregular one is always counted
    with pytest.raises(UserError, match=r"bad\.jsonl:3: key 'chosen' must be a string"):
        read_preferences(path)
    report = ReadReport()
    assert len(read_preferences(path, on_error="skip", report=report)) == 1
    assert report.skipped[0].startswith(f"{path}:2: chosen and rejected share no Human turn")
    assert report.skipped[1].startswith(f"{path}:3: key 'chosen'")
    assert report.skipped_by_reason == {"no_shared_prompt": 1, "malformed": 1}
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "y", "rejected": 5}])
    with pytest.raises(UserError, match=r"p\.jsonl:1: key 'rejected' must be a string"):
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
