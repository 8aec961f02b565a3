"""lm-evaluation-harness through our backend (`lm_eval_backend.OpenLlamaLM`): the same numbers as
lm-eval's own `hf` backend on the exported model, offline task YAMLs over local files, the
`evaluate --lm-eval` command, the demo's tasks, and `train.eval_tasks` during pretraining."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is the optional `eval` extra (pip install -e '.[eval]')")

from serving_helpers import make_tiny_model_dir, shakespeare_text  # noqa: E402

from openllama import cli  # noqa: E402
from openllama.errors import UserError  # noqa: E402
from openllama.lm_eval_backend import (  # noqa: E402
    DEMO_DATA, OpenLlamaLM, core_score, demo_task_yamls, evaluate_tasks, flat_scores, pack_requests,
    score_continuations, task_manager_for)

ROOT = Path(__file__).resolve().parents[1]
ZH = ["猫在桌子上睡觉，狗在门口等着主人回家。", "今天的天气很好，我们去公园散步吧。", "他把三本书放在书架的最上面。",
      "春天来了，花园里开满了红色的花。", "我们明天早上八点在学校门口见面。"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lines() -> list[str]:
    text = shakespeare_text(60_000)
    lines = [ln.strip() for ln in text.replace(". ", ".\n").splitlines() if len(ln.strip()) > 30]
    return lines[:200]


def _task(name: str, output_type: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {output_type}\n{body}metadata:\n  version: 1.0\n")


def write_tasks(root: Path, greedy: dict[str, str]) -> Path:
    """Four local tasks, English and Chinese items: multiple choice, loglikelihood (half the
    continuations are the model's own greedy ones, so `acc` is not all zeros), generate_until
    (stops that special-token text also holds: `e` is in `<|user|>`) and a rolling perplexity
    over texts longer than the model's context."""
    rng = random.Random(0)
    lines = _lines()
    items = [ZH[i % len(ZH)] if i % 5 == 0 else lines[i] for i in range(40)]
    mc, ll, gen = [], [], []
    for i, line in enumerate(items):
        cut = len(line) // 2
        others = [items[(i * 7 + k * 13) % len(items)] for k in (1, 2, 3)]
        choices = list(dict.fromkeys([line[cut:], *(o[len(o) // 2:] for o in others)]))
        rng.shuffle(choices)
        mc.append({"query": line[:cut], "choices": choices, "label": choices.index(line[cut:])})
        ll.append({"context": line[:cut], "continuation": greedy.get(line[:cut]) or line[cut:]})
        gen.append({"prompt": line[:cut], "answer": greedy.get(line[:cut], line[cut:])})
    roll = [{"text": " ".join(lines[i:i + 12])} for i in range(0, 60, 12)] + [{"text": "".join(ZH) * 3}]
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    for name, rows in (("mc", mc), ("ll", ll), ("gen", gen), ("roll", roll)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    metric = lambda m, agg="mean", up="true": f"  - metric: {m}\n    aggregation: {agg}\n    higher_is_better: {up}\n"  # noqa: E731
    (tasks / "t_mc.yaml").write_text(_task("t_mc", "multiple_choice", tasks / "mc.jsonl",
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n" + metric("acc") + metric("acc_norm")))
    (tasks / "t_ll.yaml").write_text(_task("t_ll", "loglikelihood", tasks / "ll.jsonl",
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\ntarget_delimiter: ""\n'
        "metric_list:\n" + metric("acc") + metric("perplexity", "perplexity", "false")))
    (tasks / "t_gen.yaml").write_text(_task("t_gen", "generate_until", tasks / "gen.jsonl",
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "e"]\n  max_gen_toks: 10\n  do_sample: false\n'
        "metric_list:\n" + metric("exact_match")))
    (tasks / "t_roll.yaml").write_text(_task("t_roll", "loglikelihood_rolling", tasks / "roll.jsonl",
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        + metric("word_perplexity", "weighted_perplexity", "false") + metric("bits_per_byte", "bits_per_byte", "false")))
    return tasks


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from openllama.generate import Generator, SamplingParams, load_for_inference
    from openllama.hf import export_hf

    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = make_tiny_model_dir(root / "model", max_seq_len=128)
    hf_dir = export_hf(model_dir, root / "hf")
    loaded = load_for_inference(model_dir)
    tok = loaded.tokenizer
    prompts = [ln[:len(ln) // 2] for ln in _lines()[:40]]
    # as lm-eval asks: no BOS (a text prompt would get one from the generator)
    done = Generator(loaded.model, tok).generate([tok.encode(p) for p in prompts],
                                                 SamplingParams(max_new_tokens=3, temperature=0))
    greedy = {}
    for p, c in zip(prompts, done):  # kept where the text re-encodes to the very tokens generated
        text = tok.decode(c.token_ids)
        if text.strip() and tok.encode(p + text) == tok.encode(p) + c.token_ids:
            greedy[p] = text
    assert len(greedy) >= 5
    return {"root": root, "model": model_dir, "hf": hf_dir, "tasks": write_tasks(root, greedy), "loaded": loaded}


def run_hf(world: dict, specs: list[str], **model_args) -> dict:
    """lm-eval's own `hf` backend on the export; batch size 1, where its generations do not depend
    on the other rows of a batch (see OpenLlamaLM._hf_stop)."""
    from lm_eval import simple_evaluate

    manager, names = task_manager_for(specs)
    return simple_evaluate(model="hf", model_args={"pretrained": str(world["hf"]), "dtype": "float32", **model_args},
                           device="cpu", batch_size=1, tasks=names, task_manager=manager, bootstrap_iters=0)


def assert_same(ours: dict, theirs: dict) -> dict[str, float]:
    """Equal metrics (accuracies exactly), equal generations, per-item log-likelihoods within 1e-4
    and equal greedy flags; returns the largest log-likelihood difference per task."""
    worst = {}
    assert ours["results"].keys() == theirs["results"].keys()
    for task, metrics in theirs["results"].items():
        for key, value in metrics.items():
            if "," in key and "stderr" not in key:
                assert math.isclose(ours["results"][task][key], value, rel_tol=1e-5), (task, key)
        worst[task] = 0.0
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                if isinstance(rb[0], str):
                    assert ra == rb, (task, a["doc_id"])
                    continue
                (la, ga), (lb, gb) = (ra[0], None) if isinstance(ra[0], float) else ra[0], \
                                     (rb[0], None) if isinstance(rb[0], float) else rb[0]
                assert ga == gb and abs(la - lb) <= 1e-4, (task, a["doc_id"], ra, rb)
                worst[task] = max(worst[task], abs(la - lb))
    return worst


def test_our_backend_equals_lm_evals_hf_backend_on_the_export(world):
    lm = OpenLlamaLM(str(world["model"]), batch_size=4)  # small batches: several forward passes, padding
    ours = evaluate_tasks(lm, [str(world["tasks"])], bootstrap_iters=0)
    theirs = run_hf(world, [str(world["tasks"])])
    worst = assert_same(ours, theirs)
    print("largest per-item log-likelihood difference:", worst, {t: {k: v for k, v in m.items() if "," in k}
                                                                  for t, m in ours["results"].items()})
    assert set(worst) == {"t_mc", "t_ll", "t_gen", "t_roll"}
    assert ours["results"]["t_ll"]["acc,none"] > 0  # greedy flags were exercised both ways
    assert any(s["resps"][0][0] for s in ours["samples"]["t_gen"])


def test_add_bos_token_matches_hf_with_the_same_setting(world):
    specs = [str(world["tasks"] / "t_mc.yaml"), str(world["tasks"] / "t_ll.yaml")]
    ours = evaluate_tasks(OpenLlamaLM(str(world["model"]), add_bos_token=True), specs, bootstrap_iters=0, limit=12)
    from lm_eval import simple_evaluate

    manager, names = task_manager_for(specs)
    theirs = simple_evaluate(model="hf", model_args={"pretrained": str(world["hf"]), "dtype": "float32",
                                                     "add_bos_token": True},
                             device="cpu", batch_size=4, tasks=names, task_manager=manager, bootstrap_iters=0, limit=12)
    assert_same(ours, theirs)
    plain = evaluate_tasks(OpenLlamaLM(str(world["model"])), specs[1:], bootstrap_iters=0, limit=1)
    assert plain["samples"]["t_ll"][0]["resps"][0][0][0] != ours["samples"]["t_ll"][0]["resps"][0][0][0]  # BOS counts


def test_packed_scoring_equals_one_plain_forward_per_request(world):
    """Shared contexts, a context longer than the model's window (cut as `hf` cuts it), one-token
    continuations and rows split at max_row: each equals log_softmax of full logits, one by one."""
    model = world["loaded"].model
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(8, 500, (40,), generator=g).tolist()
    long = torch.randint(8, 500, (300,), generator=g).tolist()
    pairs = [(ctx, [11, 12, 13]), (ctx, [14]), (ctx, [15, 16]), (long, [17, 18]), ([1], [19, 20, 21, 22]),
             (ctx[:5], [23])]
    got = score_continuations(model, pairs, max_length=128, batch_size=1)
    assert len(pack_requests(pairs, 128)) == 4  # the three on `ctx` share one row
    assert len(pack_requests(pairs, 128, max_row=40)) == 6  # ...unless the row would grow too long
    with torch.no_grad():
        for (context, cont), (logp, greedy) in zip(pairs, got):
            full = (context + cont)[-129:]
            logits = model(torch.tensor([full[:-1]]))[0, -len(cont):]
            want = logits.log_softmax(-1).gather(1, torch.tensor(cont)[:, None]).sum().item()
            assert abs(logp - want) < 1e-4
            assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())


def test_evaluate_command_writes_results_as_lm_eval_does(world, tmp_path, capsys):
    out = tmp_path / "lm_eval"
    code = cli.main(["evaluate", "--model", str(world["model"]), "--lm-eval",
                     f"{world['tasks'] / 't_mc.yaml'},{world['tasks'] / 't_gen.yaml'}", "--lm-eval-limit", "6",
                     "--lm-eval-out", str(out), "--out", str(tmp_path / "eval.json"), "--lm-eval-bootstrap", "10"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "|t_mc" in printed and "core (accuracy above chance" in printed
    written = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["lm_eval"]
    assert written["scores"]["lm_eval/t_mc/acc"] == written["results"]["t_mc"]["acc,none"] and "core" in written["scores"]
    results = list(out.rglob("results_*.json"))
    assert len(results) == 1 and {p.name.split("_2")[0] for p in out.rglob("samples_*")} == {"samples_t_mc", "samples_t_gen"}
    saved = json.loads(results[0].read_text(encoding="utf-8"))
    assert saved["results"]["t_mc"]["acc,none"] == written["results"]["t_mc"]["acc,none"] and saved["n-samples"]
    assert cli.main(["evaluate", "--model", str(world["model"]), "--lm-eval", "no/such/tasks.yaml"]) == 2
    assert "no such task file or directory" in capsys.readouterr().err


def test_core_is_accuracy_above_chance_averaged_over_top_level_tasks():
    results = {
        "results": {"mc4": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "mc4"},
                    "gen": {"exact_match,strict": 0.2, "exact_match,none": 0.3},
                    "grp": {"acc,none": 0.9}, "a2": {"acc,none": 1.0}, "b2": {"acc,none": 0.5},
                    "ppl": {"perplexity,none": 7.0}},
        "group_subtasks": {"grp": ["a2", "b2"], "mc4": [], "gen": [], "ppl": []},
        "configs": {"mc4": {"output_type": "multiple_choice"}, "a2": {"output_type": "multiple_choice"},
                    "b2": {"output_type": "multiple_choice"}, "gen": {"output_type": "generate_until"}},
        "samples": {"mc4": [{"arguments": [1, 2, 3, 4]}] * 3, "a2": [{"arguments": [1, 2]}], "b2": [{"arguments": [1, 2]}]},
    }
    # mc4: (0.5 - 1/4) / (3/4); gen: 0.3 (no chance); grp: mean of a2 (1.0) and b2 (0.0)
    assert core_score(results) == pytest.approx(((0.25 / 0.75) + 0.3 + 0.5) / 3)
    flat = flat_scores(results)
    assert flat["lm_eval/mc4/acc"] == 0.5 and flat["lm_eval/gen/exact_match/strict"] == 0.2
    assert "lm_eval/mc4/acc_stderr" not in flat and flat["lm_eval/ppl/perplexity"] == 7.0 and "core" in flat


def test_demo_tasks_ask_as_the_demo_asks_and_score_as_it_scores(world, tmp_path):
    """configs/eval/demo is what write_demo_tasks writes; its prompts are the ids the demo's own
    exact-match evaluation feeds the model, and demo_exact gives the same answers and accuracy."""
    from openllama.chat_template import ChatTemplate
    from openllama.data.builtin import BuiltinConfig, problems
    from openllama.lm_eval_backend import demo_prompt, write_demo_tasks
    from openllama.tasks import task_report

    for name, text in demo_task_yamls(DEMO_DATA).items():
        assert (ROOT / "configs" / "eval" / "demo" / name).read_text(encoding="utf-8") == text, name
    rows = [p.to_json() for p in problems(0, "test", 24, BuiltinConfig().tasks)]
    tok, model = world["loaded"].tokenizer, world["loaded"].model
    tpl = ChatTemplate.for_tokenizer(tok)
    for r in rows:
        assert tok.encode(demo_prompt(r)) == tpl.generation_ids(r["messages"][:-1], tok)
    before = task_report(model, tok, rows, max_new_tokens=8, progress=False)
    for r, s in list(zip(rows, before["samples"]))[::2]:  # half the references: what the model answers
        if s["output"] and "\ufffd" not in s["output"]:  # (broken UTF-8 decodes otherwise when streamed)
            r["answer"] = s["output"]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    report = task_report(model, tok, rows, max_new_tokens=8, progress=False)
    tasks = write_demo_tasks(tmp_path / "yaml", data, max_gen_toks=8)
    ours = evaluate_tasks(OpenLlamaLM(model=model, tokenizer=tok), [str(tasks)], bootstrap_iters=0)
    assert set(ours["results"]) == {"demo_exact", "demo_choice", "demo_answer"}
    samples = sorted(ours["samples"]["demo_exact"], key=lambda s: s["doc_id"])
    assert [bool(s["exact_match"]) for s in samples] == [s["correct"] for s in report["samples"]]
    assert ours["results"]["demo_exact"]["exact_match,none"] == report["overall"]["accuracy"] > 0
    for s, r in zip(samples, report["samples"]):  # the same answers, but where a random model's broken
        if "\ufffd" not in s["filtered_resps"][0] + r["output"]:  # UTF-8 decodes whole vs streamed
            assert s["filtered_resps"][0].strip() == r["output"]


def test_unknown_input_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="defines no lm-eval task or group"):
        task_manager_for([str(tmp_path)])
    with pytest.raises(UserError, match="empty context"):
        pack_requests([([], [5])], 16)
    with pytest.raises(UserError, match="continuation of 20 tokens"):
        pack_requests([([1], list(range(20)))], 16)


def test_pretraining_logs_eval_task_scores_and_core(world, tmp_path):
    from test_packing import write_token_shards

    from openllama.config import build
    from openllama.model import Llama
    from openllama.tokenizer import Tokenizer
    from openllama.train.metrics import read_metrics
    from openllama.train.objectives import PretrainObjective
    from openllama.train.plot import plot_run
    from openllama.train.pretrain import PretrainConfig, pretrain

    tok = Tokenizer.load(world["model"])
    docs = [ids for ids in tok.encode_batch(_lines()) if len(ids) > 4]
    tokens = write_token_shards(tmp_path / "tokens", docs, vocab_size=tok.vocab_size)
    manifest = json.loads((tokens / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = tok.fingerprint  # made with this tokenizer, which sits beside them
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    tok.save(tokens)
    cfg = build(PretrainConfig, {
        "model": {"vocab_size": tok.vocab_size, "dim": 32, "n_layers": 1, "n_heads": 4, "multiple_of": 16,
                  "max_seq_len": 128},
        "train": {"max_steps": 4, "micro_batch_size": 2, "seq_len": 32, "eval_every": 2, "eval_batches": 1,
                  "log_every": 2, "eval_tasks": [str(world["tasks"] / "t_mc.yaml"), str(world["tasks"] / "t_gen.yaml")],
                  "eval_tasks_limit": 5},
        "data": {"train": str(tokens), "val_docs": 4}}, "test")
    pretrain(cfg, str(tmp_path / "run"), progress=False)  # the command's path: config -> objective -> engine
    objective = PretrainObjective(cfg.data, 32, 2, eval_batches=1, vocab_size=tok.vocab_size,
                                  eval_tasks=cfg.train.eval_tasks, eval_tasks_limit=cfg.train.eval_tasks_limit)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert {"val_loss", "lm_eval/t_mc/acc", "lm_eval/t_mc/acc_norm", "lm_eval/t_gen/exact_match", "core"} <= set(r)
        assert -1 / 3 <= r["core"] <= 1
    assert any(p.name == "lm_eval.png" for p in plot_run(tmp_path / "run"))
    # the suite leaves the training RNGs alone (simple_evaluate would reseed them), so evaluating
    # never changes the run's trajectory
    model = Llama(cfg.model).eval()
    before = (torch.random.get_rng_state(), random.getstate())
    assert "core" in objective.evaluate(model)
    assert torch.equal(before[0], torch.random.get_rng_state()) and before[1] == random.getstate()
    with pytest.raises(UserError, match="no such task file"):
        PretrainObjective(cfg.data, 32, 2, eval_tasks=["missing/dir/x.yaml"])


@pytest.mark.slow
def test_suite_tasks_run_offline_from_local_copies(world, tmp_path, monkeypatch):
    """configs/eval/local: lm-eval's own hellaswag, ARC, PIQA, WinoGrande and MMLU over local copies
    in their datasets' own row formats (made up here), as configs/eval/fetch_local.py writes them."""
    import importlib.util

    import yaml
    from datasets import Dataset

    spec = importlib.util.spec_from_file_location("fetch_local", ROOT / "configs" / "eval" / "fetch_local.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    monkeypatch.chdir(tmp_path)  # the local YAMLs read data/eval/... from the current directory
    rows = {
        "hellaswag/validation": [{"ind": i, "activity_label": "Cooking", "ctx_a": f"A man cuts {i} onions.",
                                  "ctx_b": "then he", "ctx": "", "endings": ["fries them.", "flies.", "sings.", "sits."],
                                  "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"}
                                 for i in range(4)],
        "arc_easy/test": [{"id": str(i), "question": f"What is {i} + 1?", "answerKey": "B",
                           "choices": {"text": [str(i), str(i + 1), "7"], "label": ["A", "B", "C"]}} for i in range(4)],
        "piqa/validation": [{"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "eat the lid.", "label": 0}] * 3,
        "winogrande/validation": [{"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup",
                                   "option2": "the table", "answer": "2"}] * 3,
    }
    for name, items in rows.items():
        path = tmp_path / "data" / "eval" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    hub = tmp_path / "hub_mmlu"  # a copy in the hub's layout, re-exported as fetch_local.py does
    subjects = ["abstract_algebra", "anatomy"]
    for s in subjects:
        for split in ("test", "dev"):
            (hub / s).mkdir(parents=True, exist_ok=True)
            Dataset.from_list([{"question": f"{s} {i}?", "subject": s, "choices": ["a", "b", "c", "d"], "answer": i % 4}
                               for i in range(5)]).to_parquet(str(hub / s / f"{split}.parquet"))
    (hub / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {s}\n  data_files:\n" + "".join(f"  - split: {sp}\n    path: {s}/{sp}.parquet\n"
                                                          for sp in ("test", "dev")) for s in subjects) + "---\n", "utf-8")
    fetch.export_configs(str(hub), ["test", "dev"], tmp_path / "data" / "eval" / "mmlu", configs=subjects)
    local = ROOT / "configs" / "eval" / "local"
    mmlu = yaml.safe_load((local / "mmlu_local.yaml").read_text(encoding="utf-8"))
    mmlu["task"] = [f"mmlu_{s}" for s in subjects]  # two subjects of the 57, the same override
    (tmp_path / "mmlu_two.yaml").write_text(yaml.safe_dump(mmlu), encoding="utf-8")
    specs = [str(local / f"{t}_local.yaml") for t in ("hellaswag", "arc_easy", "piqa", "winogrande")]
    results = evaluate_tasks(OpenLlamaLM(str(world["model"])), specs + [str(tmp_path / "mmlu_two.yaml")],
                             bootstrap_iters=0)
    for task, n in (("hellaswag", 4), ("arc_easy", 4), ("piqa", 3), ("winogrande", 3), ("mmlu_anatomy", 5)):
        assert results["results"][task]["sample_len"] == n and "acc,none" in results["results"][task], task
    assert core_score(results) is not None
