"""The server on SmolLM2-135M-Instruct: a document uploaded through the API answers a question through the official
openai client, and the answer cites the sentence that holds the (counterfactual) fact."""

from __future__ import annotations

from importlib.resources import files

import httpx
import openai

from extended_mind.server import ServerConfig, create_app
from extended_mind.server.background import BackgroundServer
from tests.models.test_smollm2_memory import TERMITES


def test_smollm2_server_answers_from_an_uploaded_document_with_citations(smol, tmp_path):
    article = (files("extended_mind") / "data" / "aardwolf.txt").read_text()  # edited: 80,000 termites a night
    app = create_app(smol, ServerConfig(memory_dir=tmp_path / "mem"))
    with BackgroundServer(app) as server:
        r = httpx.post(
            server.url + "/v1/memories",
            data={"name": "animals"},
            files=[("files", ("aardwolf.txt", article.encode(), "text/plain"))],
            timeout=600,
        )
        assert r.status_code == 201, r.text
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600)
        model = client.models.list().data[0].id
        plain = client.completions.create(model=model, prompt=TERMITES, max_tokens=12, stop=["\n"])
        assert "80,000" not in plain.choices[0].text  # the model alone does not know the edited fact
        answer = client.completions.create(
            model=model, prompt=TERMITES, max_tokens=12, stop=["\n"], extra_body={"memory": "animals"}
        )
        assert "80,000" in answer.choices[0].text, answer.choices[0].text
        top = answer.model_extra["citations"][0]
        assert (top["memory"], top["document"]) == ("animals", "aardwolf.txt") and "80,000" in top["text"]
        assert article[top["start"] : top["end"]].strip() == top["text"]
