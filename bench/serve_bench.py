"""Serving throughput and latency: `openllama serve` under 1, 4, 16 and 64 concurrent streaming
clients (the official `openai` client over loopback), against transformers' own continuous
batching (`generate_batch`) on the same weights, in the same run.

Per model shape (the `tiny` preset, ~5.5M parameters, and a ~100M-parameter shape):
1. a model directory: random weights (seeded) with the EOS row of the output projection zeroed, so
   greedy decoding never stops early and every request generates exactly `--new-tokens-<shape>`
   tokens on both sides; a SentencePiece tokenizer with the model's vocabulary (trained here on
   tinyshakespeare, or on generated words when ../shared/data is absent);
2. the server in its own process (`python -m openllama.cli serve --no-ui --threads T`);
3. for each client count C: C asyncio clients in this process, each sending its requests one after
   another (streamed chat completions, temperature 0, a different Shakespeare line each);
   measured: total generated tokens / wall time (median of `--reps` runs, interleaved with the
   baseline server's), time to first token (request sent -> first content chunk), inter-token
   latency (gaps between content chunks) and time per output token (per request: (last - first
   chunk) / (tokens - 1)), p50 / p95 over all requests;
4. transformers: `LlamaForCausalLM.generate_batch` (paged KV cache, continuous batching; its cache
   sized for the workload, as auto-sizing on CPU allocates for all of RAM) with the server stopped,
   the same prompt ids, greedy, the same new tokens, C requests at once: generated tokens / wall.
   It gets no HTTP, no tokenizer, no streaming: the favourable side of the comparison.
With `--baseline-src DIR` (a checkout of the code before continuous batching, e.g.
`git archive <rev> src | tar -x -C DIR`), the old server is measured too (tiny shape): one
thread pool slot per request (`--max-concurrent C`).

    PYTHONPATH=src .venv/bin/python bench/serve_bench.py                   # both shapes, ~3 minutes
    PYTHONPATH=src .venv/bin/python bench/serve_bench.py --shapes tiny --clients 1 16
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from openllama.config import ModelConfig, read_yaml  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPES = {
    "tiny": {},  # configs/tiny.yaml as it is
    # ~100M: GPT-3 small's body (dim 768, 12 layers, 12 heads, SwiGLU 2048), an 8k vocabulary, tied
    "100m": {"dim": 768, "n_layers": 12, "n_heads": 12, "multiple_of": 256, "tie_embeddings": True},
}


# -- setup ---------------------------------------------------------------------------------------


def corpus() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")
    rng = random.Random(0)  # generated words: enough distinct pieces for an 8k vocabulary
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(60000))


def prompt_lines(text: str, n: int) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    rng = random.Random(1)
    return [" ".join(rng.sample(lines, 1 + i % 4)) for i in range(n)]  # 1-4 lines: prompts of varied length


def model_config(shape: str, vocab: int) -> ModelConfig:
    cfg = read_yaml(ROOT / "configs" / "tiny.yaml")["model"]
    cfg.update(SHAPES[shape], vocab_size=vocab, max_seq_len=512)
    return ModelConfig.model_validate(cfg)


def make_model_dir(shape: str, tok_dir: Path, out: Path) -> tuple[Path, ModelConfig]:
    from openllama.model import Llama, save_model
    from openllama.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    cfg = model_config(shape, tok.vocab_size)
    torch.manual_seed(0)
    model = Llama(cfg)
    with torch.no_grad():
        model.output.weight[tok.eos_id] = 0.0  # logit 0: never the greedy choice, so no early stop
    save_model(model, out)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out, cfg


# -- the server ----------------------------------------------------------------------------------


def start_server(model_dir: Path, threads: int, max_concurrent: int, src: Path) -> tuple[subprocess.Popen, str]:
    """`openllama serve` from the source tree `src` in its own process; -> (process, base URL)."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "openllama.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--threads", str(threads), "--no-ui", "--max-concurrent", str(max_concurrent), "--max-queue", "256"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not come up")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Result:
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)  # per request: sent -> first content chunk
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    tpot: list[float] = field(default_factory=list)  # per request: (last - first chunk) / (tokens - 1)

    @property
    def rate(self) -> float:
        return self.tokens / self.wall


async def one_request(client, model: str, prompt: str, new_tokens: int, res: Result) -> None:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            if first is None:
                first = now
                res.ttft.append(now - t0)
            else:
                res.itl.append(now - last)
            last = now
    res.tokens += tokens
    if first is not None and tokens > 1:
        res.tpot.append((last - first) / (tokens - 1))


async def drive(url: str, model: str, prompts: list[str], clients: int, per_client: int, new_tokens: int) -> Result:
    """`clients` concurrent clients, each sending `per_client` requests one after another."""
    import httpx
    import openai

    res = Result()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600,
                                  http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as client:
        await one_request(client, model, prompts[0], 4, Result())  # warm-up: first forward, connection

        async def worker(c: int) -> None:
            for r in range(per_client):
                await one_request(client, model, prompts[(c * per_client + r) % len(prompts)], new_tokens, res)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(clients)))
        res.wall = time.perf_counter() - t0
    return res


def requests_per_client(shape: str, clients: int) -> int:
    """Enough requests that a run is mostly steady state (every client with a request running):
    16 (tiny) / 4 (100m) in all, at least 3 (tiny) / 1 (100m) per client."""
    base, least = (16, 3) if shape == "tiny" else (4, 1)
    return max(base // clients, least)


# -- transformers' continuous batching -------------------------------------------------------------


def transformers_rate(model_dir: Path, prompt_ids: list[list[int]], new_tokens: int, reps: int) -> float:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from openllama.hf import to_hf_model
    from openllama.model import load_model

    hf = to_hf_model(load_model(model_dir)).eval()
    n = len(prompt_ids)
    longest = max(len(p) for p in prompt_ids)
    page = 64
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=n * math.ceil((longest + new_tokens) / page) + n,
                                  max_batch_tokens=max(sum(len(p) for p in prompt_ids), 256), max_requests_per_batch=n)
    gc = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    rates = []
    for _ in range(reps + 1):  # the first run warms up
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate_batch(prompt_ids, generation_config=gc, continuous_batching_config=cb)
        dt = time.perf_counter() - t0
        rates.append(sum(len(o.generated_tokens) for o in out.values()) / dt)
    return statistics.median(rates[1:])


# -- the run ---------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1000


def run_shape(shape: str, args, work: Path, tok_dir: Path, prompts: list[str]) -> list[dict]:
    from openllama.chat_template import ChatTemplate
    from openllama.model import count_params
    from openllama.tokenizer import Tokenizer

    model_dir, cfg = make_model_dir(shape, tok_dir, work / shape)
    new = args.new_tokens[shape]
    print(f"\n## {shape}: {count_params(cfg) / 1e6:.1f}M parameters (dim {cfg.dim}, {cfg.n_layers} layers, "
          f"vocab {cfg.vocab_size}), {new} new tokens per request, server threads {args.threads}, "
          f"median of {args.reps} interleaved runs\n", flush=True)
    print(HEADER)
    servers = {"ours": start_server(model_dir, args.threads, max(args.clients), ROOT / "src")}
    old_clients = [c for c in args.clients if c in (1, 16)]
    try:
        if args.baseline_src and shape == "tiny":  # thread per request, as many as clients
            for c in old_clients:
                servers[f"before, {c}"] = start_server(model_dir, args.threads, c, Path(args.baseline_src) / "src")
        rows = []
        for clients in args.clients:
            names = [n for n in servers if n == "ours" or n == f"before, {clients}"]
            runs = {n: [] for n in names}
            for _ in range(args.reps):  # interleaved: machine noise hits every server alike
                for n in names:
                    runs[n].append(asyncio.run(drive(servers[n][1], shape, prompts, clients,
                                                     requests_per_client(shape, clients), new)))
            for n in names:
                rows.append(summary_row(shape, "ours" if n == "ours" else "before (thread per request)", clients,
                                        runs[n]))
                print_row(rows[-1])
    finally:
        for proc, _ in servers.values():
            stop(proc)
    tok = Tokenizer.load(tok_dir)
    tpl = ChatTemplate.for_tokenizer(tok)
    ids = [tpl.generation_ids([{"role": "user", "content": p}], tok) for p in prompts]
    torch.set_num_threads(args.threads)
    for clients in args.hf_clients:
        rate = transformers_rate(model_dir, [ids[i % len(ids)] for i in range(clients)], new, args.reps)
        rows.append({"shape": shape, "server": "transformers generate_batch", "clients": clients, "tok_s": rate})
        print_row(rows[-1])
    return rows


def summary_row(shape: str, server: str, clients: int, runs: list[Result]) -> dict:
    pooled = Result(ttft=[x for r in runs for x in r.ttft], itl=[x for r in runs for x in r.itl],
                    tpot=[x for r in runs for x in r.tpot])
    return {"shape": shape, "server": server, "clients": clients, "tok_s": statistics.median(r.rate for r in runs),
            "ttft50": pct(pooled.ttft, 0.5), "ttft95": pct(pooled.ttft, 0.95), "itl50": pct(pooled.itl, 0.5),
            "itl95": pct(pooled.itl, 0.95), "tpot50": pct(pooled.tpot, 0.5), "tpot95": pct(pooled.tpot, 0.95),
            "all": [round(r.rate) for r in runs]}


HEADER = ("| shape | server | clients | tokens/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | "
          "TPOT p50 ms | TPOT p95 ms | tokens/s per run |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def print_row(r: dict) -> None:
    keys = ("ttft50", "ttft95", "itl50", "itl95", "tpot50", "tpot95")
    lat = "".join(f" | {r[k]:.1f}" if k in r else " | -" for k in keys)
    runs = ", ".join(f"{x:,}" for x in r.get("all", []))
    print(f"| {r['shape']} | {r['server']} | {r['clients']} | {r['tok_s']:,.0f}{lat} | {runs} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["tiny", "100m"], choices=sorted(SHAPES))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--hf-clients", type=int, nargs="+", default=[16, 64],
                    help="batch sizes for transformers' generate_batch")
    ap.add_argument("--reps", type=int, default=2, help="interleaved runs per setting (medians)")
    ap.add_argument("--new-tokens-tiny", type=int, default=64)
    ap.add_argument("--new-tokens-100m", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the server and of transformers (the clients need the other core)")
    ap.add_argument("--baseline-src", help="a checkout of the previous code to measure its server too (tiny)")
    args = ap.parse_args()
    args.new_tokens = {"tiny": args.new_tokens_tiny, "100m": args.new_tokens_100m}

    from openllama.tokenizer import train_tokenizer

    print(f"# serve_bench: torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; clients and server share them")
    print(f"# load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        work = Path(tmp)
        text = corpus()
        train_tokenizer([text[:2_000_000]], work / "tok", 8000, sample_bytes=2_000_000)
        prompts = prompt_lines(text, 256)
        rows = []
        for shape in args.shapes:
            rows += run_shape(shape, args, work, work / "tok", prompts)
    summarize(rows)
    return 0


def summarize(rows: list[dict]) -> None:
    print(f"\n## Targets (load average after: {os.getloadavg()[0]:.2f})")
    for shape in sorted({r["shape"] for r in rows}, reverse=True):
        ours = {r["clients"]: r for r in rows if r["shape"] == shape and r["server"] == "ours"}
        hf = {r["clients"]: r["tok_s"] for r in rows if r["shape"] == shape and r["server"].startswith("transformers")}
        old = {r["clients"]: r for r in rows if r["shape"] == shape and r["server"].startswith("before")}
        if 1 in ours and 16 in ours:
            print(f"- {shape}: 16 clients / 1 client = {ours[16]['tok_s'] / ours[1]['tok_s']:.1f}x tokens/s "
                  f"(target >= 5x on tiny)")
        for c in sorted(hf):
            if c in ours:
                print(f"- {shape}: ours / transformers generate_batch at {c} = {ours[c]['tok_s'] / hf[c]:.2f}x "
                      f"(target >= 1x)")
        for c in sorted(old):
            a, b = old[c], ours[c]
            print(f"- {shape}, {c} client(s), before -> now: {a['tok_s']:,.0f} -> {b['tok_s']:,.0f} tokens/s, TTFT p50 "
                  f"{a['ttft50']:.1f} -> {b['ttft50']:.1f} ms, TPOT p50 {a['tpot50']:.2f} -> {b['tpot50']:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
