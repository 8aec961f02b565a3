"""Chat data: readers for every supported format (real files + fixtures), the template's ids against
transformers' apply_chat_template, the reply-only loss mask, truncation, packing, exact resume."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
import zstandard

from alignment_helpers import make_start, write_jsonl
from openllama.chat_template import CHATML_CHAT_TEMPLATE, ChatTemplate, Example
from openllama.data.chat import (EpochBatches, LengthReport, ReadReport, collate_rows, fit_length, pack,
                                 read_conversations)
from openllama.errors import UserError
from openllama.labels import IGNORE_INDEX


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return make_start(tmp_path_factory.mktemp("chat_start"))


@pytest.fixture(scope="module")
def tok(start):
    from openllama.tokenizer import Tokenizer

    return Tokenizer.load(start)


# ---------------------------------------------------------------------------- readers: real files


@pytest.mark.parametrize("name,fmt,records,conversations", [
    ("alpaca_cleaned_1000.json", "alpaca", 1000, 1000),
    ("belle_eval_set.json", "belle_eval", 1000, 1000),
    ("belle_zh_seed_tasks.json", "belle_seed", 175, None),
    ("sharegpt_dummy_conversation.json", "sharegpt", 500, 500),
])
def test_real_files_read_through_detection(shared_data, name, fmt, records, conversations):
    report = ReadReport()
    convs = read_conversations(shared_data / name, report=report)
    assert report.format == fmt and report.records == records and not report.skipped
    if conversations is not None:
        assert len(convs) == conversations
    else:  # one conversation per seed-task instance
        raw = [json.loads(line) for line in (shared_data / name).read_text(encoding="utf-8").splitlines()]
        assert len(convs) == sum(len(r["instances"]) for r in raw) >= records
    for c in convs:
        assert c.messages[-1]["role"] == "assistant" and c.messages[0]["role"] in ("user", "system")


def test_alpaca_input_and_sharegpt_turns(shared_data):
    raw = json.loads((shared_data / "alpaca_cleaned_1000.json").read_text(encoding="utf-8"))
    convs = read_conversations(shared_data / "alpaca_cleaned_1000.json", "self_instruct")
    i = next(k for k, r in enumerate(raw) if r["input"].strip())
    assert convs[i].messages[0]["content"] == raw[i]["instruction"] + "\n" + raw[i]["input"]
    assert convs[i].messages[1]["content"] == raw[i]["output"]
    share = read_conversations(shared_data / "sharegpt_dummy_conversation.json")
    assert [m["role"] for m in share[0].messages] == ["user", "assistant", "user", "assistant"]
    assert share[0].messages[3]["content"] == "You too!"


# ---------------------------------------------------------------------------- readers: fixtures


def test_belle_multiturn_school_math_messages_prompt_completion(tmp_path):
    belle = write_jsonl(tmp_path / "belle.json", [
        {"instruction": "Human: 你好\nAssistant: 你好！有什么可以帮你？\nHuman: 1+1=?\nAssistant:", "input": "", "output": "2"},
        {"instruction": "计算 3*4", "input": "", "output": "12"},  # school_math shape
    ])
    convs = read_conversations(belle, "belle")
    assert convs[0].messages == [{"role": "user", "content": "你好"},
                                 {"role": "assistant", "content": "你好！有什么可以帮你？"},
                                 {"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]
    assert read_conversations(belle, "school_math")[1].messages[1]["content"] == "12"

    msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "s"},
                                                            {"role": "user", "content": "u"},
                                                            {"role": "assistant", "content": "a"}]}])
    assert [m["role"] for m in read_conversations(msgs)[0].messages] == ["system", "user", "assistant"]
    pc = tmp_path / "pc.json"
    pc.write_text(json.dumps([{"prompt": "p", "completion": "c"},
                              {"prompt": [{"role": "user", "content": "p2"}],
                               "completion": [{"role": "assistant", "content": "c2"}]}]))
    r = ReadReport()
    out = read_conversations(pc, report=r)
    assert r.format == "prompt_completion"
    assert out[1].messages == [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "c2"}]


def test_malformed_records_error_or_skip(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "a", "input": "", "output": 3},
        {"instruction": "c", "input": "", "output": "d"},
    ])
    with pytest.raises(UserError, match=r"bad\.jsonl:2: key 'output' must be a string.*instruction, output"):
        read_conversations(bad)
    report = ReadReport()
    assert len(read_conversations(bad, on_error="skip", report=report)) == 2
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{bad}:2: ")
    assert report.to_json() == {"format": "alpaca", "records": 3, "used": 2, "skipped": 1,
                                "skipped_by_reason": {"malformed": 1}}

    unknown = write_jsonl(tmp_path / "u.jsonl", [{"text": "hello"}])
    with pytest.raises(UserError, match=r"u\.jsonl:1: cannot tell the chat format from keys \['text'\]"):
        read_conversations(unknown)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "completion": "c"}\n{not json\n')
    with pytest.raises(UserError, match=r"broken\.jsonl:2: not valid JSON"):
        read_conversations(broken)
    with pytest.raises(UserError, match="unknown chat format 'nope'"):
        read_conversations(bad, "nope")
    share = tmp_path / "s.json"
    share.write_text(json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(UserError, match=r"s\.json: array index 0: conversations\[0\] must be \{from: human\|gpt\|system"):
        read_conversations(share)


def _compressed_copies(tmp_path, stem: str, rows: list) -> list:
    """The same records as plain JSON lines, .jsonl.gz, .jsonl.zst and a JSON array in .json.gz."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    out = {f"{stem}.jsonl": lines, f"{stem}.jsonl.gz": gzip.compress(lines),
           f"{stem}.jsonl.zst": zstandard.ZstdCompressor().compress(lines),
           f"{stem}.json.gz": gzip.compress(json.dumps(rows, ensure_ascii=False, indent=1).encode("utf-8"))}
    for name, data in out.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / name for name in out]


def _read_prompt_records(path):  # as train/grpo.py reads prompt files: one given format, no detection
    from openllama.data.chat import read_records

    return [record for _, record, _ in read_records(path, "rl", "prompt", lambda record: None, "raise", ReadReport())]


def _pair_fields(path):
    from openllama.data.preference import read_preferences

    return [(p.prompt, p.chosen, p.rejected) for p in read_preferences(path)]


def _conversation_messages(path):
    return [c.messages for c in read_conversations(path)]


def _task_rows(path):
    from openllama.tasks import load_tasks

    return load_tasks(path)


TASK = {"messages": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}], "family": "add"}
KINDS = {
    "chat": (_conversation_messages, [{"instruction": f"说 {i}", "input": "", "output": f"好 {i}"} for i in range(5)]),
    "preference": (_pair_fields, [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(5)]),
    "task": (_task_rows, [dict(TASK, answer=str(i)) for i in range(5)]),
    "prompt": (_read_prompt_records, [{"prompt": f"say {i}", "answer": str(i)} for i in range(5)]),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_compressed_files_read_like_plain_ones(tmp_path, kind):
    read, rows = KINDS[kind]
    plain, *compressed = _compressed_copies(tmp_path, kind, rows)
    expected = read(plain)
    assert len(expected) == len(rows)
    for path in compressed:
        assert read(path) == expected, path.name
    lines = [json.dumps(r).encode() for r in rows[:2]] + [b'{"broken": ']
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    with pytest.raises(UserError, match=r"bad\.jsonl\.gz:3: not valid JSON"):
        read(tmp_path / "bad.jsonl.gz")


# ---------------------------------------------------------------------------- template, labels, HF equality


CONV = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "after c"},
        {"role": "assistant", "content": "d"}, {"role": "user", "content": "after e, please"},
        {"role": "assistant", "content": "f g"}]


def test_labels_only_on_replies_and_their_eos(tok):
    template = ChatTemplate.for_tokenizer(tok)
    ex = template.encode(CONV, tok)
    trained = [i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX]
    assert all(ex.labels[i] == ex.ids[i] for i in trained)
    assert tok.decode([ex.ids[i] for i in trained]) == " d</s> f g</s>"  # both replies, each closed by eos
    assert ex.ids[0] == tok.bos_id and ex.labels[0] == IGNORE_INDEX
    # every prompt token (system line, user turns, the "system:" headers) carries no loss
    untrained = tok.decode([ex.ids[i] for i in range(len(ex.ids)) if ex.labels[i] == IGNORE_INDEX])
    assert untrained == "<s>be nice\nuser: after c\nsystem:user: after e, please\nsystem:"
    assert ex.turn_ends == [trained[1] + 1, len(ex.ids)]
    # only_last: earlier replies become part of the prompt (preference / RL use)
    last = template.encode(CONV, tok, only_last=True)
    assert tok.decode([i for i, lab in zip(last.ids, last.labels) if lab != IGNORE_INDEX]) == " f g</s>"


@pytest.mark.parametrize("template_name", ["default", "chatml"])
def test_ids_equal_transformers_apply_chat_template(tok, tmp_path, template_name):
    from transformers import AutoTokenizer

    template = ChatTemplate.for_tokenizer(tok, template_name)
    exported = tmp_path / "tok"
    tok.save(exported, chat_template=template.source)
    hf = AutoTokenizer.from_pretrained(str(exported))
    assert template_name == "default" or hf.chat_template == CHATML_CHAT_TEMPLATE
    for conv in (CONV, CONV[1:3], [{"role": "user", "content": "你好 💡"}, {"role": "assistant", "content": "好的"}]):
        ours = template.encode(conv, tok).ids
        theirs = hf.apply_chat_template(conv, tokenize=True)
        theirs = theirs["input_ids"] if not isinstance(theirs, list) else theirs
        assert ours == list(theirs)
        gen = hf.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        assert gen == template.render(conv[:-1], add_generation_prompt=True)


# ---------------------------------------------------------------------------- truncation and packing


def test_truncation_cuts_only_at_turn_ends_and_counts(tok):
    ex = ChatTemplate.for_tokenizer(tok).encode(CONV, tok)
    report = LengthReport()
    first_end = ex.turn_ends[0]
    cut = fit_length(ex, first_end + 2, report)
    assert cut.ids == ex.ids[:first_end] and cut.labels[-1] == tok.eos_id  # ends with the first reply's eos
    assert fit_length(ex, first_end - 1, report) is None
    assert fit_length(ex, len(ex), report) is ex
    assert (report.kept, report.truncated, report.dropped) == (1, 1, 1)


def test_packing_keeps_conversations_apart(start, tok):
    from openllama.model import load_model

    template = ChatTemplate.for_tokenizer(tok)
    a, b = template.encode(CONV[1:3], tok), template.encode(CONV[3:], tok)
    rows = pack([a, b, a], seq_len=len(a) + len(b) + 3, pad_id=tok.pad_id)
    assert len(rows) == 2
    row = rows[0]
    assert row.ids[:len(a)] == a.ids and row.ids[len(a):len(a) + len(b)] == b.ids
    assert row.doc_ids[:len(a) + len(b)] == [0] * len(a) + [1] * len(b)
    assert row.labels[-3:] == [IGNORE_INDEX] * 3 and row.doc_ids[-1] == 2
    model = load_model(start).eval()
    batch = collate_rows(rows)
    with torch.no_grad():
        packed = model(batch["tokens"], doc_ids=batch["doc_ids"])[0]
        alone = model(torch.tensor([b.ids]))[0]
    # b's logits inside the packed row equal b alone: no attention across conversations
    assert torch.allclose(packed[len(a):len(a) + len(b)], alone, atol=1e-5)


def test_epoch_batches_resume_exactly():
    items = list(range(23))
    run = EpochBatches(items, 4, rank=1, world=2, seed=3)
    straight = [next(run) for _ in range(7)]
    first = EpochBatches(items, 4, rank=1, world=2, seed=3)
    head = [next(first) for _ in range(3)]
    resumed = EpochBatches(items, 4, rank=1, world=2, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + [next(resumed) for _ in range(4)] == straight
    other = EpochBatches(items, 4, rank=0, world=2, seed=3)
    assert not set(sum(straight[:2], [])) & set(sum([next(other) for _ in range(2)], []))  # ranks disjoint
    # the position counts per-rank batches: another world size (or batch size) would name other rows
    with pytest.raises(UserError, match="world=2, this run has 1"):
        EpochBatches(items, 4, rank=0, world=1, seed=3).load_state_dict(first.state_dict())
    with pytest.raises(UserError, match="batch_size=4, this run has 8"):
        EpochBatches(items, 8, rank=1, world=2, seed=3).load_state_dict(first.state_dict())


def test_example_type_lengths():
    ex = Example([1, 2, 3], [IGNORE_INDEX, 2, 3], [3])
    assert len(ex) == 3 and fit_length(ex, 3) is ex
