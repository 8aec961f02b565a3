"""The server, for real: uvicorn on 127.0.0.1, driven by the official `openai` client, httpx and
gradio_client. Covers streaming and not, chat and completions, n > 1, seeds, stop strings, usage,
every kind of bad input, auth, queue limits, 16 concurrent streams and client disconnects."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from openllama.generate import Generator, SamplingParams, load_for_inference
from openllama.serve.app import build_app
from openllama.serve.engine import Engine, Limits
from openllama.serve.prompting import ChatPrompter
from serving_helpers import make_tiny_model_dir, running_server, torch_threads

openai = pytest.importorskip("openai")

KEY = "sk-test-123"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with torch_threads(1):
        yield make_tiny_model_dir(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    """The full app (API + Gradio page), no API key."""
    with torch_threads(1):
        engine = Engine(load_for_inference(model_dir), Limits(max_new_tokens=200, max_concurrent=32))
        with running_server(build_app(engine)) as url:
            yield url, engine
        engine.close()


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(model_dir):
    """Our generator on the same weights, to check what the server answers."""
    loaded = load_for_inference(model_dir)
    return Generator(loaded.model, loaded.tokenizer), ChatPrompter(loaded.tokenizer), loaded.tokenizer


def test_models_and_health(server, client):
    url, engine = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_chat_greedy_matches_generator_and_counts_usage(client, reference):
    gen, prompter, _ = reference
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    ids = prompter.encode(HELLO)
    expected = gen.generate([ids], SamplingParams(max_new_tokens=12, temperature=0),
                            strip_prefix=prompter.reply_prefix(HELLO))[0]
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == expected.text and choice.finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == expected.completion_tokens
    assert r.usage.total_tokens == len(ids) + expected.completion_tokens


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=30, temperature=0.9, seed=42)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seed_reproduces_and_n_gives_several_choices(client):
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=20, temperature=1.0, n=3, seed=7)
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # each choice samples with its own generator
    other = client.chat.completions.create(**{**kwargs, "seed": 8, "n": 1})
    assert other.choices[0].message.content != texts[0]
    assert a.usage.prompt_tokens == b.usage.prompt_tokens < a.usage.total_tokens <= a.usage.prompt_tokens + 3 * 20


def test_completions_stream_n_and_echo(client, reference):
    gen, _, tok = reference
    prompt = "To be, or not to be"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    expected = gen.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0))[0]
    assert r.object == "text_completion" and r.choices[0].text == expected.text
    assert r.usage.prompt_tokens == len(tok.encode(prompt, bos=True))
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompt)
    batch = client.completions.create(model="tiny", prompt=[prompt, "Hi"], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == r.choices[0].text[:len(batch.choices[0].text)]


def test_stop_strings(client):
    free = client.completions.create(model="tiny", prompt="Hi", max_tokens=40, temperature=0).choices[0].text
    stop = free[8:11]
    cut = client.completions.create(model="tiny", prompt="Hi", max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_concurrent_mixed_requests_equal_each_alone(server, reference):
    """Greedy requests of different lengths, budgets and stops, 12 at once (streamed and not, chat
    and completions): each gets exactly what the request gets alone."""
    url, engine = server
    gen, prompter, _ = reference
    cases = []
    for i in range(12):
        messages = [{"role": "user", "content": f"Tell me about thing number {i} " + "and more " * (i % 4)}]
        stop = ["e"] if i % 3 == 0 else None
        cases.append((messages, 6 + 3 * i, stop, i % 2 == 0, i % 5 == 0))

    def alone(messages, max_tokens, stop, chat) -> str:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop=stop or ())
        if chat:
            prefix = prompter.reply_prefix(messages)
            return gen.generate([prompter.encode(messages)], params, strip_prefix=prefix)[0].text
        return gen.generate([messages[0]["content"]], params)[0].text

    async def one(aclient, messages, max_tokens, stop, stream, chat):
        kw = dict(model="tiny", max_tokens=max_tokens, temperature=0, stop=stop, stream=stream)
        if chat:
            r = await aclient.chat.completions.create(messages=messages, **kw)
            if not stream:
                return r.choices[0].message.content
            return "".join([c.choices[0].delta.content or "" async for c in r if c.choices])
        r = await aclient.completions.create(prompt=messages[0]["content"], **kw)
        if not stream:
            return r.choices[0].text
        return "".join([c.choices[0].text async for c in r if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, m, n, st, stream, not plain)
                                          for m, n, st, stream, plain in cases))

    got = asyncio.run(main())
    assert got == [alone(m, n, st, not plain) for m, n, st, _, plain in cases]


def test_openai_options_are_applied(client, reference):
    """presence / frequency penalties and logit_bias change the reply exactly as the generator
    applies them (checked against a reference loop in test_scheduler.py); seed reproduces."""
    gen, prompter, tok = reference
    ids = prompter.encode(HELLO)

    def expected(**kw):
        return gen.generate([ids], SamplingParams(max_new_tokens=16, temperature=0, **kw),
                            strip_prefix=prompter.reply_prefix(HELLO))[0].text

    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0)
    assert plain.choices[0].message.content == expected()
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 1.5}, {"logit_bias": {"40": 8.0}}):
        r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0, **kw)
        ours = {k: ({int(t): v for t, v in v.items()} if k == "logit_bias" else v) for k, v in kw.items()}
        assert r.choices[0].message.content == expected(**ours) != plain.choices[0].message.content, kw
    banned = client.completions.create(model="tiny", prompt="Hi", max_tokens=10, temperature=0,
                                       logit_bias={str(t): -100 for t in range(tok.vocab_size) if t != 40})
    assert banned.choices[0].text == tok.decode([40] * 10)


def test_logprobs_chat_completions_and_stream(client, reference, model_dir):
    """Log-probabilities equal the uncached model's log-softmax at each generated token, the top
    ones are the most likely tokens, and a stream carries the same entries."""
    import torch

    gen, prompter, tok = reference
    model = gen.model
    ids = prompter.encode(HELLO)
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    reply = gen.generate([ids], SamplingParams(max_new_tokens=8, temperature=0))[0]
    tokens = [t for t in reply.token_ids if t != tok.eos_id]
    assert len(content) == len(tokens)
    seq = list(ids)
    with torch.no_grad():
        for entry, t in zip(content, tokens):
            ref = torch.log_softmax(model(torch.tensor([seq]))[0, -1].double(), -1)
            assert abs(entry.logprob - float(ref[t])) < 1e-4
            assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or not entry.bytes
            top = ref.topk(3)
            assert [x.logprob for x in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
            seq.append(t)
    streamed = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                                   logprobs=True, top_logprobs=3, stream=True))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in entries] == [(e.token, round(e.logprob, 4)) for e in content]
    legacy = client.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    chat_bytes = bytes(b for e in content for b in e.bytes).decode("utf-8", "replace")
    assert chat_bytes.strip() == r.choices[0].message.content.strip()  # the bytes spell the reply


BAD = [
    # (endpoint, body or raw bytes, status, param)
    ("chat/completions", b'{"messages": [', 400, None),
    ("chat/completions", b'[1, 2]', 400, None),
    ("chat/completions", {"messages": "hi"}, 400, "messages"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("chat/completions", {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ("chat/completions", {"messages": HELLO, "temperature": 2.5}, 400, "temperature"),
    ("chat/completions", {"messages": HELLO, "top_p": 1.5}, 400, "top_p"),
    ("chat/completions", {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"messages": HELLO, "max_tokens": 201}, 400, "max_tokens"),
    ("chat/completions", {"messages": HELLO, "n": 0}, 400, "n"),
    ("chat/completions", {"messages": HELLO, "n": 17}, 400, "n"),
    ("chat/completions", {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    ("chat/completions", {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat/completions", {"messages": HELLO, "seed": 1.5}, 400, "seed"),
    ("chat/completions", {"messages": HELLO, "bogus": 1}, 400, "bogus"),
    ("chat/completions", {"messages": HELLO, "logprobs": "yes"}, 400, "logprobs"),
    ("chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat/completions", {"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"messages": HELLO, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("chat/completions", {"messages": HELLO, "frequency_penalty": "high"}, 400, "frequency_penalty"),
    ("chat/completions", {"messages": HELLO, "logit_bias": {"5": 101}}, 400, "logit_bias.5"),
    ("chat/completions", {"messages": HELLO, "logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ("chat/completions", {"messages": HELLO, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("completions", {"prompt": "Hi", "logprobs": 21}, 400, "logprobs"),
    ("chat/completions", {"messages": HELLO, "model": "gpt-4"}, 404, "model"),
    ("chat/completions", {"messages": [{"role": "user", "content": "word " * 300}]}, 400, "messages"),
    ("completions", {"prompt": 3}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": [[1, 2], [999999]]}, 400, "prompt"),
    ("completions", {"prompt": "word " * 300}, 400, "prompt"),
    ("completions", {"prompt": "x " * 100, "max_tokens": 180}, 400, "max_tokens"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, endpoint, body, status, param):
    url, _ = server
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/{endpoint}", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if "word " in raw.decode():
        assert err["code"] == "context_length_exceeded"


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=9)
    assert "temperature" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)


def test_not_json_body_is_400(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", content=b"messages=hi",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_sixteen_concurrent_streams_then_health(server):
    url, engine = server

    async def one(aclient, i):
        stream = await aclient.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=16, temperature=0.8,
            seed=i, stream=True)
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(16)))

    before = dict(engine.stats)
    results = asyncio.run(main())
    assert len(results) == 16 and all(finish in ("stop", "length") for _, finish in results)
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    assert health["completed"] - before["completed"] == 16 and health["failed"] == 0


def _wait_idle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health").json()
        if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_client_disconnect_cancels_generation(server):
    url, engine = server
    before = _wait_idle(url)
    body = {"prompt": "Hi", "max_tokens": 200, "temperature": 0.0, "stream": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for line in (next(lines) for _ in range(4)) if line.startswith("data:")]
            assert got  # it was streaming when we hung up
    after = _wait_idle(url)
    assert after["running"] == 0
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]


def test_gradio_chat_function(server, reference):
    from gradio_client import Client

    url, _ = server
    gen, prompter, _ = reference
    gc = Client(url + "/", verbose=False)
    reply = gc.predict("Hello, who are you?", "", 0.0, 0.9, 12, api_name="/respond")
    expected = gen.start([prompter.encode(HELLO)], SamplingParams(max_new_tokens=12, temperature=0),
                         strip_prefix=prompter.reply_prefix(HELLO)).run()[0].text
    assert reply == expected
    single = gc.predict("Hello, who are you?", False, 0.0, 0.9, 12, api_name="/answer")
    assert single == expected
    raw = gc.predict("To be, or not to be", True, 0.0, 0.9, 10, api_name="/answer")
    assert raw == gen.generate(["To be, or not to be"], SamplingParams(max_new_tokens=10, temperature=0))[0].text


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """API only, with a key, one slot and no queue; a long context so one request can keep the
    slot busy for a few seconds."""
    with torch_threads(1):
        model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("guarded") / "long", max_seq_len=4096)
        engine = Engine(load_for_inference(model_dir), Limits(max_new_tokens=4000, max_concurrent=1, max_queue=0),
                        name="guarded")
        with running_server(build_app(engine, api_key=KEY, ui=False)) as url:
            yield url
        engine.close()


def test_api_key_is_required(guarded):
    url = guarded
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as good:
        r = good.chat.completions.create(model="guarded", messages=HELLO, max_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_full_queue_gets_429(guarded):
    url = guarded
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Hi", "max_tokens": 4000, "temperature": 0.0, "stream": True}
    with httpx.Client(timeout=30, headers=headers) as h:
        with h.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # keep it: dropping the iterator closes the response (a disconnect)
            next(lines)  # the one slot is now busy
            busy = h.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(busy.headers["retry-after"]) >= 1
            streamed = h.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
            assert streamed.status_code == 429  # refused before any event of a stream went out
    _wait_idle(url)
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers).status_code == 200


def test_cli_serves_an_exported_hf_model(model_dir, tmp_path):
    """`openllama serve --model <exported HF dir>` in its own process answers the openai client
    and serves the chat page; it listens on 127.0.0.1 by default."""
    import os
    import subprocess
    import sys

    from openllama.hf import export_hf
    from serving_helpers import free_port

    hf_dir = export_hf(model_dir, tmp_path / "exported")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "openllama.cli", "serve", "--model", str(hf_dir), "--port", str(port),
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
            assert [m.id for m in c.models.list().data] == ["exported"]
            r = c.chat.completions.create(model="exported", messages=HELLO, max_tokens=5, temperature=0)
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "gradio" in page.text.lower()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
