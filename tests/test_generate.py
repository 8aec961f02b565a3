"""Generation: cached decode equals the uncached model, batches equal single prompts, sampling
is seeded and matches transformers' processors, stops, streaming text, loading, the CLIs."""

from __future__ import annotations

import io
import json

import pytest
import torch

from openllama.generate import (Generator, SamplingParams, TextStream, apply_repetition_penalty, filter_top_k_top_p,
                                load_for_inference)
from openllama.serve.prompting import ChatPrompter, PromptTooLong
from serving_helpers import make_tiny_model_dir, torch_threads

PROMPTS = ["To be, or not to be", "Hi", "What light through yonder window breaks? It is the east"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with torch_threads(1):
        model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
        loaded = load_for_inference(model_dir)
        yield model_dir, loaded, Generator(loaded.model, loaded.tokenizer)


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """The slow obvious way: the whole sequence through the model, no cache, every step."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


def test_cached_greedy_equals_uncached_model(tiny):
    _, loaded, gen = tiny
    ids = loaded.tokenizer.encode(PROMPTS[0], bos=True)
    out = gen.generate([ids], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == reference_greedy(loaded.model, ids, 24)
    assert out.finish_reason == "length" and out.completion_tokens == 24 and out.prompt_tokens == len(ids)


def test_batch_equals_each_prompt_alone(tiny):
    _, _, gen = tiny
    greedy = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    batch = gen.generate(PROMPTS, greedy)
    assert [c.token_ids for c in batch] == [gen.generate([p], greedy)[0].token_ids for p in PROMPTS]
    # sampled too: one generator per row, so row i with seed s equals the prompt alone with seed s
    sampled = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, ignore_eos=True)
    batch = gen.generate(PROMPTS, sampled, seeds=[11, 12, 13])
    alone = [gen.generate([p], sampled, seeds=[s])[0] for p, s in zip(PROMPTS, [11, 12, 13])]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert [c.text for c in batch] == [c.text for c in alone]


def test_samples_of_one_prompt_share_one_prefill(tiny):
    # GRPO asks for G samples of each prompt: the prompt runs through the model once, its
    # keys/values are copied to the G rows, and every row still samples as if alone
    _, loaded, gen = tiny
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[0]]
    seeds = [5, 6, 7, 8, 9, 10]
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    widths = []
    hook = loaded.model.register_forward_pre_hook(lambda m, args: widths.append(tuple(args[0].shape)))
    try:
        batch = gen.generate(prompts, sampled, seeds=seeds)
    finally:
        hook.remove()
    alone = [gen.generate([p], sampled, seeds=[s])[0] for p, s in zip(prompts, seeds)]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in batch[:3]}) == 3  # same prompt, other seeds: other samples
    prefills = [w for w in widths if w[1] > 1]
    assert sorted(w[0] for w in prefills) == [1, 1]  # one row per distinct prompt (two lengths)


def test_seeded_sampling_reproduces_and_seeds_differ(tiny):
    _, _, gen = tiny
    p = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=100, seed=7, ignore_eos=True)
    a, b = gen.generate([PROMPTS[0]], p)[0], gen.generate([PROMPTS[0]], p)[0]
    assert a.token_ids == b.token_ids
    c = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, temperature=1.0, top_k=100, seed=8,
                                                   ignore_eos=True))[0]
    assert c.token_ids != a.token_ids


def test_top_k_1_and_tiny_top_p_are_greedy(tiny):
    _, _, gen = tiny
    greedy = gen.generate([PROMPTS[2]], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))[0]
    for p in (SamplingParams(max_new_tokens=16, temperature=1.5, top_k=1, seed=1, ignore_eos=True),
              SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=2, ignore_eos=True)):
        assert gen.generate([PROMPTS[2]], p)[0].token_ids == greedy.token_ids


def test_processors_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    history = torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, history, True)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3), theirs)
    for k, p in ((5, 1.0), (0, 0.8), (0, 0.3), (10, 0.5)):
        expected = logits.clone()
        if k:
            expected = TopKLogitsWarper(k)(history, expected)
        if p < 1:
            expected = TopPLogitsWarper(p)(history, expected)
        ours = filter_top_k_top_p(logits, k, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(expected)), (k, p)


def test_repetition_penalty_changes_greedy_path(tiny):
    _, _, gen = tiny
    plain = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))[0]
    penalised = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=5.0,
                                                          ignore_eos=True))[0]
    assert penalised.token_ids != plain.token_ids
    # a strong penalty makes repeats rarer than in the plain greedy path
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))


def test_eos_stops_and_is_not_text(tiny):
    _, loaded, _ = tiny
    probe = Generator(loaded.model, loaded.tokenizer)
    ids = loaded.tokenizer.encode(PROMPTS[0], bos=True)
    free = probe.generate([ids], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))[0]
    probe.eos_id = free.token_ids[5]  # pretend the 6th token is EOS
    first = free.token_ids.index(probe.eos_id)
    out = probe.generate([ids], SamplingParams(max_new_tokens=12, temperature=0))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.text == loaded.tokenizer.decode(free.token_ids[:first], skip_special=True)


def test_stop_strings_cut_and_are_never_streamed(tiny):
    _, _, gen = tiny
    free = gen.generate([PROMPTS[1]], SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))[0]
    text = free.text
    stop = text[10:13]
    assert len(stop) == 3
    expected = text[:text.index(stop)]
    params = SamplingParams(max_new_tokens=40, temperature=0, stop=["\x00never", stop], ignore_eos=True)
    pieces = list(gen.stream(PROMPTS[1], params))
    assert "".join(pieces) == expected
    done = gen.generate([PROMPTS[1]], params)[0]
    assert done.text == expected and done.finish_reason == "stop"


def test_stream_never_splits_characters(tiny):
    _, loaded, _ = tiny
    tok = loaded.tokenizer
    text = " naïve café 世界 and 🎉 emoji, ünïcödé 𝄞 done"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # CJK and emoji fall back to several byte tokens each
    stream = TextStream(tok, tok.encode("Say:", bos=True))
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    held = [p for p in pieces if p == ""]
    assert held, "multi-byte characters must be held back until complete"


def test_stream_holds_back_possible_stop_prefix(tiny):
    _, loaded, _ = tiny
    tok = loaded.tokenizer
    stream = TextStream(tok, [tok.bos_id], stop=["the end"])
    out = ""
    for i in tok.encode("one two the ending"):
        out += stream.push(i)
        assert not out.endswith("the"), "a possible start of the stop string was shown early"
    assert stream.stopped and stream.text == "one two "
    stream = TextStream(tok, [tok.bos_id], stop=["the end"])
    out = "".join(stream.push(i) for i in tok.encode("one two the")) + stream.finish()
    assert out == "one two the" and not stream.stopped


def test_reply_prefix_is_left_out(tiny):
    _, loaded, _ = tiny
    tok = loaded.tokenizer
    prompter = ChatPrompter(tok)
    messages = [{"role": "user", "content": "hi"}]
    assert prompter.reply_prefix(messages) == " "  # 'system: ' ends the prompt; its space goes to the reply
    assert tok.decode(prompter.encode(messages)).endswith("system:")
    for text, expected in ((" Good day to you", "Good day to you"), ("Good day", "Good day"), (" ", "")):
        stream = TextStream(tok, prompter.encode(messages), strip_prefix=" ")
        out = "".join(stream.push(i) for i in tok.encode(text)) + stream.finish()
        assert out == expected == stream.text


def test_cancel_stops_between_steps(tiny):
    _, _, gen = tiny
    g = gen.start([PROMPTS[0]], SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True))
    steps = 0
    for _ in g:
        steps += 1
        if steps == 3:
            g.cancel()
    assert steps <= 4 and g.completions[0].completion_tokens == 3


def test_bad_sampling_params_name_the_field():
    from openllama.errors import UserError

    for kwargs, name in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                         ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_k": -2}, "top_k")):
        with pytest.raises(UserError, match=name):
            SamplingParams(**kwargs)


def test_prompt_longer_than_context_is_refused(tiny):
    from openllama.errors import UserError

    _, loaded, gen = tiny
    with pytest.raises(UserError, match="context"):
        gen.start([[loaded.tokenizer.bos_id] * 300], SamplingParams())
    # a prompt that nearly fills the context gets only the room that is left
    out = gen.generate([[loaded.tokenizer.bos_id] * 250], SamplingParams(max_new_tokens=50, temperature=0,
                                                                         ignore_eos=True))[0]
    assert out.completion_tokens == 6 and out.finish_reason == "length"


def test_conversation_truncates_oldest_turns(tiny):
    _, loaded, _ = tiny
    prompter = ChatPrompter(loaded.tokenizer)
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " + "word " * 10},
                  {"role": "assistant", "content": f"answer {i} " + "reply " * 10}]
    messages = [system] + turns + [{"role": "user", "content": "last question"}]
    full = prompter.encode(messages)
    kept, ids, dropped = prompter.fit(messages, len(full) - 1)
    assert kept[0] == system and kept[-1]["content"] == "last question" and dropped == 2
    assert kept[1]["role"] == "user" and kept[1]["content"].startswith("question 1")
    assert ids == prompter.encode(kept) and len(ids) < len(full)
    kept, ids, _ = prompter.fit(messages, len(prompter.encode([system, messages[-1]])))
    assert kept == [system, messages[-1]]
    with pytest.raises(PromptTooLong):
        prompter.fit([{"role": "user", "content": "word " * 400}], 100)
    # the rendered prompt is the training template's text, ending with the assistant's cue
    assert prompter.render(messages[-1:]).endswith("user: last question\nsystem: ")


def test_loads_run_dir_step_dir_and_hf_export(tiny, tmp_path):
    from openllama.hf import export_hf
    from openllama.model import save_model

    model_dir, loaded, gen = tiny
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    expected = gen.generate([PROMPTS[0]], params)[0].token_ids

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000010"
    save_model(loaded.model, step / "model")
    loaded.tokenizer.save(run)
    (step / "COMPLETE").write_text("")
    (run / "checkpoints" / "latest").write_text("step_0000010\n")
    hf_dir = export_hf(model_dir, tmp_path / "hf")
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.model").is_file()
    for path in (run, step, hf_dir):
        other = load_for_inference(path)
        assert other.tokenizer.fingerprint == loaded.tokenizer.fingerprint
        assert Generator(other.model, other.tokenizer).generate([PROMPTS[0]], params)[0].token_ids == expected


def test_load_errors_are_user_errors(tmp_path):
    from openllama.errors import UserError

    with pytest.raises(UserError, match="no such directory"):
        load_for_inference(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model"):
        load_for_inference(tmp_path / "empty")


def test_generate_cli_streams_and_batches(tiny, capsys):
    from openllama.cli import main

    model_dir, _, gen = tiny
    expected = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0))[0].text
    with torch_threads(1):  # the CLI's --threads sets torch's global; put it back afterwards
        assert main(["generate", "--model", str(model_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "12",
                     "--temperature", "0", "--threads", "1"]) == 0
        assert capsys.readouterr().out == expected + "\n"
        assert main(["generate", "--model", str(model_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                     "--max-new-tokens", "5", "--temperature", "0", "--json", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:2] and all(r["completion_tokens"] <= 5 for r in rows)
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_terminal_chat_multi_turn_reset_and_quit(tiny):
    from openllama.serve.terminal import ChatSession, chat_loop

    _, loaded, gen = tiny
    session = ChatSession(gen, ChatPrompter(loaded.tokenizer), SamplingParams(max_new_tokens=8, temperature=0))
    stdin = io.StringIO("hello there\nand again\n/reset\nhello there\n/quit\nnever read\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    chat_loop(session, stdin, stdout, stderr)
    replies = [line.removeprefix("model> ") for line in stdout.getvalue().splitlines()]
    assert len(replies) == 3
    assert replies[0] == replies[2]  # after /reset the same question gets the same greedy answer
    assert "[conversation reset]" in stderr.getvalue()
    assert stdin.read() == "never read\n"  # /quit left the loop
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    # the second turn saw the first one: its prompt is the two-turn conversation
    prompter = ChatPrompter(loaded.tokenizer)
    two_turns = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": replies[0]},
                 {"role": "user", "content": "and again"}]
    expected = gen.start([prompter.encode(two_turns)], SamplingParams(max_new_tokens=8, temperature=0),
                         strip_prefix=prompter.reply_prefix(two_turns)).run()[0]
    assert replies[1] == expected.text

