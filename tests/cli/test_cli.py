"""The command line on a tiny model directory saved by the test."""

from __future__ import annotations

import json

import pytest

from extended_mind import Memory
from extended_mind.cli import main
from tests.conftest import byte_tokenizer, tiny_model


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
    assert len(json.loads((tmp_path / "mem" / "manifest.json").read_text())["calibrations"]) == 1  # saved with it
    # the memory remembers its model: no --model needed
    assert main(["ask", "--memory", str(tmp_path / "mem"), "--json", "--max-new-tokens", "4", "When?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "citations", "retrievals", "blocks_read", "passages", "warnings"}
    assert out["blocks_read"] == 1 and out["warnings"] == []  # a memory that fits the slots is read whole
    assert [p["text"] for p in out["passages"]] == [doc.read_text()]
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
    assert main(["serve", "--model", str(model_dir), "--prefill-chunk", "-1"]) == 2  # refused before serving
    assert "--prefill-chunk must be 0" in capsys.readouterr().err


def test_memory_commands_edit_a_saved_memory(model_dir, tmp_path, capsys):
    a, b, b2 = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "b2.txt"
    a.write_text("Alpha document.")
    b.write_text("Beta document.")
    b2.write_text("Beta document, second edition.")
    mem = str(tmp_path / "mem")
    assert main(["memory", "create", mem, str(a), "--model", str(model_dir), "--storage", "int8"]) == 0
    assert main(["memory", "create", mem, str(a), "--model", str(model_dir)]) == 2
    assert "already holds a memory" in capsys.readouterr().err
    assert main(["memory", "add", mem, str(b), "--id", "beta"]) == 0  # the model comes from the memory
    assert main(["memory", "replace", mem, "beta", str(b2)]) == 0
    assert len(json.loads((tmp_path / "mem" / "manifest.json").read_text())["calibrations"]) == 1  # of the new text
    assert main(["memory", "ls", mem, "--json"]) == 0
    capsys.readouterr()
    assert main(["memory", "ls", mem, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["chars"]) for r in rows] == [("a.txt", 15), ("beta", 30)]
    assert main(["memory", "rm", mem, "a.txt"]) == 0
    assert main(["memory", "rm", mem, "nope"]) == 2
    assert "no document 'nope'" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["memory", "info", mem, "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 1 and info["tokens"] == 30 and info["storage"] == "int8" and info["verified"]
    assert main(["memory", "info", str(tmp_path)]) == 2
    assert "no saved memory" in capsys.readouterr().err


def test_chat_memorizes_turns_that_leave_the_context(model_dir, tmp_path, capsys, monkeypatch):
    import io

    lines = "".join(f"message number {i}\n" for i in range(4)) + "/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    history = tmp_path / "history"
    args = ["chat", "--model", str(model_dir), "--max-new-tokens", "4", "--max-context-tokens", "60"]
    assert main([*args, "--history", str(history)]) == 0
    err = capsys.readouterr().err
    assert "memorized 1 old turn(s)" in err
    ids = [d.id for d in Memory.load(history).documents]
    assert ids[0] == "turn-0" and len(ids) >= 2
    monkeypatch.setattr("sys.stdin", io.StringIO("one more\n"))
    assert main([*args, "--history", str(history)]) == 0
    assert f"({len(ids)} earlier turns in memory" in capsys.readouterr().err


def test_cli_checks_input_before_loading_the_model_and_never_replaces_a_memory_silently(model_dir, tmp_path, capsys):
    doc = tmp_path / "notes.txt"
    doc.write_text("The museum opens at nine.")
    out = str(tmp_path / "mem")
    assert main(["memorize", str(doc), "--out", out, "--model", str(model_dir)]) == 0
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text("Something else entirely.")
    assert main(["memorize", str(other), "--out", out, "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "already holds a memory" in err and "--force" in err and "loading model" not in err
    assert [d.id for d in Memory.load(out).documents] == ["notes.txt"]  # untouched
    assert main(["memorize", str(other), "--out", out, "--model", str(model_dir), "--force"]) == 0
    assert [d.id for d in Memory.load(out).documents] == ["other.txt"]
    capsys.readouterr()
    for argv, message in [
        (["memorize", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "m2")], "not found"),
        (["ask", "--memory", str(tmp_path / "missing.txt"), "Q"], "not found"),
        (["ask", "--memory", out, "--topk", "-3", "Q"], "topk must be an integer >= 0"),
        (["ask", "--memory", out, "--topk", "100000", "Q"], "topk must be at most 1024"),
        (["ask", "--memory", str(doc), "--blocks", "-1", "Q"], "blocks must be an integer >= 0"),
    ]:
        assert main([*argv, "--model", str(model_dir)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "loading model" not in err, (argv, err)
