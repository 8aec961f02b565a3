"""Continuous batching and sampling, against references:

- the KV cache with per-row positions: one forward over slots of different lengths equals each
  sequence through the model alone;
- `sample` / `process_logits`: logit bias, repetition / presence / frequency penalties, top-k /
  top-p per row, the inverse-CDF draw and log-probabilities, each against a plain per-row
  implementation written here from OpenAI's / transformers' definitions;
- the scheduler: a mixed batch (prompt lengths, max_tokens, stops, greedy and seeded sampling,
  penalties, bias, logprobs, n > 1, requests joining mid-way) gives every request exactly what it
  gets alone; one forward per decode step for all; cancellation frees slots at the next step; a
  full queue is refused with a retry hint;
- greedy decoding with penalties and bias equals a reference loop over the uncached model.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch

from openllama.generate import (Generator, SamplingBatch, SamplingParams, draw, filter_top_k_top_p, load_for_inference,
                                process_logits, sample)
from openllama.model import KVCache, slot_attention_mask
from openllama.serve.scheduler import Scheduler, ServerBusy
from serving_helpers import make_tiny_model_dir, torch_threads

PROMPTS = ["To be, or not to be", "Hi", "What light through yonder window breaks? It is the east, and Juliet",
           "Now is the winter of our discontent", "O"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with torch_threads(1):
        loaded = load_for_inference(make_tiny_model_dir(tmp_path_factory.mktemp("sched") / "model"))
        yield loaded, Generator(loaded.model, loaded.tokenizer)


# -- the KV cache with a length per row ------------------------------------------------------------


def test_slot_cache_forward_equals_each_sequence_alone(tiny):
    """Rows at different lengths, one decode forward (per-row start, slot mask) == each alone."""
    loaded, gen = tiny
    model, tok = loaded.model, loaded.tokenizer
    seqs = [tok.encode(p, bos=True) for p in PROMPTS[:3]]
    cache = KVCache(model.cfg, 4, 64)
    with torch.no_grad():
        for i, s in enumerate(seqs):  # prefill each into its own slot (rows 0..2 of a 4-row cache)
            model(torch.tensor([s[:-1]]), cache=cache.rows(i, i + 1), start_pos=0)
        starts = torch.tensor([len(s) - 1 for s in seqs])
        S = int(starts.max()) + 1
        logits = model(torch.tensor([[s[-1]] for s in seqs]), positions=starts[:, None],
                       attn_mask=slot_attention_mask(starts, 1, S), cache=cache.rows(0, 3), start_pos=starts)[:, -1]
        for i, s in enumerate(seqs):
            alone = model(torch.tensor([s]))[0, -1]
            torch.testing.assert_close(logits[i], alone, atol=1e-5, rtol=1e-5)
        # the keys each row wrote sit at its own column
        k_alone = KVCache(model.cfg, 1, 64)
        model(torch.tensor([seqs[1]]), cache=k_alone, start_pos=0)
        n = len(seqs[1])
        torch.testing.assert_close(cache.k[0][1, :, :n], k_alone.k[0][0, :, :n], atol=1e-6, rtol=1e-6)
    # move_row copies a slot's history
    cache.move_row(2, 3, len(seqs[2]))
    assert torch.equal(cache.v[1][3, :, :len(seqs[2])], cache.v[1][2, :, :len(seqs[2])])


def test_slot_attention_mask_reference():
    lengths = torch.tensor([0, 3, 1])
    mask = slot_attention_mask(lengths, 2, 6)
    assert mask.shape == (3, 1, 2, 6)
    for b, n in enumerate(lengths.tolist()):
        for q in range(2):
            assert mask[b, 0, q].tolist() == [c <= n + q for c in range(6)]


# -- sampling against plain references --------------------------------------------------------------


def reference_process(logits: torch.Tensor, prompt: list[int], generated: list[int], p: SamplingParams) -> torch.Tensor:
    """One row, spelled out: bias, then the CTRL repetition penalty over prompt + reply, then
    OpenAI's `mu[j] - c[j] * frequency - (c[j] > 0) * presence` over the reply."""
    x = logits.clone().float()
    for tok, b in (p.logit_bias or {}).items():
        x[tok] += b
    if p.repetition_penalty != 1.0:
        for tok in set(prompt) | set(generated):
            x[tok] = x[tok] * p.repetition_penalty if x[tok] < 0 else x[tok] / p.repetition_penalty
    for tok, c in Counter(generated).items():
        x[tok] -= c * p.frequency_penalty + p.presence_penalty
    return x


def test_process_logits_matches_reference_per_row():
    torch.manual_seed(0)
    V = 40
    logits = torch.randn(4, V) * 3
    prompts = [[1, 2, 3], [5, 5], [7], [9, 10, 11]]
    generated = [[4, 4, 4, 2], [], [7, 8, 8], [0]]
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.7, logit_bias={3: 5.0, 6: -100.0}),
              SamplingParams(repetition_penalty=1.3),
              SamplingParams(presence_penalty=-1.0, repetition_penalty=0.8, logit_bias={8: 2.5}),
              SamplingParams()]
    seen = torch.zeros(4, V, dtype=torch.bool)
    counts = torch.zeros(4, V)
    bias = torch.zeros(4, V)
    for i, (pr, g, p) in enumerate(zip(prompts, generated, params)):
        seen[i, pr + g] = True
        for tok in g:
            counts[i, tok] += 1
        for tok, b in (p.logit_bias or {}).items():
            bias[i, tok] = b
    s = SamplingBatch(torch.zeros(4), repetition_penalty=torch.tensor([p.repetition_penalty for p in params]),
                      presence_penalty=torch.tensor([p.presence_penalty for p in params]),
                      frequency_penalty=torch.tensor([p.frequency_penalty for p in params]),
                      logit_bias=bias, seen=seen, counts=counts)
    ours = process_logits(logits, s)
    for i in range(4):
        torch.testing.assert_close(ours[i], reference_process(logits[i], prompts[i], generated[i], params[i]))
    assert not torch.equal(ours, logits)  # the settings did something


def test_top_k_top_p_per_row_equal_row_alone():
    torch.manual_seed(1)
    logits = torch.randn(5, 60) * 2
    ks, ps = [0, 5, 1, 0, 20], [1.0, 1.0, 0.5, 0.3, 0.9]
    batch = filter_top_k_top_p(logits, torch.tensor(ks), torch.tensor(ps))
    for i, (k, p) in enumerate(zip(ks, ps)):
        alone = filter_top_k_top_p(logits[i:i + 1], k, p)[0]  # the scalar path, checked against transformers
        assert torch.equal(torch.isinf(batch[i]), torch.isinf(alone)), i
    assert int(torch.isfinite(batch[2]).sum()) == 1 and int(torch.isfinite(batch[1]).sum()) == 5


def test_draw_is_the_inverse_cdf():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25], [0.2, 0.2, 0.2, 0.2, 0.2]])
    for u in (0.0, 0.1, 0.2499, 0.25, 0.5, 0.7499, 0.75, 0.9999, 1 - 2 ** -24):
        got = draw(probs, torch.tensor([u, u])).tolist()
        for row, g in zip(probs.tolist(), got):  # reference: first index whose cumulative mass exceeds u
            acc, want = 0.0, None
            for j, q in enumerate(row):
                acc += q
                if acc > u and q > 0 and want is None:
                    want = j
            assert g == (want if want is not None else max(j for j, q in enumerate(row) if q > 0)), (u, row)
    assert 0 not in draw(probs[:1].expand(1000, 5), torch.rand(1000)).tolist()  # zero mass: never drawn


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    probs = (logits / 0.8).softmax(-1)[0]
    g = torch.Generator().manual_seed(3)
    s = SamplingBatch(torch.tensor([0.8]), generators=[g])
    n = 4000
    counts = Counter(int(sample(logits, s).ids[0]) for _ in range(n))
    chi2 = sum((counts[j] - n * float(probs[j])) ** 2 / (n * float(probs[j])) for j in range(4))
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    assert counts[4] == 0


def test_logprobs_are_the_models_distribution():
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    s = SamplingBatch(torch.tensor([0.0, 1.0, 0.0]), generators=[None, torch.Generator().manual_seed(0), None],
                      logit_bias=torch.zeros(3, 30).index_fill_(1, torch.tensor([7]), 50.0), top_logprobs=3)
    out = sample(logits, s)
    ref = torch.log_softmax(logits.double(), -1)
    assert out.ids.tolist() == [7, 7, 7]  # the bias decides the token...
    torch.testing.assert_close(out.logprobs.double(), ref[:, 7], atol=1e-5, rtol=0)  # ...not the log-prob
    top = ref.topk(3, -1)
    assert out.top_ids.tolist() == top.indices.tolist()
    torch.testing.assert_close(out.top_logprobs.double(), top.values, atol=1e-5, rtol=0)


# -- the scheduler: a mixed batch equals each request alone ------------------------------------------


def mixed_requests(tok) -> list[tuple[list[str], SamplingParams, list[int] | None]]:
    """(prompts, params, seeds): every kind of setting, different lengths and budgets."""
    G = SamplingParams
    return [
        ([PROMPTS[0]], G(max_new_tokens=30, temperature=0, ignore_eos=True), None),
        ([PROMPTS[1]], G(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=5, ignore_eos=True), None),
        ([PROMPTS[2]], G(max_new_tokens=25, temperature=0, presence_penalty=1.5, frequency_penalty=0.5,
                         logit_bias={tok.encode("e")[-1]: 3.0}, ignore_eos=True), None),
        ([PROMPTS[3]] * 3, G(max_new_tokens=20, temperature=1.0, top_k=40, seed=11, ignore_eos=True), None),
        ([PROMPTS[4]], G(max_new_tokens=40, temperature=0, repetition_penalty=1.4, logprobs=2), None),
        ([PROMPTS[1], PROMPTS[2]], G(max_new_tokens=18, temperature=0.7, stop=["e", "a"], seed=2), None),
        ([PROMPTS[0]], G(max_new_tokens=8, temperature=1.2, logprobs=0, ignore_eos=True), [123]),
    ]


def test_mixed_batch_equals_each_request_alone(tiny):
    loaded, gen = tiny
    requests = mixed_requests(loaded.tokenizer)
    with torch_threads(1):
        alone = [gen.start(p, params, seeds).run() for p, params, seeds in requests]
        sched_gen = Generator(loaded.model, loaded.tokenizer)
        sizes: list[int] = []

        def recording_step(tokens, *args):
            sizes.append(tokens.shape[0])
            return sched_gen._forward(tokens, *args)

        sched_gen._step = recording_step
        scheduler = Scheduler(sched_gen, max_slots=16)
        results: list = [None] * len(requests)
        first_is_decoding = threading.Event()

        def client(i: int) -> None:
            if i:  # the others join while the first is decoding, one after another
                first_is_decoding.wait(30)
                time.sleep(0.002 * i)
            prompts, params, seeds = requests[i]
            g = sched_gen.start(prompts, params, seeds)
            streamed = ["" for _ in prompts]
            for n, step in enumerate(scheduler.submit(g)):
                for j, piece in enumerate(step):
                    streamed[j] += piece
                if n == 2:
                    first_is_decoding.set()
            results[i] = (g.completions, streamed)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        scheduler.close()
    assert max(sizes) >= 4 and len(set(sizes)) >= 3, f"never really batched: {sizes}"
    for i, ((done, streamed), expected) in enumerate(zip(results, alone)):
        assert [c.token_ids for c in done] == [c.token_ids for c in expected], i
        assert [c.text for c in done] == [c.text for c in expected] == streamed, i
        assert [c.finish_reason for c in done] == [c.finish_reason for c in expected], i
        if expected[0].logprobs is not None:
            for a, b in zip(done, expected):
                assert [e.token for e in a.logprobs] == [e.token for e in b.logprobs]
                assert [[t for t, _ in e.top] for e in a.logprobs] == [[t for t, _ in e.top] for e in b.logprobs]
                torch.testing.assert_close(torch.tensor([e.logprob for e in a.logprobs]),
                                           torch.tensor([e.logprob for e in b.logprobs]), atol=1e-4, rtol=0)
    # the settings really differ: n = 3 samples differ, stops cut, logprobs came back
    assert len({tuple(c.token_ids) for c in results[3][0]}) == 3
    assert any(c.finish_reason == "stop" and len(c.token_ids) < 18 for c in results[5][0])
    assert len(results[4][0][0].logprobs) >= 1 and len(results[4][0][0].logprobs[0].top) == 2


def test_seeded_sampling_reproduces_in_any_company(tiny):
    loaded, gen = tiny
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=42, ignore_eos=True)
    alone = gen.generate([PROMPTS[0]], params)[0].token_ids
    assert gen.generate([PROMPTS[0]], params)[0].token_ids == alone
    crowd = gen.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], params, seeds=[1, 42, 2])
    assert crowd[1].token_ids == alone
    other = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16, temperature=1.0, seed=43, ignore_eos=True))
    assert other[0].token_ids != alone


def test_one_forward_per_decode_step_for_all_requests(tiny):
    loaded, _ = tiny
    with torch_threads(1):
        gen = Generator(loaded.model, loaded.tokenizer)
        calls = []
        gen._step = lambda tokens, *a: calls.append(tokens.shape[0]) or gen._forward(tokens, *a)
        scheduler = Scheduler(gen, max_slots=8)
        params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
        generations = [gen.start([p], params) for p in (PROMPTS * 2)[:8]]
        tickets = [scheduler.submit(g) for g in generations]  # all arrive within a step or two
        for t in tickets:
            for _ in t:
                pass
        scheduler.close()
    assert all(len(t.generation.completions[0].token_ids) == 20 for t in tickets)
    # 8 requests x 19 decode steps would be 152 forwards one at a time; batched it is ~19 (+ a few
    # while the later requests join)
    assert len(calls) <= 25 and max(calls) == 8, calls


def test_cancel_frees_the_slot_at_the_next_step(tiny):
    loaded, _ = tiny
    with torch_threads(1):
        gen = Generator(loaded.model, loaded.tokenizer)
        scheduler = Scheduler(gen, max_slots=2)
        long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
        a, b = scheduler.submit(gen.start([PROMPTS[0]], long)), scheduler.submit(gen.start([PROMPTS[1]], long))
        steps_a = iter(a)
        next(steps_a)
        b.cancel()
        deadline = time.monotonic() + 10
        while scheduler.stats["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        # b left while a is still decoding: its slot was freed between two of a's steps
        assert scheduler.stats["cancelled"] == 1 and not a.generation.done and len(scheduler.batch.rows) <= 1
        c = scheduler.submit(gen.start([PROMPTS[2]], SamplingParams(max_new_tokens=3, temperature=0)))
        assert len(list(c)) >= 1 and c.generation.completions[0].completion_tokens <= 3
        a.cancel()
        deadline = time.monotonic() + 10
        while scheduler.stats["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = dict(scheduler.stats)
        scheduler.close()
    assert b.generation.completions[0].completion_tokens < 200
    assert stats == {"running": 0, "waiting": 0, "completed": 1, "cancelled": 2, "failed": 0}


def test_full_queue_is_refused_with_a_retry_hint(tiny):
    loaded, _ = tiny
    with torch_threads(1):
        gen = Generator(loaded.model, loaded.tokenizer)
        scheduler = Scheduler(gen, max_slots=1, max_queue=1)
        long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
        running = scheduler.submit(gen.start([PROMPTS[0]], long))
        steps = iter(running)  # kept: a dropped iterator cancels its request
        next(steps)  # admitted: the one slot is busy
        waiting = scheduler.submit(gen.start([PROMPTS[1]], long))  # the one queue place
        with pytest.raises(ServerBusy) as info:
            scheduler.submit(gen.start([PROMPTS[2]], long))
        assert info.value.retry_after >= 1
        with pytest.raises(Exception, match="at most 1"):  # more rows than slots: never admissible
            scheduler.submit(gen.start([PROMPTS[2]] * 2, long))
        running.cancel()
        waiting.cancel()
        scheduler.close()


# -- greedy with OpenAI's options == a reference loop over the uncached model ------------------------


def reference_decode(model, prompt: list[int], params: SamplingParams, eos: int) -> list[int]:
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(params.max_new_tokens):
            logits = model(torch.tensor([seq]))[0, -1]
            tok = int(reference_process(logits, prompt, out, params).argmax())
            out.append(tok)
            seq.append(tok)
            if tok == eos:
                break
    return out


def test_greedy_with_penalties_and_bias_equals_reference_loop(tiny):
    loaded, gen = tiny
    model, tok = loaded.model, loaded.tokenizer
    ids = tok.encode(PROMPTS[0], bos=True)
    plain = gen.generate([ids], SamplingParams(max_new_tokens=30, temperature=0))[0].token_ids
    favourite = Counter(plain).most_common(1)[0][0]
    for params in (SamplingParams(max_new_tokens=30, temperature=0, presence_penalty=2.0),
                   SamplingParams(max_new_tokens=30, temperature=0, frequency_penalty=1.5),
                   SamplingParams(max_new_tokens=30, temperature=0, logit_bias={favourite: -100.0, 40: 4.0}),
                   SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=1.5, presence_penalty=-0.5)):
        got = gen.generate([ids], params)[0].token_ids
        assert got == reference_decode(model, ids, params, tok.eos_id), params
        assert got != plain, params  # the option changed the path


def test_terminal_chat_runs_on_the_scheduler(tiny):
    """`openllama chat` hands its session a Scheduler: same replies as the generator alone."""
    from openllama.serve.prompting import ChatPrompter
    from openllama.serve.terminal import ChatSession

    loaded, gen = tiny
    prompter = ChatPrompter(loaded.tokenizer)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    with torch_threads(1):
        scheduler = Scheduler(Generator(loaded.model, loaded.tokenizer), max_slots=1)
        served, alone = ChatSession(scheduler, prompter, params), ChatSession(gen, prompter, params)
        for text in ("hello there", "and again"):
            assert "".join(served.send(text)) == "".join(alone.send(text))
        scheduler.close()
    assert served.history == alone.history and len(served.history) == 4
    assert scheduler.stats["completed"] == 2
