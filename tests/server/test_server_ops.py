"""Operations endpoints on a tiny model: /health while loading, after loading and after a failed load; Prometheus
/metrics parsed with the official parser; /tokenize and /detokenize round trips in vLLM's and llama.cpp's forms."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from extended_mind import ExtendedMind
from extended_mind.server import ServerConfig, create_app
from extended_mind.server.background import BackgroundServer
from tests.conftest import byte_tokenizer, tiny_model

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def mind() -> ExtendedMind:
    return ExtendedMind(tiny_model("llama"), byte_tokenizer(), MODEL)


def wait_until(check, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_health_is_503_while_loading_and_200_when_ready(mind, tmp_path):
    release = threading.Event()

    def slow_load() -> ExtendedMind:
        release.wait(30)
        return mind

    app = create_app(slow_load, ServerConfig(memory_dir=tmp_path / "mem"))
    with BackgroundServer(app) as server:
        client = httpx.Client(base_url=server.url)
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        refused = client.get("/v1/models")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        release.set()
        wait_until(lambda: client.get("/health").status_code == 200)
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_a_failed_load_is_reported_by_health(tmp_path):
    def broken() -> ExtendedMind:
        raise OSError("no model at /nowhere")

    app = create_app(broken, ServerConfig(memory_dir=tmp_path / "mem"))
    with BackgroundServer(app) as server:
        client = httpx.Client(base_url=server.url)
        wait_until(lambda: client.get("/health").json()["status"] != "loading")
        r = client.get("/health")
        assert r.status_code == 503 and "no model at /nowhere" in r.json()["error"]
        assert client.post("/v1/completions", json={}).status_code == 503


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_tokens_latency_and_memories(mind, tmp_path):
    client = TestClient(create_app(mind, ServerConfig(memory_dir=tmp_path / "mem", max_tokens=8)))
    assert client.post("/v1/memories", json={"name": "notes", "documents": ["The key is 41."]}).status_code == 201
    body = {"model": MODEL, "prompt": "The key is", "max_tokens": 4, "memory": "notes"}
    for _ in range(2):
        assert client.post("/v1/completions", json=body).status_code == 200
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        r.read()
    assert client.post("/v1/completions", json=body | {"model": "other"}).status_code == 404
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)
    assert m[("extended_mind_requests_total", (("route", "/v1/completions"), ("status", "200")))] == 3
    assert m[("extended_mind_requests_total", (("route", "/v1/completions"), ("status", "404")))] == 1
    assert m[("extended_mind_generated_tokens_total", ())] == 12
    assert m[("extended_mind_time_to_first_token_seconds_count", ())] == 3
    assert m[("extended_mind_time_per_output_token_seconds_count", ())] == 9
    assert m[("extended_mind_queue_depth", ())] == 0 and m[("extended_mind_batch_size", ())] == 0
    assert m[("extended_mind_memory_tokens", (("memory", "notes"),))] > 0


def test_tokenize_and_detokenize_round_trip(mind, tmp_path):
    client = TestClient(create_app(mind, ServerConfig(memory_dir=tmp_path / "mem")))
    text = "Memory, at token level."
    vllm = client.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert vllm["count"] == len(vllm["tokens"]) == len(text.encode()) and vllm["max_model_len"] == 512
    llama_cpp = client.post("/tokenize", json={"content": text}).json()
    assert llama_cpp["tokens"] == vllm["tokens"]
    back = client.post("/detokenize", json={"tokens": vllm["tokens"]}).json()
    assert back["prompt"] == back["content"] == text
    assert client.post("/tokenize", json={}).status_code == 400
    bad = client.post("/detokenize", json={"tokens": [1, 10**9]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]


def test_logprobs_in_openai_shapes_with_the_official_client(mind, tmp_path):
    import math

    import openai

    app = create_app(mind, ServerConfig(memory_dir=tmp_path / "mem", max_tokens=8))
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        messages = [{"role": "user", "content": "Where is the key?"}]
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, logprobs=True,
                                              top_logprobs=3)  # fmt: skip
        content = chat.choices[0].logprobs.content
        # a random model's tokens split UTF-8 characters: their bytes, joined, are the answer's bytes
        assert len(content) == 4
        answer = bytes(b for c in content for b in c.bytes).decode("utf-8", errors="replace")
        assert answer == chat.choices[0].message.content
        for c in content:  # greedy: the chosen token is the most likely one
            assert len(c.top_logprobs) == 3 and c.logprob <= 0
            assert math.isclose(c.logprob, c.top_logprobs[0].logprob, abs_tol=1e-6)
        plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        assert plain.choices[0].logprobs is None

        text = client.completions.create(model=MODEL, prompt="The key is", max_tokens=4, logprobs=2)
        lp = text.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
        assert all(len(alt) <= 2 for alt in lp.top_logprobs) and lp.text_offset[0] == 0

        streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, logprobs=True,
                                                  top_logprobs=2, stream=True)  # fmt: skip
        tokens = [c.choices[0].logprobs.content[0] for c in streamed if c.choices and c.choices[0].logprobs]
        assert [t.logprob for t in tokens] == [c.logprob for c in content]

        with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, top_logprobs=2)
        # logit_bias, OpenAI's way to restrict the answer to chosen tokens
        allowed = {"65": 100, "66": 100}
        forced = client.completions.create(model=MODEL, prompt="x", max_tokens=3, logit_bias=allowed)
        assert set(forced.choices[0].text) <= {mind.tokenizer.decode([65]), mind.tokenizer.decode([66])}
