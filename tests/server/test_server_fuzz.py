"""Property-based fuzzing of every operation in the server's OpenAPI schema (schemathesis): no input may cause a
5xx. Runs on a tiny random model with small limits, so generated requests stay fast."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from extended_mind import ExtendedMind
from extended_mind.server import ServerConfig, create_app
from tests.conftest import byte_tokenizer, tiny_model

_root = Path(tempfile.mkdtemp(prefix="extended-mind-fuzz-"))
_mind = ExtendedMind(tiny_model("llama"), byte_tokenizer(), "tiny-llama")
app = create_app(
    _mind,
    ServerConfig(
        memory_dir=_root, max_tokens=4, default_max_tokens=2, max_document_chars=2_000, max_memory_tokens=4_000
    ),
)
_mind.memorize("A memory the fuzzer can name: the sky is green.", progress=False).save(_root / "m")
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def _remove_memory_dir():
    """The app's memory directory is made at import (the schema needs the app): removed after this module."""
    yield
    shutil.rmtree(_root, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_causes_a_server_error(case):
    if isinstance(case.body, dict) and "model" in case.body:
        # random model names all end at the 404 check: name the served model so generation itself is fuzzed
        case.body["model"] = "tiny-llama"
        if "memory" in case.body and isinstance(case.body["memory"], str):
            case.body["memory"] = "m"
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
