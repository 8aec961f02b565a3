"""The built-in corpus and tasks: deterministic, held-out splits disjoint, answers right (checked
by re-deriving each answer from the prompt text alone), and the exact-match scorer with its interval."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from openllama.data import builtin
from openllama.data.builtin import BuiltinConfig, CorpusConfig, TaskConfig, problems, split_of, write_builtin
from openllama.errors import UserError
from openllama.tasks import Accuracy, clearly_better, is_correct, load_tasks, normalize_answer, score, wilson_interval

SMALL = BuiltinConfig(corpus=CorpusConfig(docs=400, valid_docs=60), sft_train=300, eval_valid=120, eval_test=120,
                      preference_pairs=100, rl_prompts=100)


def _digest(paths: dict) -> dict:
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in paths.items()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _digest(write_builtin(tmp_path / "a", seed=3, cfg=SMALL))
    b = _digest(write_builtin(tmp_path / "b", seed=3, cfg=SMALL))
    c = _digest(write_builtin(tmp_path / "c", seed=4, cfg=SMALL))
    assert a == b
    assert all(a[k] != c[k] for k in ("pretrain_train", "sft_train", "tasks_test"))


def test_every_family_and_language_is_generated():
    ps = problems(0, "train", 200)
    assert {p.family for p in ps} == set(builtin.FAMILIES)
    assert {p.lang for p in ps} == {"en", "zh"}
    assert any(len(p.messages) == 4 for p in ps)  # multi-turn
    assert any(re.search(r"[\u4e00-\u9fff]", p.messages[0]["content"]) for p in ps)


def test_splits_never_share_a_problem(tmp_path):
    keys = {s: {p.key for p in problems(0, s, 600)} for s in builtin.SPLITS}
    assert all(keys[s] for s in builtin.SPLITS)
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["valid"] and not keys["valid"] & keys["test"]
    # a split is a property of the problem, not of the seed or the language
    for p in problems(7, "test", 100):
        assert split_of(p.key) == "test"
    # a two-turn problem shows only problems of its own split in its history
    for p in problems(0, "train", 400):
        assert all(split_of(k) == "train" for k in p.shown)


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompt(msgs) -> tuple:
    return tuple(m["content"] for m in msgs)


def test_training_text_never_contains_a_held_out_problem(tmp_path):
    paths = write_builtin(tmp_path, seed=1, cfg=SMALL)
    seen = {_prompt(r["messages"][:-1]) for r in _rows(paths["sft_train"])}
    seen |= {_prompt(r["prompt"]) for r in _rows(paths["dpo_train"]) + _rows(paths["rl_train"])}
    pretrain = paths["pretrain_train"].read_text(encoding="utf-8")
    held = _rows(paths["tasks_test"]) + _rows(paths["tasks_valid"])
    assert len(held) >= 200 and len(seen) >= 300
    for t in held:
        assert _prompt(t["messages"][:-1]) not in seen, t
        q = json.dumps("user: " + t["messages"][-2]["content"] + "\nsystem:", ensure_ascii=False)[1:-1]
        assert q not in pretrain, t
    # worked sums in the pretraining text are all training problems (sum keys are order-free)
    for line in paths["pretrain_train"].read_text(encoding="utf-8").splitlines():
        for a, b in re.findall(r"(\d+) \+ (\d+) = ", json.loads(line)["text"]):
            assert split_of(f"add:{min(int(a), int(b))}:{max(int(a), int(b))}") == "train"


UNIT = {"centimetres": 100, "厘米": 100, "grams": 1000, "克": 1000, "seconds": 60, "秒": 60}


def _solve(p) -> str:
    """Re-derive the answer from the prompt text alone (independent of the generators)."""
    q = p.messages[-2]["content"]
    if p.family == "chain":
        first = _solve(type(p)("add", "", p.lang, p.messages[:2], ""))
        c = int(re.findall(r"\d+", q)[0])
        return str(int(first) + c)
    nums = [int(x) for x in re.findall(r"\d+", q)]
    if p.family == "add":
        return str(sum(nums))
    if p.family == "sub":
        return str(nums[1] - nums[0] if q.startswith("Subtract") else nums[0] - nums[1])
    if p.family == "compare":
        return str(max(nums) if ("larger" in q or "大" in q) else min(nums))
    if p.family == "count":
        if p.lang == "en":
            m = re.match(r"How many times does (\S+) appear in: (.*)\?$", q)
            return str(m.group(2).split().count(m.group(1)))
        m = re.match(r"“(.*)”里有几个(.+)？$", q)
        return str(m.group(1).split().count(m.group(2)))
    if p.family == "reverse":
        return " ".join(reversed(re.split(r"[:：]\s*", q, maxsplit=1)[1].split()))
    if p.family == "upper":
        return re.split(r"[:：]\s*", q, maxsplit=1)[1].upper()
    if p.family == "convert":
        if p.lang == "en":
            to = re.match(r"How many (\S+) are in", q).group(1)
            factor = {"minutes": 60 if "hour" in q else None, "hours": 24}.get(to) or UNIT[to]
        else:
            to = re.search(r"多少(.+)？", q).group(1)
            factor = {"分钟": 60, "小时": 24}.get(to) or UNIT[to]
        return str(nums[0] * factor)
    raise AssertionError(p.family)


def test_answers_are_right_by_an_independent_check():
    checked = 0
    for p in problems(5, "train", 400) + problems(5, "test", 200):
        if p.family == "fact":
            continue  # checked against the pretraining text below
        assert p.answer == _solve(p) == p.messages[-1]["content"], p
        assert p.answer not in p.wrong
        checked += 1
    assert checked > 400


def test_fact_answers_match_the_facts_in_the_pretraining_text():
    docs = [d["text"] for d in builtin.pretrain_documents(2, "train", 3000) if d["meta"]["pile_set_name"] == "facts"]
    text = "\n".join(docs)
    for p in [q for q in problems(2, "train", 400) if q.family == "fact"]:
        name = re.match(r"(?:Where does |What pet does |What is )?(.+?)(?:'s| live| have|住|养|最|喜)",
                        p.messages[0]["content"]).group(1)
        sentences = [s for s in re.split(r"(?<=[.。])\s*", text) if s.startswith(name)]
        assert any(p.answer in s for s in sentences), (p, sentences[:5])


def test_task_config_changes_difficulty_and_rejects_unknown_families():
    easy = problems(0, "train", 200, TaskConfig(families=["add"], max_operand=5))
    assert all(int(p.answer) <= 10 for p in easy)
    with pytest.raises(ValueError, match="unknown task families"):
        problems(0, "train", 5, TaskConfig(families=["nope"]))


def test_evaluation_sets_are_balanced_across_families_and_have_no_repeated_prompt():
    from collections import Counter

    from openllama.pipeline import DEFAULTS

    tasks = TaskConfig(**DEFAULTS["data"]["tasks"])
    for split, n in (("valid", DEFAULTS["data"]["eval_valid"]), ("test", DEFAULTS["data"]["eval_test"])):
        ps = problems(0, split, n, tasks, unique=True)
        per = Counter(p.family for p in ps)
        # the demo's recipe has enough held-out problems in every family for an equal share each
        assert len(ps) == n and set(per.values()) == {n // len(tasks.families)}, per
        assert len({_prompt(p.messages[:-1]) for p in ps}) == n
        assert all(p.split == split for p in ps)
        assert Counter(p.family for p in ps[:len(tasks.families) * 10]) == {f: 10 for f in tasks.families}
    # a family whose held-out space is tiny gives what it has, and the others keep their share
    tiny = problems(0, "test", 120, TaskConfig(families=["add", "count"], max_operand=5), unique=True)
    per = Counter(p.family for p in tiny)
    assert per["count"] == 60 and 0 < per["add"] < 60


def test_stdlib_docs_are_read_at_run_time():
    docs = builtin.stdlib_docs()
    assert len(docs) > 50 and any(d.startswith("textwrap.") for d in docs)


# -- the scorer ------------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_exact_match_rules():
    assert normalize_answer("  42.\nmore text") == "42"
    assert is_correct("star  rice tree。", "star rice tree")
    assert not is_correct("420", "42") and not is_correct("07", "7") and not is_correct("", "0")
    tasks = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "1"}],
              "answer": "1", "family": f} for f in ("a", "a", "b")]
    r = score(tasks, ["1", "2", "1"])
    assert (r.overall.correct, r.overall.n) == (2, 3)
    assert r.by_family["a"] == Accuracy(1, 2) and r.by_family["b"] == Accuracy(1, 1)
    assert clearly_better(Accuracy(90, 100), Accuracy(50, 100)) and not clearly_better(Accuracy(55, 100), Accuracy(50, 100))
    assert "n=100" in str(Accuracy(50, 100))


def test_load_tasks_names_the_bad_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                    '{"messages": [{"role": "user", "content": "q"}]}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"t\.jsonl:2: key 'messages'"):
        load_tasks(path)
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    assert load_tasks(path)[0]["answer"] == "a"
