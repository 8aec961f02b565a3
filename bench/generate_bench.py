"""Decode throughput: our `Generator` vs transformers' `generate` on the same weights.

Both get the same random-weight model (ours converted with `openllama.hf.to_hf_model`), the same
prompts (random ids, equal length), greedy decoding and a fixed number of new tokens (EOS
ignored). Decode tokens/s is measured free of prefill: each side runs with N and with 1 new
token and the difference gives the decode time of N-1 steps. Repetitions are interleaved
(ours, theirs, ours, ...) so machine noise hits both; the table shows medians and the ratio.
Each time is taken twice: wall clock, and the process's CPU time, which on a shared machine
leaves out the time the process waited for a core (the better measure with `--threads 1`).
Greedy tokens of the two are compared as a correctness check.

- CPU (default): float32, the `tiny` preset (~5M params).
- CUDA: bf16 weights for both.
- `--compile`: adds a row with our decode step compiled (its tokens must equal eager's).

    PYTHONPATH=src python bench/generate_bench.py                      # CPU, batch 1 and 8
    PYTHONPATH=src python bench/generate_bench.py --device cuda        # bf16 on a GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from openllama.config import ModelConfig, read_yaml  # noqa: E402
from openllama.generate import Generator, SamplingParams  # noqa: E402
from openllama.hf import to_hf_model  # noqa: E402
from openllama.model import Llama, use_cpu_decode_layout  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def ours_runner(gen: Generator, prompts: torch.Tensor):
    rows = prompts.tolist()

    def run(n: int):
        return gen.generate(rows, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
    return run


def theirs_runner(hf, prompts: torch.Tensor):
    mask = torch.ones_like(prompts)

    @torch.inference_mode()
    def run(n: int):
        return hf.generate(prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    return run


def decode_rate(runners: dict, batch: int, new_tokens: int, reps: int, device) -> dict[str, tuple[float, float]]:
    """tokens/s of decoding for each runner, (wall clock, CPU time): batch * (N - 1) / (t(N) - t(1)),
    medians over reps."""
    for run in runners.values():  # warm-up (allocations, kernels, compile)
        run(new_tokens)
        run(1)
    long = {k: [] for k in runners}
    short = {k: [] for k in runners}
    for _ in range(reps):
        for name, run in runners.items():
            long[name].append(timed(lambda: run(new_tokens), device))
            short[name].append(timed(lambda: run(1), device))

    def rate(k: str, clock: int) -> float:
        t = statistics.median(x[clock] for x in long[k]) - statistics.median(x[clock] for x in short[k])
        return batch * (new_tokens - 1) / max(t, 1e-9)
    return {k: (rate(k, 0), rate(k, 1)) for k in runners}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny", help="configs/<preset>.yaml (its model section)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="add a row with our decode step compiled")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.model_validate(read_yaml(ROOT / "configs" / f"{args.preset}.yaml")["model"])
    cfg = cfg.model_copy(update={"max_seq_len": max(cfg.max_seq_len, args.prompt_len + args.new_tokens)})
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    hf = to_hf_model(model).to(device=device, dtype=dtype).eval()
    model = model.to(device=device, dtype=dtype)
    if device.type == "cpu":
        use_cpu_decode_layout(model)  # what load_for_inference (serve, chat, generate) does on CPU
    ours = Generator(model)
    compiled = Generator(model, compile=True) if args.compile else None

    print(f"# generate_bench: {args.preset} ({model.num_params() / 1e6:.1f}M params), {device.type} {dtype}, "
          f"threads {torch.get_num_threads()}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.reps}")
    print(f"# torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
          f"{platform.processor() or platform.machine()}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    print("tok/s: wall clock / CPU time; ratio: ours / transformers, wall / CPU")
    print(f"{'batch':>5} | {'ours tok/s':>13} | {'transformers tok/s':>18} | {'ratio':>13}"
          + (f" | {'ours+compile tok/s':>18} | {'ratio':>13}" if compiled else "") + " | same tokens")
    for batch in args.batches:
        prompts = torch.randint(3, cfg.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        runners = {"ours": ours_runner(ours, prompts), "theirs": theirs_runner(hf, prompts.to(device))}
        if compiled:
            runners["compiled"] = ours_runner(compiled, prompts)
        # correctness first: greedy ids must agree (bf16 may differ after a near-tie)
        n = min(args.new_tokens, 16)
        mine = [c.token_ids for c in runners["ours"](n)]
        theirs = runners["theirs"](n)[:, args.prompt_len:].tolist()
        same = "yes" if mine == theirs else "NO"
        if compiled and [c.token_ids for c in runners["compiled"](n)] != mine:
            same += " (compiled: NO)"
        rates = decode_rate(runners, batch, args.new_tokens, args.reps, device)
        def cell(k: str) -> str:
            return f"{rates[k][0]:,.0f} / {rates[k][1]:,.0f}"

        def ratio(k: str) -> str:
            return f"{rates[k][0] / rates['theirs'][0]:.2f}x / {rates[k][1] / rates['theirs'][1]:.2f}x"
        line = f"{batch:>5} | {cell('ours'):>13} | {cell('theirs'):>18} | {ratio('ours'):>13}"
        if compiled:
            line += f" | {cell('compiled'):>18} | {ratio('compiled'):>13}"
        print(line + f" | {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
