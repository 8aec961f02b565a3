"""`openllama demo [--out DIR] [--minutes N] [--seed S]`: every stage on the built-in corpus, then a report.

Each stage is the very command a user runs by hand: the demo prints it (`$ openllama ...`) and runs
it through the same entry point (`cli.main`), so the demo cannot drift from the real stages:

    data builtin -> data prepare (+ verify) -> tokenizer train -> data tokenize -> pretrain
    -> evaluate (base) -> sft -> evaluate -> dpo and/or grpo -> evaluate (+ lm-eval) -> export -> chat

Stage presets are written to OUT/configs/*.yaml from the demo config (`configs/demo.yaml` holds the
defaults, which equal `DEFAULTS` below); `--minutes` scales every stage's steps (and the corpus)
from the reference budget of `reference_minutes` on a 2-core CPU. Evaluation is on held-out splits
that training never sees (see data/builtin.py): validation loss and bits per byte of held-out text,
exact-match accuracy of held-out tasks with a 95% Wilson interval (the base model is asked in the
chat format, which its pretraining text contains, so format alone is not what SFT adds). The tasks
are the `test` split; `eval.split=valid` evaluates on `valid` instead, for choosing a recipe.

The final model's evaluation also runs the same held-out tasks as lm-evaluation-harness tasks
(configs/eval/demo, written to OUT/eval/lm_eval_tasks over this run's data) through our lm-eval
backend: exact match (the same number as the demo's own), multiple choice against the tasks' wrong
answers, and the answer's log-likelihood (`eval.lm_eval=false` leaves it out; it needs the `eval` extra).

The run ends with OUT/report.md (tables, plots, sample answers before and after each stage),
OUT/results.json, a printed summary, and the command to serve the model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from .config import Section, build, merge, parse_overrides, read_yaml
from .data.builtin import BuiltinConfig
from .errors import UserError

MARKER = "demo.json"  # marks a directory as a demo run (so a later demo may replace it)

# The default recipe. configs/demo.yaml holds the same values (a test keeps them equal).
DEFAULTS: dict[str, Any] = yaml.safe_load("""
reference_minutes: 5
seed: 0
data:
  corpus: {docs: 40000, valid_docs: 600}
  tasks: {families: [add, compare, count, upper], max_operand: 19, max_items: 4}
  sft_train: 6000
  eval_valid: 300
  eval_test: 400
  preference_pairs: 1000
  rl_prompts: 2000
vocab_size: 2048
pretrain:
  model: {vocab_size: 2048, dim: 128, n_layers: 4, n_heads: 4, multiple_of: 32, max_seq_len: 256,
          tie_embeddings: true}
  optim: {lr: 3.0e-3, weight_decay: 0.1, warmup_steps: 20, schedule: cosine, min_lr_ratio: 0.1}
  train: {max_steps: 600, micro_batch_size: 16, seq_len: 128, eval_batches: 16, log_every: 10,
          keep_last: 1, cpu: true}
sft:
  optim: {lr: 2.0e-3, weight_decay: 0.0, warmup_steps: 10, schedule: cosine, min_lr_ratio: 0.1}
  train: {max_steps: 300, micro_batch_size: 16, seq_len: 128, eval_batches: 8, log_every: 10,
          keep_last: 1, cpu: true}
align: [grpo]
dpo:
  dpo: {beta: 0.5}
  optim: {lr: 1.0e-5, weight_decay: 0.0, warmup_steps: 5, schedule: cosine}
  train: {max_steps: 60, micro_batch_size: 16, seq_len: 128, eval_batches: 8, log_every: 5,
          keep_last: 1, cpu: true}
grpo:
  grpo: {group_size: 8, max_new_tokens: 12, temperature: 1.0, beta: 0.04,
         eval_prompts: 64}
  optim: {lr: 5.0e-5, weight_decay: 0.0, warmup_steps: 2, schedule: constant}
  train: {max_steps: 40, micro_batch_size: 32, seq_len: 128, eval_batches: 1, log_every: 5,
          keep_last: 1, cpu: true}
eval:
  split: test
  max_new_tokens: 24
  samples: 6
  valid_batches: 16
""")


class EvalSettings(Section):
    # `valid` while choosing a recipe (never tune on `test`); `test` for the numbers reported
    split: Literal["valid", "test"] = "test"
    max_new_tokens: int = Field(24, gt=0)
    samples: int = Field(6, ge=0)  # sample answers shown per stage in the report
    valid_batches: int = Field(16, gt=0)  # windows of held-out text for loss / bits per byte
    lm_eval: bool = True  # the final model on the tasks as lm-eval tasks too (when lm-eval is installed)
    lm_eval_limit: int | None = Field(None, gt=0)  # items per lm-eval task (None: all, as the exact-match table)


class DemoConfig(Section):
    """The demo recipe. Stage sections (pretrain, sft, dpo, grpo) are that stage's own config,
    without the paths the demo fills in (data, init); they are validated by the stage itself."""

    reference_minutes: float = Field(5, gt=0)  # the budget the step counts below are for
    seed: int = 0
    data: BuiltinConfig = Field(default_factory=BuiltinConfig)
    vocab_size: int = Field(2048, gt=0)
    pretrain: dict[str, Any]
    sft: dict[str, Any]
    align: list[Literal["dpo", "grpo"]] = ["grpo"]
    dpo: dict[str, Any] = {}
    grpo: dict[str, Any] = {}
    eval: EvalSettings = Field(default_factory=EvalSettings)


def load_demo_config(path: str | None, overrides: list[str]) -> DemoConfig:
    data = copy.deepcopy(DEFAULTS)
    source = ""
    if path:
        data, source = merge(data, read_yaml(path)), path
    data = merge(data, parse_overrides(overrides))
    return build(DemoConfig, data, source)


def scaled(cfg: DemoConfig, minutes: float) -> DemoConfig:
    """Steps of every stage (and the corpus size) scaled from the reference budget to `minutes`."""
    f = minutes / cfg.reference_minutes
    cfg = cfg.model_copy(deep=True)
    for name in ("pretrain", "sft", "dpo", "grpo"):
        train = getattr(cfg, name).setdefault("train", {})
        if "max_steps" in train:
            train["max_steps"] = max(2, round(train["max_steps"] * f))
    cfg.data.corpus.docs = max(200, round(cfg.data.corpus.docs * max(f, min(1.0, 4 * f))))
    return cfg


# ----------------------------------------------------------------------------------------------
# Running stages


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}:{s % 60:02d}"


class StageRunner:
    """Runs planned stages in order: a header with the stage's number, its planned time and the
    whole demo's ETA, the equivalent command line, then the command itself through `cli.main`."""

    def __init__(self, plan: list[tuple[str, float]], stream=None):
        self.plan = plan
        self.names = [n for n, _ in plan]
        self._stream = stream
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}
        self.speed = 1.0  # actual / planned time of the stages so far: corrects the ETA

    @property
    def stream(self):
        return self._stream or sys.stdout  # looked up late: stdout may be redirected meanwhile

    def eta(self, index: int) -> float:
        return sum(est for _, est in self.plan[index:]) * self.speed

    def header(self, name: str) -> int:
        i = self.names.index(name)
        elapsed = time.perf_counter() - self.start
        print(f"\n==> [{i + 1}/{len(self.plan)}] {name}  (planned {fmt_seconds(self.plan[i][1] * self.speed)}, "
              f"elapsed {fmt_seconds(elapsed)}, demo ETA {fmt_seconds(self.eta(i))} more)", file=self.stream, flush=True)
        return i

    def command(self, argv: list[str], stdin: str | None = None) -> None:
        """Print and run one `openllama` command; a failure stops the demo with its message."""
        from . import cli

        shown = "openllama " + shlex.join(argv)
        if stdin is not None:
            lines = " ".join(shlex.quote(line) for line in stdin.splitlines())
            shown = f"printf '%s\\n' {lines} | {shown}"
        print(f"$ {shown}", file=self.stream, flush=True)
        old_stdin = sys.stdin
        try:
            if stdin is not None:
                sys.stdin = io.StringIO(stdin)
            code = cli.main(argv)
        finally:
            sys.stdin = old_stdin
        if code:
            raise UserError(f"demo stopped: `{shown}` failed (exit code {code}); see the message above")

    @contextlib.contextmanager
    def stage(self, name: str):
        i = self.header(name)
        t0 = time.perf_counter()
        yield
        took = time.perf_counter() - t0
        self.times[name] = took
        # correct the ETA by how the long stages went so far (short ones are mostly start-up noise)
        long = [j for j in range(i + 1) if self.plan[j][1] >= 20]
        planned = sum(self.plan[j][1] for j in long)
        if planned:
            self.speed = max(0.25, sum(self.times[self.plan[j][0]] for j in long) / planned)
        print(f"    {name} done in {fmt_seconds(took)}", file=self.stream, flush=True)


# ----------------------------------------------------------------------------------------------
# The demo


def stage_plan(cfg: DemoConfig, sec_per_step: dict[str, float]) -> list[tuple[str, float]]:
    """(stage, planned seconds) in order; training time from steps x seconds per step."""
    steps = {k: getattr(cfg, k).get("train", {}).get("max_steps", 0) for k in ("pretrain", "sft", "dpo", "grpo")}
    plan = [("data", 8.0), ("tokenizer", 3.0), ("tokenize", 3.0),
            ("pretrain", steps["pretrain"] * sec_per_step["pretrain"]), ("evaluate base", 12.0),
            ("sft", steps["sft"] * sec_per_step["sft"]), ("evaluate sft", 10.0)]
    for method in cfg.align:
        plan += [(method, steps[method] * sec_per_step[method] + 5), (f"evaluate {method}", 10.0)]
    if cfg.eval.lm_eval and lm_eval_available():  # the final evaluation runs the lm-eval tasks too
        name, seconds = plan[-1]
        plan[-1] = (name, seconds + 15.0)
    plan += [("export", 3.0), ("chat", 3.0), ("report", 5.0)]
    return plan


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def final_lm_eval_stage(cfg: DemoConfig) -> str | None:
    """The stage whose evaluation also runs the lm-eval tasks: the last one, when lm-eval is there."""
    if not cfg.eval.lm_eval:
        return None
    if not lm_eval_available():
        print("note: lm-eval is not installed (pip install -e '.[eval]'): the lm-eval tasks are left out", flush=True)
        return None
    return cfg.align[-1] if cfg.align else "sft"


def lm_eval_args(cfg: DemoConfig, p: dict[str, Path]) -> list[str]:
    """`evaluate` flags for the demo's tasks as lm-eval tasks over this run's data (written here)."""
    from .lm_eval_backend import write_demo_tasks

    tasks = write_demo_tasks(p["eval"] / "lm_eval_tasks", p["data"] / "tasks" / f"{cfg.eval.split}.jsonl",
                             max_gen_toks=cfg.eval.max_new_tokens)
    limit = ["--lm-eval-limit", str(cfg.eval.lm_eval_limit)] if cfg.eval.lm_eval_limit else []
    # batches as large as the exact-match evaluation's; a short bootstrap for the perplexity's stderr
    return ["--lm-eval", str(tasks), "--lm-eval-batch-size", "64", "--lm-eval-bootstrap", "200",
            "--lm-eval-out", str(p["eval"] / "lm_eval"), *limit]


# Seconds per optimizer step of each stage at the default sizes on a quiet 2-core CPU (measured).
SEC_PER_STEP = {"pretrain": 0.35, "sft": 0.4, "dpo": 0.35, "grpo": 0.6}

CHAT_SCRIPT = "What is 7 + 5?\nWhich is larger, 8 or 3?\n/reset\n“猫 狗 猫”里有几个猫？\n"


def write_stage_config(path: Path, section: dict[str, Any], **paths: Any) -> Path:
    data = merge(copy.deepcopy(section), paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """Threads for torch: `requested`, else OMP_NUM_THREADS, else the cores idle right now.

    These models are tiny: on an idle 2-core CPU two threads are ~1.8x faster than one, but when
    the cores are busy with other work, extra OpenMP threads wait on each other and a step can take
    10x longer (measured: 0.25 s/step with one thread, 3-4 s with two, at load ~4)."""
    import os

    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads must be >= 1 (got {requested})")
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: use every core
        return cores, "all cores"
    return max(1, min(cores, int(cores - load + 0.5))), f"cores idle now (load {load:.1f} on {cores})"


def prepare_out_dir(out: Path) -> None:
    """A fresh directory, or a previous demo run (replaced); anything else is left alone."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"{out} exists and is not a demo run directory; choose another --out")
        print(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_demo(out: str | Path, minutes: float = 5.0, seed: int | None = None, config: str | None = None,
             overrides: list[str] | None = None, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Run every stage into `out`; returns the results (also in out/results.json). Torch's thread
    count is set for the run (see `choose_threads`) and restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    try:
        return _run_demo(out, minutes, seed, config, overrides, progress, threads)
    finally:
        torch.set_num_threads(previous)


def _run_demo(out, minutes, seed, config, overrides, progress, threads) -> dict[str, Any]:
    from .report import collect_stage, write_report

    cfg = load_demo_config(config, overrides or [])
    if seed is not None:
        cfg.seed = seed
    if minutes <= 0:
        raise UserError(f"--minutes must be positive (got {minutes})")
    cfg = scaled(cfg, minutes)
    import torch

    n_threads, why = choose_threads(threads)
    torch.set_num_threads(n_threads)
    print(f"torch threads: {n_threads} ({why})", flush=True)
    out = Path(out)
    prepare_out_dir(out)
    (out / MARKER).write_text(json.dumps({"minutes": minutes, "config": cfg.model_dump(mode="json")}, indent=1,
                                         ensure_ascii=False) + "\n", encoding="utf-8")
    quiet = [] if progress else ["--no-progress"]
    seed_s = str(cfg.seed)
    p = {k: out / k for k in ("data", "text", "tokenizer", "tokens", "configs", "eval", "hf")}
    runner = StageRunner(stage_plan(cfg, SEC_PER_STEP))
    command = ["demo", "--out", str(out), "--minutes", f"{minutes:g}", "--seed", seed_s,
               *(["--config", config] if config else []), *(overrides or [])]
    results: dict[str, Any] = {"out": str(out), "minutes": minutes, "seed": cfg.seed, "eval_split": cfg.eval.split,
                               "command": "openllama " + shlex.join(command), "stages": []}

    with runner.stage("data"):
        data_cfg = write_stage_config(p["configs"] / "data.yaml", cfg.data.model_dump(mode="json"))
        runner.command(["data", "builtin", "--out", str(p["data"]), "--seed", seed_s, "--config", str(data_cfg)])
        for split in ("train", "valid"):
            runner.command(["data", "prepare", str(p["data"] / "raw" / f"pretrain_{split}.jsonl"),
                            "--out", str(p["text"] / split), "--workers", "1", *quiet])
        runner.command(["data", "verify", str(p["text"] / "train")])
    with runner.stage("tokenizer"):
        runner.command(["tokenizer", "train", "--input", str(p["text"] / "train"), "--out", str(p["tokenizer"]),
                        "--vocab-size", str(cfg.vocab_size), "--seed", seed_s, "--quiet"])
    with runner.stage("tokenize"):
        for split in ("train", "valid"):
            runner.command(["data", "tokenize", "--shards", str(p["text"] / split), "--tokenizer", str(p["tokenizer"]),
                            "--out", str(p["tokens"] / split), "--workers", "1", *quiet])

    lm_eval_stage = final_lm_eval_stage(cfg)

    def evaluate(name: str, model: Path) -> dict:
        with runner.stage(f"evaluate {name}"):
            extra = lm_eval_args(cfg, p) if name == lm_eval_stage else []
            runner.command(["evaluate", "--model", str(model), "--data", str(p["tokens"] / "valid"),
                            "--max-batches", str(cfg.eval.valid_batches), "--tasks",
                            str(p["data"] / "tasks" / f"{cfg.eval.split}.jsonl"), "--max-new-tokens", str(cfg.eval.max_new_tokens),
                            "--out", str(p["eval"] / f"{name}.json"), *extra])
        return json.loads((p["eval"] / f"{name}.json").read_text(encoding="utf-8"))

    train_seed = f"train.seed={cfg.seed}"
    with runner.stage("pretrain"):
        pcfg = write_stage_config(p["configs"] / "pretrain.yaml", cfg.pretrain,
                                  data={"train": [str(p["tokens"] / "train")], "val": str(p["tokens"] / "valid")})
        runner.command(["pretrain", "--config", str(pcfg), "--out", str(out / "pretrain"), *quiet, train_seed])
    results["stages"].append(collect_stage("pretrain", out / "pretrain", runner.times["pretrain"],
                                           evaluate("base", out / "pretrain")))

    with runner.stage("sft"):
        scfg = write_stage_config(p["configs"] / "sft.yaml", cfg.sft,
                                  data={"valid": [str(p["data"] / "sft" / "valid.jsonl")]})
        runner.command(["sft", "--model", str(out / "pretrain"), "--data", str(p["data"] / "sft" / "train.jsonl"),
                        "--config", str(scfg), "--out", str(out / "sft"), *quiet, train_seed])
    results["stages"].append(collect_stage("sft", out / "sft", runner.times["sft"], evaluate("sft", out / "sft")))

    last = out / "sft"
    for method in cfg.align:
        with runner.stage(method):
            if method == "dpo":
                mcfg = write_stage_config(p["configs"] / "dpo.yaml", cfg.dpo,
                                          data={"valid": [str(p["data"] / "dpo" / "valid.jsonl")]})
                data = p["data"] / "dpo" / "train.jsonl"
            else:
                mcfg = write_stage_config(p["configs"] / "grpo.yaml", cfg.grpo,
                                          data={"valid": [str(p["data"] / "rl" / "valid.jsonl")]})
                data = p["data"] / "rl" / "train.jsonl"
            runner.command([method, "--model", str(last), "--data", str(data), "--config", str(mcfg),
                            "--out", str(out / method), *quiet, train_seed])
        results["stages"].append(collect_stage(method, out / method, runner.times[method],
                                               evaluate(method, out / method)))
        last = out / method

    with runner.stage("export"):
        runner.command(["export", str(last), "--out", str(p["hf"])])
    with runner.stage("chat"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(_Tee(sys.stdout, buf)):
            runner.command(["chat", "--model", str(p["hf"]), "--temperature", "0", "--max-new-tokens", "24"],
                           stdin=CHAT_SCRIPT)
        results["chat"] = {"script": CHAT_SCRIPT.splitlines(), "transcript": transcript(CHAT_SCRIPT, buf.getvalue())}
    with runner.stage("report"):
        results["times"] = runner.times
        results["total_seconds"] = time.perf_counter() - runner.start
        results["serve"] = f"openllama serve --model {p['hf']}"
        write_report(out, results, cfg)
    return results


def transcript(script: str, printed: str) -> str:
    """The scripted chat as a dialogue: each input line, then the model's reply to it."""
    replies = [line[len("model> "):] for line in printed.splitlines() if line.startswith("model> ")]
    out, k = [], 0
    for line in script.splitlines():
        if line.startswith("/"):
            out.append(line)
            continue
        out += [f"user: {line}", f"model: {replies[k] if k < len(replies) else ''}"]
        k += 1
    return "\n".join(out)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


# ----------------------------------------------------------------------------------------------
# command line


ACCEPTS_OVERRIDES = True  # leftover `key.path=value` arguments are config overrides (see cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="time budget on a 2-core CPU; scales every stage's steps (default: 5)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the data, the weights and the sampling")
    parser.add_argument("--config", default=None, help="demo recipe YAML (default: the built-in, = configs/demo.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no per-step progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: OMP_NUM_THREADS, else the cores idle at the start)")


def run(args: argparse.Namespace) -> int:
    from .report import print_summary

    results = run_demo(args.out, args.minutes, args.seed, args.config, args.overrides, progress=not args.no_progress,
                       threads=args.threads)
    print_summary(results)
    return 0
