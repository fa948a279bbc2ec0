"""Continuous batching in the server: concurrent requests with their own memories and options decode together
(prompts joining running rows prefilled in chunks) and get the answers they get one by one; a client that
disconnects leaves the batch."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from extended_mind import ExtendedMind
from extended_mind.engine.batching import DecodeBatch
from extended_mind.server import ServerConfig, create_app
from extended_mind.server.background import BackgroundServer
from tests.conftest import byte_tokenizer, tiny_model
from tests.server.test_server_ops import _samples, wait_until

MODEL = "tiny-llama"
DOCS = {"cats": ["The cat sat on the mat. It was a red mat."], "rain": ["Rain fell for nine days in Oru."]}


@pytest.fixture(scope="module")
def mind() -> ExtendedMind:
    return ExtendedMind(tiny_model("llama"), byte_tokenizer(), MODEL)


def test_concurrent_requests_are_batched_and_answer_as_sequential_ones(mind, tmp_path, monkeypatch):
    sizes, prefilling = [], []
    step = DecodeBatch.step
    monkeypatch.setattr(
        DecodeBatch,
        "step",
        lambda self: sizes.append(len(self)) or prefilling.append(len(self.prefilling)) or step(self),
    )
    # prompts longer than 8 tokens that join a running batch are prefilled 8 tokens per step (chunked prefill)
    app = create_app(mind, ServerConfig(memory_dir=tmp_path / "mem", max_tokens=32, max_batch=4, prefill_chunk=8))
    bodies = [
        {"model": MODEL, "prompt": f"Question {i}: where", "max_tokens": 6 + i % 5,
         "memory": ["cats", "rain", None][i % 3], **({"temperature": 0.7, "seed": i} if i % 4 == 3 else {})}
        for i in range(12)
    ]  # fmt: skip
    bodies = [{k: v for k, v in b.items() if v is not None} for b in bodies]
    with BackgroundServer(app) as server:
        client = httpx.Client(base_url=server.url, timeout=120)
        for name, docs in DOCS.items():
            assert client.post("/v1/memories", json={"name": name, "documents": docs}).status_code == 201
        sequential = [client.post("/v1/completions", json=b).json() for b in bodies]
        sizes.clear()
        with ThreadPoolExecutor(12) as pool:
            concurrent = list(pool.map(lambda b: client.post("/v1/completions", json=b).json(), bodies))
    assert max(sizes) == 4  # decoded together, up to --max-batch
    assert max(prefilling) >= 1  # requests joined running rows and were prefilled in chunks
    for a, b in zip(sequential, concurrent):
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        assert a["usage"] == b["usage"] and a["citations"] == b["citations"]


def test_a_client_that_disconnects_leaves_the_batch(mind, tmp_path, monkeypatch):
    steps = []
    step = DecodeBatch.step
    monkeypatch.setattr(DecodeBatch, "step", lambda self: steps.append(len(self)) or step(self))
    app = create_app(mind, ServerConfig(memory_dir=tmp_path / "mem", max_tokens=400))
    body = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 400, "stream": True}
    with BackgroundServer(app) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the first token arrived
        # the connection is closed: the row leaves at a following step and the queue empties
        metrics = lambda: _samples(client.get("/metrics").text)  # noqa: E731
        wait_until(lambda: metrics()[("extended_mind_queue_depth", ())] == 0)
        time.sleep(0.2)
        assert len(steps) < 400, len(steps)  # it stopped decoding long before its 400 tokens
        assert metrics()[("extended_mind_batch_size", ())] == 0
        done = client.post("/v1/completions", json=body | {"stream": False, "max_tokens": 3}).json()
        assert done["usage"]["completion_tokens"] == 3


def test_a_non_streamed_request_whose_client_leaves_stops_decoding(mind, tmp_path, monkeypatch):
    steps = []
    step = DecodeBatch.step

    def slow_step(self):  # 400 steps take seconds: the client leaves long before
        steps.append(len(self))
        time.sleep(0.01)
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", slow_step)
    app = create_app(mind, ServerConfig(memory_dir=tmp_path / "mem", max_tokens=400))
    body = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 400}
    with BackgroundServer(app) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
        client = httpx.Client(base_url=server.url, timeout=60)
        metrics = lambda: _samples(client.get("/metrics").text)  # noqa: E731
        wait_until(lambda: metrics()[("extended_mind_batch_size", ())] == 0 and len(steps) > 0)
        time.sleep(0.3)
        assert len(steps) < 200, len(steps)  # it left the batch within a poll of the disconnect
        done = client.post("/v1/completions", json=body | {"max_tokens": 3}).json()
        assert done["usage"]["completion_tokens"] == 3
