"""`data prepare` as four datatrove stages, run by one of datatrove's executors.

    scan (N tasks) -> dedup (1) -> write (N) -> manifest (1)       (steps: data/steps.py)

- `local`: `LocalPipelineExecutor`, the stages one after another, up to `--workers` tasks at a time
  (a forkserver pool, as everywhere in this project: never a plain fork of a threaded parent).
- `slurm`: `SlurmPipelineExecutor`, one job array per stage, each depending on the one before
  (`afterok`); `prepare` submits them and returns. Finished tasks leave completion markers in
  OUT/.logs/STAGE/completions, so running the same command again after a failure (or a killed
  task) submits only the unfinished tasks and the stages after them.
- `ray`: `RayPipelineExecutor` on the Ray cluster `ray.init()` finds (RAY_ADDRESS, or a local one).

The stages meet only through files under OUT (spools and pickles in OUT/.work, shards, manifests),
so tasks may run on any machine that shares OUT. Which task does what depends on N, but nothing
in the output does: shards are cut from the global input order, so OUT is byte-identical for any
executor, task count and worker count.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .dedup import MinhashConfig
from .web import QualityConfig

EXECUTORS = ("local", "slurm", "ray")
WEB_FORMATS = ("warc", "wet")


@dataclass(frozen=True)
class WebOptions:
    languages: tuple[str, ...] = ()  # keep (and route to OUT/LANG) only these; () keeps every language in OUT
    language_threshold: float = 0.65  # fastText probability below which a page is dropped as `language`
    quality: QualityConfig = field(default_factory=QualityConfig)
    quality_filters: bool = True
    extract_timeout: float = 5.0  # seconds per page in trafilatura


@dataclass(frozen=True)
class ExecutorOptions:
    kind: str = "local"
    tasks: int = 0  # scan/write tasks; 0: local -> --workers, slurm/ray -> one per input file (at most 1000)
    workers: int = 1  # tasks at a time (local; slurm: array throttle %N, -1 none; ray: concurrent tasks)
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: int = 2
    slurm_env_command: str | None = None  # e.g. "source /path/.venv/bin/activate" (default: this Python's venv)
    slurm_with_srun: bool = True
    ray_mem_per_cpu_gb: float = 1.0


class Work:
    """Where the stages leave their results (OUT/.work) and their logs (OUT/.logs)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.root = self.out / ".work"
        self.logs = self.out / ".logs"

    def spool(self, i: int, route: str) -> Path:
        return self.root / "scan" / f"{i:06d}{'-' + route if route else ''}.jsonl"

    def result(self, i: int) -> Path:
        return self.root / "scan" / f"{i:06d}.pkl"

    def plan(self) -> Path:
        return self.root / "plan.pkl"

    def started(self) -> Path:
        return self.root / "started.pkl"

    def fingerprint(self) -> Path:
        return self.root / "job.pkl"

    def entry(self, route: str, k: int) -> Path:
        return self.root / "entries" / f"{route or '_'}-{k:06d}.pkl"

    def route_dir(self, route: str) -> Path:
        return self.out / route if route else self.out


@dataclass
class Job:
    """Everything a step needs (pickled into every task)."""

    files: list[str]
    formats: list[str]
    opts: object  # prepare.PrepareOptions
    web: WebOptions
    minhash: MinhashConfig
    near_dedup: bool
    work: Work

    @property
    def is_web(self) -> bool:
        return any(f in WEB_FORMATS for f in self.formats)

    def settings(self) -> dict:
        o = self.opts
        out = {"format": o.fmt, "text_field": o.text_field, "text_unit": o.text_unit, "on_error": o.on_error,
               "clean": o.clean.to_dict(), "zstd_level": o.zstd_level, "num_parts": o.num_parts, "part": o.part}
        if self.is_web:
            out["web"] = {**asdict(self.web), "quality": self.web.quality.to_dict(), "languages": list(self.web.languages)}
        if self.near_dedup:
            out["near_dedup"] = self.minhash.to_dict()
        return out


def stages(job: Job, tasks: int) -> list[tuple[str, list, int]]:
    """(name, steps, tasks) of the four stages."""
    from . import steps as s

    scan = [s.ReadInputs(job)]
    if job.is_web:
        scan += [s.ExtractText(job), s.IdentifyLanguage(job)]
        if job.web.quality_filters:
            scan.append(s.FilterQuality(job))
    scan.append(s.Clean(job))
    if job.near_dedup:
        scan.append(s.Signature(job))
    scan.append(s.Spool(job))
    return [("scan", scan, min(tasks, len(job.files))), ("dedup", [s.Dedup(job)], 1),
            ("write", [s.WriteShards(job)], tasks), ("manifest", [s.WriteManifest(job)], 1)]


def _start_method() -> str:
    """fork when it is safe (one thread, no torch: nothing a child could inherit half-locked),
    which starts a pool in ~0.05 s; else the forkserver, as everywhere in this project."""
    import threading

    import multiprocess

    if threading.active_count() == 1 and "torch" not in sys.modules:
        return "fork"
    if "forkserver" in multiprocess.get_all_start_methods():
        # the forkserver imports these once; each task then forks from it (not ~0.7 s of imports each)
        multiprocess.get_context("forkserver").set_forkserver_preload(
            ["openllama.data.steps", "datatrove.executor.local", "numpy", "orjson", "zstandard"])
        return "forkserver"
    return "spawn"


def _local(job: Job, ex: ExecutorOptions, plan: list) -> None:
    """The stages in order; consecutive single-task stages run chained in one task (each stage
    step first drains the one before), which saves an executor start (~0.05-0.1 s) each."""
    from datatrove.executor import LocalPipelineExecutor

    chain: list[tuple[str, list]] = []

    def launch(name: str, steps: list, tasks: int) -> None:
        workers = max(1, min(ex.workers, tasks))
        LocalPipelineExecutor(steps, tasks=tasks, workers=workers, logging_dir=str(job.work.logs / name),
                              start_method=_start_method() if workers > 1 else "spawn").run()

    def flush() -> None:
        if chain:
            launch("+".join(n for n, _ in chain), [step for _, steps in chain for step in steps], 1)
            chain.clear()

    for name, steps, tasks in plan:
        if name == "write" and tasks > 1:  # only as many tasks as there are shards
            from .steps import load_pickle, shard_jobs

            flush()  # the dedup stage writes the plan that says how many
            tasks = max(1, min(tasks, len(shard_jobs(load_pickle(job.work.plan())))))
        if tasks == 1:
            chain.append((name, steps))
        else:
            flush()
            launch(name, steps, tasks)
    flush()


def _ray(job: Job, ex: ExecutorOptions, plan: list) -> None:
    import ray
    from datatrove.executor.ray import RayPipelineExecutor

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    for name, steps, tasks in plan:
        RayPipelineExecutor(steps, tasks=tasks, workers=ex.workers if ex.workers > 0 else -1,
                            logging_dir=str(job.work.logs / name), mem_per_cpu_gb=ex.ray_mem_per_cpu_gb).run()


def _slurm(job: Job, ex: ExecutorOptions, plan: list) -> None:
    from datatrove.executor.slurm import SlurmPipelineExecutor

    if not ex.slurm_partition:
        from ..errors import UserError

        raise UserError("--executor slurm needs --slurm-partition")
    env = ex.slurm_env_command
    if env is None:  # the tasks run this same environment's `launch_pickled_pipeline`
        env = f"export PATH={Path(sys.executable).parent}:$PATH"
    previous = None
    for name, steps, tasks in plan:
        previous = SlurmPipelineExecutor(
            steps, tasks=tasks, time=ex.slurm_time, partition=ex.slurm_partition,
            cpus_per_task=ex.slurm_cpus_per_task, mem_per_cpu_gb=ex.slurm_mem_per_cpu_gb,
            workers=ex.workers if ex.workers > 0 else -1, job_name=f"prepare-{name}",
            logging_dir=str(job.work.logs / name), depends=previous, env_command=env,
            with_srun=ex.slurm_with_srun, mail_type="NONE")
    previous.run()


def default_tasks(job: Job, ex: ExecutorOptions) -> int:
    if ex.tasks > 0:
        return ex.tasks
    return max(1, ex.workers) if ex.kind == "local" else max(1, min(len(job.files), 1000))


def run(job: Job, ex: ExecutorOptions) -> None:
    """Run (local, ray) or submit (slurm) the four stages."""
    plan = stages(job, default_tasks(job, ex))
    {"local": _local, "ray": _ray, "slurm": _slurm}[ex.kind](job, ex, plan)
