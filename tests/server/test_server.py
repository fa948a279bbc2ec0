"""The OpenAI-compatible server on a tiny random model: the official client on a live socket, memories through the
API (persisting across restarts), auth, limits, 32 concurrent requests, and answers equal to the Python API's."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from extended_mind import ExtendedMind
from extended_mind.cli import main
from extended_mind.server import ServerConfig, create_app
from extended_mind.server.background import BackgroundServer
from tests.conftest import byte_tokenizer, tiny_model

MODEL = "tiny-llama"
DOCS = {
    "cats": ["The cat sat on the mat. It was a red mat.", "Cats sleep sixteen hours a day."],
    "ships": ["The ship sailed at dawn. Its captain was Ada."],
    "rain": ["Rain fell for nine days in the valley of Oru."],
}


@pytest.fixture(scope="module")
def mind() -> ExtendedMind:
    return ExtendedMind(tiny_model("llama"), byte_tokenizer(), MODEL)


def make_app(mind: ExtendedMind, root: Path, **limits):
    config = ServerConfig(memory_dir=root, **({"max_tokens": 16, "default_max_tokens": 8} | limits))
    return create_app(mind, config)


def sse_events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def create_memories(client, names=DOCS) -> None:
    for name in names:
        r = client.post("/v1/memories", json={"name": name, "documents": DOCS[name]})
        assert r.status_code == 201, r.text


def chat_body(question: str, memory=None, **kw) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 8} | kw
    if memory is not None:
        body["memory"] = memory
    return body


def test_openai_client_chat_and_completions_with_citations(mind, tmp_path):
    app = make_app(mind, tmp_path / "mem")
    with BackgroundServer(app) as server:
        create_memories(httpx.Client(base_url=server.url))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == [MODEL]

        plain = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Where did the cat sit?"}], max_tokens=6
        )
        assert plain.choices[0].message.role == "assistant"
        assert plain.usage.completion_tokens == 6 and plain.choices[0].finish_reason == "length"
        assert plain.model_extra["citations"] == []

        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where?"}],
            max_tokens=6,
            extra_body={"memory": ["cats", "ships"], "topk": 4},
        )
        citations = answer.model_extra["citations"]
        assert citations, "memory was used, so the answer must cite it"
        texts = {(n, f"doc{i}"): t for n in ("cats", "ships") for i, t in enumerate(DOCS[n])}
        for c in citations:
            assert c["memory"] in ("cats", "ships") and c["weight"] > 0
            assert c["text"] == texts[(c["memory"], c["document"])][c["start"] : c["end"]].strip()
        passages = answer.model_extra["passages"]  # the text of the blocks the answer read
        assert len(passages) >= 1 and answer.model_extra["blocks_read"] >= 1
        for p in passages:
            assert p["text"] == texts[(p["memory"], p["document"])][p["start"] : p["end"]]

        # the same request through the Python API gives the same tokens and citations
        from extended_mind.base.prompting import DEFAULT_MEMORY_AT, encode_messages

        ids = encode_messages(
            mind.tokenizer,
            [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where?"}],
            DEFAULT_MEMORY_AT,
        )
        view = app.state.library.view(["cats", "ships"])
        direct = mind.generate(ids, memory=view, topk=4, max_new_tokens=6)
        assert answer.choices[0].message.content == direct.text
        assert [c["weight"] for c in citations] == [c.weight for c in direct.citations]

        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where?"}],
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"memory": ["cats", "ships"], "topk": 4},
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == direct.text
        final = chunks[-1]
        assert final.choices[0].finish_reason == "length" and final.usage.completion_tokens == 6
        assert final.model_extra["citations"] == citations
        assert all(c.model_extra["token_citations"] for c in chunks[:-1]), "each token says what it read"

        text = client.completions.create(model=MODEL, prompt="The cat", max_tokens=5, extra_body={"memory": "cats"})
        assert text.object == "text_completion" and text.model_extra["citations"]
        assert (
            text.choices[0].text
            == mind.generate("The cat", memory=app.state.library.view(["cats"]), chat=False, max_new_tokens=5).text
        )
        pieces = list(
            client.completions.create(
                model=MODEL, prompt="The cat", max_tokens=5, stream=True, extra_body={"memory": "cats"}
            )
        )
        assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text


def test_32_concurrent_requests_get_their_own_answers(mind, tmp_path):
    app = make_app(mind, tmp_path / "mem")
    with BackgroundServer(app) as server:
        http = httpx.Client(base_url=server.url, timeout=120)
        create_memories(http)
        memories = [None, "cats", "ships", "rain", ["cats", "rain"]]
        jobs = [(f"Question {i}: what happened?", memories[i % len(memories)], i % 3 == 0) for i in range(32)]

        def ask(job, client=None) -> tuple[str, list]:
            question, memory, stream = job
            client = client or httpx.Client(base_url=server.url, timeout=120)
            r = client.post("/v1/chat/completions", json=chat_body(question, memory, stream=stream))
            assert r.status_code == 200, r.text
            if not stream:
                body = r.json()
                return body["choices"][0]["message"]["content"], body["citations"]
            events = sse_events(r.text)
            assert events[-1] == "[DONE]"
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
            return text, events[-2]["citations"]

        one_by_one = [ask(job, http) for job in jobs]
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(ask, jobs))
        assert together == one_by_one
        # different memories really give different answers, so a mix-up would show
        assert len({text for text, _ in one_by_one}) > 5
        for (_, memory, _), (_, citations) in zip(jobs, together):
            wanted = {memory} if isinstance(memory, str) else set(memory or [])
            assert {c["memory"] for c in citations} <= wanted and (bool(citations) == bool(wanted))


def test_client_disconnect_mid_stream_frees_the_model(mind, tmp_path):
    app = make_app(mind, tmp_path / "mem", max_tokens=400)
    with BackgroundServer(app) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        with http.stream("POST", "/v1/chat/completions", json=chat_body("go on", max_tokens=400, stream=True)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        r = http.post("/v1/chat/completions", json=chat_body("next"))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_memories_are_managed_and_persist_across_restarts(mind, tmp_path):
    root = tmp_path / "mem"
    with TestClient(make_app(mind, root)) as client:
        r = client.post(
            "/v1/memories",
            data={"name": "notes", "stream": "true", "text": "Pasted note: the door code is 4471."},
            files=[
                ("files", ("a.txt", b"First file. Apples are green.", "text/plain")),
                ("files", ("b.txt", "Second file. Caf\u00e9 au lait.".encode(), "text/plain")),
            ],
        )
        assert r.status_code == 201
        events = sse_events(r.text)
        progress = [e for e in events[:-1] if e["object"] == "memory.progress"]
        assert progress and progress[-1]["done"] == progress[-1]["total"]
        made = events[-2]
        assert made["object"] == "memory" and [d["id"] for d in made["data"]] == ["doc0", "a.txt", "b.txt"]

        added = client.post("/v1/memories/notes/documents", json={"documents": [{"id": "c", "text": "Third."}]})
        assert added.status_code == 201
        doc = client.get("/v1/memories/notes/documents/b.txt").json()
        assert doc["text"] == "Second file. Caf\u00e9 au lait." and doc["name"] == "b.txt"
        assert client.delete("/v1/memories/notes/documents/a.txt").json()["deleted"] is True
        create_memories(client, ["cats", "ships"])
        assert client.delete("/v1/memories/ships").status_code == 200
        before = client.post("/v1/chat/completions", json=chat_body("door code?", "notes")).json()
        listed = client.get("/v1/memories").json()["data"]
        assert [m["id"] for m in listed] == ["cats", "notes"]

    with TestClient(make_app(mind, root)) as client:  # a restart: a new app over the same directory
        assert [m["id"] for m in client.get("/v1/memories").json()["data"]] == ["cats", "notes"]
        assert client.get("/v1/memories/ships").status_code == 404
        assert [d["id"] for d in client.get("/v1/memories/notes").json()["data"]] == ["doc0", "b.txt", "c"]
        assert client.get("/v1/memories/notes/documents/a.txt").status_code == 404
        after = client.post("/v1/chat/completions", json=chat_body("door code?", "notes")).json()
        assert after["choices"] == before["choices"] and after["citations"] == before["citations"]
    assert sorted(p.name for p in root.iterdir()) == ["cats", "notes"]


def test_document_text_is_never_read_as_a_server_path(mind, tmp_path):
    with TestClient(make_app(mind, tmp_path / "mem")) as client:
        r = client.post("/v1/memories", json={"name": "m", "documents": ["/etc/hostname"]})
        assert r.status_code == 201
        assert client.get("/v1/memories/m/documents/doc0").json()["text"] == "/etc/hostname"


def error_of(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body["message"]


def test_auth_is_enforced(mind, tmp_path):
    app = create_app(mind, ServerConfig(memory_dir=tmp_path / "mem", api_key="s3cret", max_tokens=8))
    with BackgroundServer(app) as server:
        http = httpx.Client(base_url=server.url)
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/v1/memories"),
            ("POST", "/v1/chat/completions"),
            ("DELETE", "/v1/memories/x"),
            ("GET", "/openapi.json"),
            ("GET", "/docs"),
        ]:
            assert "API key" in error_of(http.request(method, path), 401)
            assert "API key" in error_of(http.request(method, path, headers={"Authorization": "Bearer wrong"}), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert http.get("/v1/models", headers=good).status_code == 200
        assert http.get("/").status_code == 200  # the page holds no data; its API calls carry the key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()
        ok = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert ok.usage.completion_tokens == 2


def test_serve_refuses_a_public_address_without_a_key(capsys, monkeypatch):
    monkeypatch.delenv("EXTENDED_MIND_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_oversized_and_malformed_requests_get_4xx(mind, tmp_path):
    app = make_app(mind, tmp_path / "mem", max_body_bytes=20_000, max_document_chars=5_000, max_memory_tokens=3_000)
    with TestClient(app) as client:
        create_memories(client, ["cats"])
        assert "limit" in error_of(client.post("/v1/memories", json={"name": "big", "text": "x" * 30_000}), 413)
        assert "characters" in error_of(client.post("/v1/memories", json={"name": "big", "text": "x" * 6_000}), 413)
        five = {"name": "big", "documents": ["y" * 4_000] * 4}
        assert "3000" in error_of(client.post("/v1/memories", json=five), 413)
        assert "limit of 16" in error_of(client.post("/v1/chat/completions", json=chat_body("q", max_tokens=17)), 400)
        assert "JSON" in error_of(
            client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}), 400
        )
        assert error_of(client.post("/v1/chat/completions", json={"model": MODEL}), 400)
        assert error_of(client.post("/v1/chat/completions", json=chat_body("q", topk=-1)), 400)
        other_model = chat_body("q") | {"model": "gpt-4"}
        assert "not served" in error_of(client.post("/v1/chat/completions", json=other_model), 404)
        assert "no memory" in error_of(client.post("/v1/chat/completions", json=chat_body("q", "nope")), 404)
        assert "exists" in error_of(client.post("/v1/memories", json={"name": "cats", "text": "again"}), 409)
        assert error_of(client.post("/v1/memories", json={"name": "../escape", "text": "a"}), 400)
        assert error_of(client.post("/v1/memories", json={"name": ".hidden", "text": "a"}), 400)
        assert client.get("/v1/memories/..%2Fescape").status_code in (400, 404)
        assert error_of(client.post("/v1/memories", json={"name": "e", "text": "   "}), 400)
        binary = client.post("/v1/memories", data={"name": "bin"}, files=[("files", ("x.bin", b"\x00\x01\xff", "a/b"))])
        assert "x.bin" in error_of(binary, 400)
        assert error_of(client.post("/v1/memories", content=b"name=a", headers={"Content-Type": "text/plain"}), 415)
        assert error_of(client.post("/v1/chat/completions", json=chat_body("q") | {"n": 2}), 400)
        assert error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]}), 400)
        long_prompt = chat_body("z" * 600)  # the tiny model's window is 512 tokens
        assert "window" in error_of(client.post("/v1/chat/completions", json=long_prompt), 400)
        assert error_of(client.delete("/v1/memories/cats/documents/none"), 404)
        assert [m["id"] for m in client.get("/v1/memories").json()["data"]] == ["cats"]
    assert not (tmp_path / "escape").exists()


def test_pasted_text_over_a_megabyte_reaches_the_memory_limits(mind, tmp_path):
    app = make_app(mind, tmp_path / "mem", max_document_chars=3_000_000, max_memory_tokens=10_000)
    with TestClient(app) as client:
        r = client.post("/v1/memories", data={"name": "big", "text": "word " * 300_000})  # 1.5 MB form field
        assert "10000" in error_of(r, 413)  # refused by the memory limit, not by the form parser


def test_small_gaps_chunked_body_names_paths_and_racing_deletes(mind, tmp_path):
    app = make_app(mind, tmp_path / "mem", max_body_bytes=20_000)
    with TestClient(app) as client:
        create_memories(client, ["cats"])

        def chunked():  # no Content-Length: the body is counted as it arrives
            for _ in range(30):
                yield b"x" * 1_000

        r = client.post("/v1/memories", content=chunked(), headers={"Content-Type": "application/json"})
        assert "limit of 20000 bytes" in error_of(r, 413)
        assert r.json()["error"]["code"] == "body_too_large"
        assert "invalid memory name" in error_of(client.get("/v1/memories/cats%0A"), 400)  # '$' took a newline
        # two deletes of one document at once: one removes it, the other finds nothing to remove (404, not 400)
        added = client.post("/v1/memories/cats/documents", json={"documents": [{"text": "one more", "id": "extra"}]})
        assert added.status_code == 201, added.text
        with ThreadPoolExecutor(2) as pool:
            codes = sorted(pool.map(lambda _: client.delete("/v1/memories/cats/documents/extra").status_code, [0, 1]))
        assert codes == [200, 404]
    # a damaged memory: the error names the file, not where the server keeps it
    path = tmp_path / "mem" / "cats"
    manifest = json.loads((path / "manifest.json").read_text())
    damaged = path / manifest["documents"][0]["file"]
    data = damaged.read_bytes()
    damaged.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with TestClient(make_app(mind, tmp_path / "mem")) as client:
        ask = client.post("/v1/chat/completions", json=chat_body("Where did the cat sit?", "cats"))
        message = error_of(ask, 500)
        assert "checksum" in message and str(tmp_path) not in message, message


def test_an_unknown_argument_is_refused_by_name_and_openai_ones_are_accepted(mind, tmp_path):
    with TestClient(make_app(mind, tmp_path / "mem")) as client:
        create_memories(client, ["cats"])
        typo = chat_body("Where did the cat sit?") | {"memroy": "cats"}
        r = client.post("/v1/chat/completions", json=typo)
        assert error_of(r, 400) == "Unrecognized request argument supplied: memroy"
        assert r.json()["error"]["param"] == "memroy"
        text = {"model": MODEL, "prompt": "The cat", "max_tokens": 2, "memory": "cats", "temprature": 0}
        assert "temprature" in error_of(client.post("/v1/completions", json=text), 400)
        sdk = chat_body("Where?", "cats") | {"top_p": 0.9, "presence_penalty": 0.1, "frequency_penalty": 0.0,
                                             "user": "u1", "response_format": {"type": "text"}}  # fmt: skip
        assert client.post("/v1/chat/completions", json=sdk).status_code == 200
        del text["temprature"]
        assert client.post("/v1/completions", json=text | {"echo": False, "best_of": 1}).status_code == 200
