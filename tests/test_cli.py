"""The command line on a tiny model directory saved by the test."""

from __future__ import annotations

import json

import pytest

from extended_mind.cli import main

from .conftest import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_memorize_then_ask_json(model_dir, tmp_path, capsys):
    doc = tmp_path / "facts.txt"
    doc.write_text("The museum opens at nine. Tickets cost four euros.")
    assert main(["memorize", str(doc), "--out", str(tmp_path / "mem"), "--model", str(model_dir)]) == 0
    assert "saved" in capsys.readouterr().out
    # the memory remembers its model: no --model needed
    assert main(["ask", "--memory", str(tmp_path / "mem"), "--json", "--max-new-tokens", "4", "When?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "citations", "retrievals"}
    assert out["citations"] and out["citations"][0]["doc"] == "facts.txt"


def test_ask_with_text_files_and_plain_output(model_dir, tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Alpha document.")
    b.write_text("Beta document.")
    args = [
        "ask",
        "--model",
        str(model_dir),
        "--memory",
        str(a),
        "--memory",
        str(b),
        "--topk",
        "3",
        "--max-new-tokens",
        "3",
        "--uncertainty-threshold",
        "0",
        "Which?",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Cited spans" in out and "re-retrieved step 0" in out


def test_cli_errors_are_one_clear_line(model_dir, tmp_path, capsys):
    assert main(["ask", "--model", str(model_dir), "--memory", str(tmp_path / "nope"), "q"]) == 2
    assert "memory path not found" in capsys.readouterr().err
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01")
    assert main(["memorize", str(tmp_path / "bin.dat"), "--out", str(tmp_path / "m"), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "binary" in err and "Traceback" not in err
    assert main(["ask", "--model", str(model_dir), "--topk", "-2", "q"]) == 2
    assert "topk must be an integer >= 0" in capsys.readouterr().err
