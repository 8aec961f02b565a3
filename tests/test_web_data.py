"""Common Crawl to shards on datatrove: WARC/WET files the tests write (warcio) -> extraction,
language routing, quality filters, MinHash near-dedup, every drop counted; and the executors
(local with several tasks, Ray on a local instance, Slurm through a stand-in `sbatch`)."""

from __future__ import annotations

import os
import socket
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from openllama import cli
from openllama.data import shards
from openllama.data.dedup import Minhasher, near_duplicates
from openllama.data.pipeline import ExecutorOptions, WebOptions
from openllama.data.prepare import PrepareOptions, prepare
from openllama.data.synthetic_web import english_article, make_warc, make_wet
from openllama.data.web import LanguageId, QualityFilters

pytest.importorskip("datatrove")
pytest.importorskip("warcio")


def _lines(directory: Path) -> list[dict]:
    return [obj for p in shards.shard_paths(directory) for obj in shards.iter_shard_lines(p)]


def _adds_up(manifest: dict) -> None:
    for table in (manifest["inputs"], manifest["sources"].values(), manifest.get("languages", {}).values()):
        for c in table:
            assert c["read"] == c["kept"] + sum(c["dropped"].values()), c
    t = manifest["totals"]
    assert t["read"] == t["kept"] + sum(t["dropped"].values()) and t["kept"] == manifest["num_lines"]


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cc")
    truths = [make_warc(tmp / f"CC-{i}.warc.gz", english=50, chinese=25, near_duplicates=25, spam=8, seed=i)
              for i in range(2)]
    web = WebOptions(languages=("en", "zh"))
    manifest = prepare([str(tmp / "CC-*.warc.gz")], tmp / "out", PrepareOptions(workers=2, web=web, progress=False))
    return tmp / "out", manifest, truths


def test_warc_pages_are_extracted_routed_filtered_and_near_deduplicated(routed):
    out, manifest, truths = routed
    assert manifest["routes"] == {"en": "en", "zh": "zh"} and manifest["num_lines"] == 0
    kept = {}
    for lang in ("en", "zh"):
        m, problems = shards.verify(out / lang)
        assert problems == []
        _adds_up(m)
        assert set(m["languages"]) == {lang}
        for obj in _lines(out / lang):
            assert set(obj) == {"text", "source", "language", "url"} and obj["language"] == lang
            kept[obj["url"]] = obj
    _adds_up(manifest)
    english = [u for t in truths for u in t.english]
    chinese = [u for t in truths for u in t.chinese]
    copies = {c: o for t in truths for c, o in t.near_duplicates.items()}
    distinct_kept = sum(u in kept for u in english + chinese) / len(english + chinese)
    routed_right = (sum(kept.get(u, {}).get("language") == "en" for u in english)
                    + sum(kept.get(u, {}).get("language") == "zh" for u in chinese)) / len(english + chinese)
    recall = sum(c not in kept for c in copies) / len(copies)
    assert distinct_kept >= 0.99 and routed_right >= 0.95 and recall >= 0.95, (distinct_kept, routed_right, recall)
    assert not any(u in kept for t in truths for u in t.spam)  # repetitive pages go
    # boilerplate (navigation, cookie banner, footer) is not part of the text
    assert not any(b in obj["text"] for obj in kept.values() for b in ("Privacy Policy", "Copyright", "cookies"))
    # every drop is counted, by reason and by language
    dropped_main = manifest["totals"]["dropped"]
    assert dropped_main["not_html"] == sum(t.not_html for t in truths)
    near = sum(shards.load_manifest(out / lang)["totals"]["dropped"].get("near_duplicate", 0) for lang in ("en", "zh"))
    assert near >= 0.95 * len(copies)
    spam = shards.load_manifest(out / "en")["languages"]["en"]["dropped"]
    assert sum(v for k, v in spam.items() if k.startswith("gopher") or k in ("c4", "fineweb_quality")) >= 8


def test_wet_records_keep_their_language_without_routing(tmp_path):
    import random

    rng = random.Random(3)
    texts = {f"https://e.org/{i}": "\n".join(english_article(rng)) for i in range(6)}
    texts["https://z.cn/0"] = "这是一篇关于城市发展的文章。" * 30 + "\n" + "我们今天讨论教育和环境的问题。" * 20
    make_wet(tmp_path / "CC-0.warc.wet.gz", texts)
    m = prepare([str(tmp_path / "CC-0.warc.wet.gz")], tmp_path / "out",
                PrepareOptions(web=WebOptions(quality_filters=False), progress=False))
    assert m["inputs"][0]["format"] == "wet" and "routes" not in m
    langs = {o["url"]: o["language"] for o in _lines(tmp_path / "out")}
    assert langs["https://z.cn/0"] == "zh" and sum(v == "en" for v in langs.values()) == 6
    assert m["languages"]["en"]["kept"] == 6 and m["settings"]["near_dedup"]["bands"] == 14


def test_language_id_and_filters_work_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    lid = LanguageId()
    assert lid.predict("The quick brown fox jumps over the lazy dog near the river bank.")[0] == "en"
    assert lid.predict("我们今天在图书馆讨论了城市发展和环境保护的问题。")[0] == "zh"
    filters = QualityFilters()
    import random

    good = "\n".join(english_article(random.Random(1)))
    assert filters.apply(good, "en")[0] is None
    assert filters.apply("buy cheap watches now " * 100, "en")[0] == "gopher_repetition"
    assert filters.apply(good + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "en")[0] == "c4"
    reason, text = filters.apply(good + "\nPlease enable JavaScript in your browser to see this page.", "en")
    assert reason is None and "JavaScript" not in text  # C4 removes the line, keeps the page


def test_minhash_links_small_edits_and_keeps_distinct_texts():
    import random

    rng = random.Random(0)
    docs = ["\n".join(english_article(rng)) for _ in range(50)]
    edited = [d.replace(" the ", " a ", 2) for d in docs[:20]]
    hasher = Minhasher()
    sigs = np.stack([hasher.signature(t) for t in docs + edited])
    cand = np.ones(len(sigs), bool)
    drop = near_duplicates(sigs, cand)
    assert not drop[:50].any() and drop[50:].all()
    cand[50:] = False  # not candidates (e.g. exact duplicates already dropped): never linked
    assert not near_duplicates(sigs, cand).any()
    assert hasher.signature("!!! ...") is None


# ----------------------------------------------------------------------------------------------
# executors: the same bytes whatever runs the stages


@pytest.fixture
def pile(tmp_path) -> list[str]:
    import json

    paths = []
    for f in range(3):
        path = tmp_path / f"pile-{f}.jsonl"
        rows = [{"text": f"Document {i % 70} of a corpus, with enough words to keep.", "meta": {"pile_set_name": "P"}}
                for i in range(f * 50, f * 50 + 90)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths


def _same_output(a: Path, b: Path) -> None:
    ma, mb = shards.load_manifest(a), shards.load_manifest(b)
    for m in (ma, mb):
        m.pop("seconds")
    assert ma == mb and len(ma["shards"]) >= 2
    for s in ma["shards"]:
        assert (a / s["name"]).read_bytes() == (b / s["name"]).read_bytes()
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())  # no logs, no spools


def test_local_executor_with_several_tasks_gives_the_same_bytes(tmp_path, pile):
    one = prepare(pile, tmp_path / "one", PrepareOptions(max_lines=30, progress=False))
    many = PrepareOptions(max_lines=30, workers=2, executor=ExecutorOptions(tasks=3), progress=False)
    prepare(pile, tmp_path / "many", many)
    _same_output(tmp_path / "one", tmp_path / "many")
    assert one["totals"]["dropped"]["duplicate"] == 270 - 70


@pytest.mark.slow
def test_ray_executor_on_a_local_instance(tmp_path, pile):
    ray = pytest.importorskip("ray")
    prepare(pile, tmp_path / "local", PrepareOptions(max_lines=30, progress=False))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        prepare(pile, tmp_path / "ray", PrepareOptions(max_lines=30, workers=2, progress=False,
                                                      executor=ExecutorOptions(kind="ray", tasks=2)))
    finally:
        ray.shutdown()
    _same_output(tmp_path / "local", tmp_path / "ray")


SBATCH = '''\
#!PYTHON
"""Stand-in for Slurm's sbatch: runs every array task of the script now, in order; skips a job
whose afterok dependency failed; `FAKE_SLURM_KILL=JOBNAME:INDEX` kills that task (it never runs)."""
import os, re, subprocess, sys
state = os.environ["FAKE_SLURM_DIR"]
args, script = sys.argv[1:-1], sys.argv[-1]
text = open(script).read()
lo, hi = map(int, re.search(r"#SBATCH --array=(\\d+)-(\\d+)", text).groups())
name = re.search(r"#SBATCH --job-name=(\\S+)", text).group(1)
name += "/merge_stats" if "merge_stats " in text else ""
counter = os.path.join(state, "counter")
job = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
open(counter, "w").write(str(job))
env = dict(os.environ, SLURM_JOB_ID=str(job), SLURM_NODELIST="localhost", SLURM_ARRAY_TASK_COUNT=str(hi - lo + 1))
for a in args:
    if a.startswith("--export="):
        env.update(kv.split("=", 1) for kv in a[len("--export="):].split(",")[1:])
deps = [d.split(":")[1] for a in args if a.startswith("--dependency=") for d in a.split("=", 1)[1].split(",")
        if d.startswith("afterok:")]
failed = any(os.path.exists(os.path.join(state, f"{d}.failed")) for d in deps)
for i in range(lo, hi + 1):
    if failed:
        break
    if os.environ.get("FAKE_SLURM_KILL") == f"{name}:{i}":
        failed = True
        continue
    with open(os.path.join(state, "ran"), "a") as log:
        log.write(f"{name}:{i}\\n")
    if subprocess.run(["bash", script], env=dict(env, SLURM_ARRAY_TASK_ID=str(i)),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
        failed = True
if failed:
    open(os.path.join(state, f"{job}.failed"), "w").close()
print(f"Submitted batch job {job}")
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    bin_dir, state = tmp_path / "fake-bin", tmp_path / "fake-slurm"
    bin_dir.mkdir()
    state.mkdir()
    scripts = {"sbatch": SBATCH.replace("PYTHON", sys.executable),
               "scontrol": "#!/bin/bash\necho localhost\n",
               "srun": '#!/bin/bash\nwhile [[ "$1" == -* ]]; do [[ "$1" == -n ]] && shift; shift; done\nexec "$@"\n'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(textwrap.dedent(body) if name != "sbatch" else body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    return state


@pytest.mark.slow
def test_slurm_job_arrays_through_a_standin_sbatch_resume_after_a_killed_task(tmp_path, pile, fake_slurm, monkeypatch,
                                                                              capsys):
    prepare(pile, tmp_path / "local", PrepareOptions(max_lines=30, progress=False))
    argv = ["data", "prepare", *pile, "--out", str(tmp_path / "slurm"), "--max-lines", "30", "--executor", "slurm",
            "--slurm-partition", "cpu", "--tasks", "2", "--workers", "1"]
    monkeypatch.setenv("FAKE_SLURM_KILL", "prepare-scan:1")
    assert cli.main(argv) == 0
    assert "Slurm jobs submitted" in capsys.readouterr().out
    assert not (tmp_path / "slurm" / "manifest.json").exists()  # scan task 1 was killed: later stages never ran
    launch = (tmp_path / "slurm" / ".logs" / "scan" / "launch_script.slurm").read_text()
    assert "#SBATCH --array=0-1" in launch and "#SBATCH --partition=cpu" in launch and "launch_pickled_pipeline" in launch
    assert (tmp_path / "slurm" / ".logs" / "scan" / "completions" / "00000").exists()
    monkeypatch.delenv("FAKE_SLURM_KILL")
    (fake_slurm / "ran").unlink()
    assert cli.main(argv) == 0  # the same command resumes
    ran = (fake_slurm / "ran").read_text().split()
    assert [r for r in ran if r.startswith("prepare-scan:")] == ["prepare-scan:0"]  # only the unfinished task (rank 1)
    assert {"prepare-dedup:0", "prepare-manifest:0"} <= set(ran)
    for name in ("shard-000000.jsonl.zst", "manifest.json"):
        assert (tmp_path / "slurm" / name).exists()
    m = shards.load_manifest(tmp_path / "slurm")
    assert shards.verify(tmp_path / "slurm")[1] == [] and m == {**m, "shards": shards.load_manifest(tmp_path / "local")["shards"]}
