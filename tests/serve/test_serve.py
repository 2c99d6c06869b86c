"""The OpenAI-compatible server, driven by the real `openai` client and by raw HTTP for the error cases.

One server (SmolLM2, eager decode, batch 4, context 512) runs in a thread for the whole module; greedy
answers are compared with the Python API's, which generates one sequence at a time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from helpers.serving import running_server  # noqa: E402

import leanlm  # noqa: E402

KEY = "sk-test"


@pytest.fixture(scope="module")
def llm(smol_path: Path) -> leanlm.LLM:
    return leanlm.load(smol_path, compile="off", progress=False)


@pytest.fixture(scope="module")
def server(llm: leanlm.LLM) -> Iterator[str]:
    with running_server(llm, api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def greedy(llm: leanlm.LLM, messages: list[dict], n: int) -> str:
    return "".join(llm.chat(messages, max_tokens=n, temperature=0))


QUESTIONS = ["What is the capital of France?", "Name three colors.", "Count from one to five.",
             "Write a haiku about rain.", "What is 12 times 12?", "Say hello in Spanish."]


def test_models_and_health(client: openai.OpenAI, server: str) -> None:
    assert [m.id for m in client.models.list().data] == ["smol"]
    assert httpx.get(server + "/health").json()["status"] == "ok"  # no key needed


def test_chat_greedy_equals_the_python_api(client: openai.OpenAI, llm: leanlm.LLM) -> None:
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    r = client.chat.completions.create(model="smol", messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == greedy(llm, msgs, 24)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(llm.chat_prompt(msgs)) and r.usage.completion_tokens > 0


def test_concurrent_requests_each_get_their_own_answer(client: openai.OpenAI, llm: leanlm.LLM) -> None:
    """Six requests on four batch rows: they join and leave the batch, and each answer equals the lone one."""
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": QUESTIONS[i]}],
                                           max_tokens=20 + 3 * i, temperature=0)
        results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, q in enumerate(QUESTIONS):
        assert results[i] == greedy(llm, [{"role": "user", "content": q}], 20 + 3 * i), q


def test_streaming_with_usage(client: openai.OpenAI, llm: leanlm.LLM) -> None:
    msgs = [{"role": "user", "content": QUESTIONS[3]}]
    stream = client.chat.completions.create(model="smol", messages=msgs, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(llm, msgs, 16)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_and_seeded_sampling(client: openai.OpenAI) -> None:
    kw = dict(model="smol", messages=[{"role": "user", "content": "Tell me a word."}], max_tokens=8,
              temperature=1.0, seed=7, n=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_completions_prompt_forms(client: openai.OpenAI, llm: leanlm.LLM) -> None:
    text = "The capital of France is"
    ids = llm.encode_prompt(text)
    expect = "".join(llm.generate(text, max_tokens=8, temperature=0))
    for prompt in (text, [text], ids, [ids]):
        r = client.completions.create(model="smol", prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == expect
        assert r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model="smol", prompt=[text, "One, two,"], max_tokens=4, temperature=0, n=2)
    assert len(r.choices) == 4 and r.choices[0].text == r.choices[1].text == expect[:len(r.choices[0].text)]


def test_stop_strings(client: openai.OpenAI, llm: leanlm.LLM) -> None:
    full = "".join(llm.generate("One, two, three,", max_tokens=12, temperature=0))
    stop = full.strip().split()[1]
    r = client.completions.create(model="smol", prompt="One, two, three,", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert full.startswith(r.choices[0].text)


def test_tokenize_detokenize(server: str, llm: leanlm.LLM) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    t = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    assert t["tokens"] == llm.encode_prompt("Hello world") and t["count"] == len(t["tokens"])
    d = httpx.post(server + "/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert d["prompt"].endswith("Hello world")


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),  # missing model
    ({"model": "smol", "messages": "hi"}, 400, "messages"),  # wrong type
    ({"model": "smol", "messages": []}, 400, "messages"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "smol", "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a+$"}}}},
     400, "response_format"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools"),
])
def test_bad_requests_get_openai_errors(server: str, body: object, status: int, param: str | None) -> None:
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + "/v1/chat/completions", content=data, headers=h)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_api_key_is_required(server: str) -> None:
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_disconnect_mid_stream_frees_the_row(server: str, client: openai.OpenAI) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "smol", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=h) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break  # one token in: hang up
    deadline = time.time() + 10
    while httpx.get(server + "/health").json()["active"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(server + "/health").json()["active"] == 0
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.choices[0].message.content  # still serving


def test_metrics_count_requests_tokens_and_latencies(server: str, client: openai.OpenAI) -> None:
    def value(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or
                   line.startswith(name + "{"))

    before = httpx.get(server + "/metrics").text
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0)
    httpx.post(server + "/v1/chat/completions", json={"model": "nope", "messages": []},
               headers={"Authorization": f"Bearer {KEY}"})
    after = httpx.get(server + "/metrics").text
    gen = r.usage.completion_tokens
    assert value(after, "leanlm_generated_tokens_total") - value(before, "leanlm_generated_tokens_total") == gen
    assert value(after, "leanlm_prompt_tokens_total") - value(before, "leanlm_prompt_tokens_total") == \
        r.usage.prompt_tokens
    ok = 'leanlm_requests_total{route="/v1/chat/completions",status="200"}'
    bad = 'leanlm_requests_total{route="/v1/chat/completions",status="400"}'
    assert value(after, ok) - value(before, ok) == 1 and value(after, bad) - value(before, bad) == 1
    assert value(after, "leanlm_time_to_first_token_seconds_count") > \
        value(before, "leanlm_time_to_first_token_seconds_count")
    assert value(after, "leanlm_inter_token_latency_seconds_count") - \
        value(before, "leanlm_inter_token_latency_seconds_count") >= gen - 1
    for gauge in ("leanlm_queue_length", "leanlm_batch_size", "leanlm_active_sequences"):
        assert gauge in after


def test_chat_page_is_served(server: str) -> None:
    r = httpx.get(server + "/")  # no key needed for the page itself
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "stream: true" in r.text


def loglikelihood(llm: leanlm.LLM, context: list[int], cont: list[int]) -> float:
    """The Python API's log P(cont | context)."""
    import torch

    ids = context + cont
    logp = torch.log_softmax(llm.logits(ids).float(), -1)
    return sum(float(logp[len(context) + j - 1, t]) for j, t in enumerate(cont))


def local_greedy(llm: leanlm.LLM, context: list[int], cont: list[int]) -> bool:
    logits = llm.logits(context + cont)
    return all(int(logits[len(context) + j - 1].argmax()) == t for j, t in enumerate(cont))


def test_echo_logprobs_score_the_prompt_like_lm_eval(client: openai.OpenAI, llm: leanlm.LLM) -> None:
    """What lm-evaluation-harness's local-completions does for a multiple-choice question: send context +
    continuation tokens with echo, logprobs=1, temperature 0 (max_tokens 0 in old versions, 1 in new), sum the
    continuation's token_logprobs, and check greediness against top_logprobs. Each loglikelihood must equal the
    Python API's to 1e-4, and the answer picked must be the same."""
    context = llm.encode_prompt("Question: What is the capital of France?\nAnswer:")
    options = [" Paris", " London", " a banana"]
    served, local = [], []
    for k, opt in enumerate(options):
        cont = llm.tokenizer.encode(opt, add_bos=False)
        r = client.completions.create(model="smol", prompt=context + cont, max_tokens=k % 2, temperature=0,
                                      logprobs=1, echo=True)
        lp = r.choices[0].logprobs
        n = len(context) + len(cont)
        assert len(lp.token_logprobs) == n + (k % 2) and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None and all(len(d) == 1 for d in lp.top_logprobs[1:n])
        served.append(sum(lp.token_logprobs[len(context):n]))
        local.append(loglikelihood(llm, context, cont))
        greedy = all(max(d, key=d.get) == t for d, t in zip(lp.top_logprobs[len(context):n], lp.tokens[len(context):n]))
        assert greedy == local_greedy(llm, context, cont)
        assert r.choices[0].text.startswith(llm.tokenizer.decode(context + cont, skip_special=False))
    assert max(abs(a - b) for a, b in zip(served, local)) < 1e-4
    assert served.index(max(served)) == local.index(max(local)) == 0


def test_chat_logprobs(client: openai.OpenAI, llm: leanlm.LLM) -> None:
    msgs = [{"role": "user", "content": QUESTIONS[4]}]
    r = client.chat.completions.create(model="smol", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:  # greedy: the chosen token is the most likely one, and listed first
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert abs(c.top_logprobs[0].logprob - c.logprob) < 1e-6 and c.logprob <= 0
    ids = llm.chat_prompt(msgs)
    first = llm.tokenizer.encode(content[0].token, add_bos=False)
    assert abs(loglikelihood(llm, ids, first[:1]) - content[0].logprob) < 1e-3  # batched bf16 decode vs fp32-out


def test_bad_logprob_requests(server: str) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    for body, param in (({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
                        ({"prompt": "hi", "echo": True, "stream": True}, "echo")):
        r = httpx.post(server + "/v1/completions", json={"model": "smol", **body}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_soak_mixed_good_bad_and_abandoned_requests(server: str, llm: leanlm.LLM) -> None:
    """200 requests from 8 concurrent clients: greedy chats and completions (each must equal the Python API's
    answer), malformed or invalid ones (each must get its 4xx), and streams abandoned after the first token.
    Afterwards no row is held and the server still answers."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    h = {"Authorization": f"Bearer {KEY}"}
    expect = {q: greedy(llm, [{"role": "user", "content": q}], 6) for q in QUESTIONS}
    bad = [(b"{oops", 400), (json.dumps({"model": "x", "messages": [{"role": "user", "content": "a"}]}), 404),
           (json.dumps({"model": "smol", "messages": [{"role": "user", "content": "a"}], "n": 0}), 400),
           (json.dumps({"model": "smol", "messages": [{"role": "user", "content": "w " * 700}]}), 400)]

    def one(k: int) -> str | None:
        rng = random.Random(k)
        kind = rng.choice(["chat", "chat", "bad", "abandon", "nokey"])
        with httpx.Client(base_url=server, timeout=120) as c:
            if kind == "chat":
                q = rng.choice(QUESTIONS)
                r = c.post("/v1/chat/completions", headers=h, json={
                    "model": "smol", "messages": [{"role": "user", "content": q}], "max_tokens": 6, "temperature": 0})
                got = r.json()["choices"][0]["message"]["content"]
                return None if got == expect[q] else f"{q!r}: {got!r} != {expect[q]!r}"
            if kind == "bad":
                body, status = rng.choice(bad)
                r = c.post("/v1/chat/completions", headers={**h, "Content-Type": "application/json"}, content=body)
                return None if r.status_code == status and "error" in r.json() else f"bad: {r.status_code}"
            if kind == "nokey":
                r = c.post("/v1/chat/completions", json={"model": "smol", "messages": []})
                return None if r.status_code == 401 else f"nokey: {r.status_code}"
            with c.stream("POST", "/v1/chat/completions", headers=h, json={
                    "model": "smol", "messages": [{"role": "user", "content": "Tell a long story."}],
                    "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    if '"content"' in line and '""' not in line:
                        break
            return None

    with ThreadPoolExecutor(8) as pool:
        failures = [f for f in pool.map(one, range(200)) if f]
    assert not failures, failures[:5]
    deadline = time.time() + 15
    while httpx.get(server + "/health").json()["active"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(server + "/health").json() | {"status": "ok"} == {"status": "ok", "model": "smol",
                                                                         "active": 0, "queued": 0}
    r = httpx.post(server + "/v1/chat/completions", headers=h, json={
        "model": "smol", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 6, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == expect[QUESTIONS[0]]
