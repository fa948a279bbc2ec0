"""The command line's parser: commands, their arguments, and the generation flags derived from the options."""

from __future__ import annotations

import argparse
from pathlib import Path

from extended_mind.bench import cli as bench_cli
from extended_mind.engine.options import (
    DEFAULT_STRIDE,
    DEFAULT_WINDOW,
    shared_options,
)
from extended_mind.memory.precision import STORAGE_DTYPES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="local model directory or hub id (default: SmolLM2-135M-Instruct, "
        "or the model a saved memory was built with)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        help="auto (default: on a CPU the fastest of int8 and int4 decode weights that agrees with float32 and decodes "
        "faster, measured once per CPU; bfloat16 on CUDA), float32, bfloat16, float16, int8, int4 or bfloat16-int8",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="decode steps that read no memory run a torch.compile'd forward (20 s to a few minutes to compile "
        "per process, steps about 1.1x faster at best; default: $EXTENDED_MIND_COMPILE, else off)",
    )
    p.add_argument(
        "--stride", type=int, default=None, help=f"new tokens per memorization step ({DEFAULT_STRIDE}: window/4)"
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help=f"context of each memorized token ({DEFAULT_WINDOW}, at most half the model's window)",
    )
    p.add_argument(
        "--storage", choices=STORAGE_DTYPES, default=None, help="precision of stored keys/values (the model's dtype)"
    )


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    for name, default, meta in shared_options():  # how a question reads memory: declared in engine/options.py
        shown = default if default is not None else ("off" if meta["choices"] is None else None)
        help_text = meta["help"] + (f" ({shown})" if shown is not None else "")
        p.add_argument("--" + name.replace("_", "-"), type=None if meta["choices"] else meta["kind"],
                       choices=meta["choices"], default=default, help=help_text)  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (64)")
    p.add_argument("--no-chat", action="store_true", help="send the question as raw text, without the chat template")
    p.add_argument("--answer-prefix", default="", help="text the answer starts with (helps small models)")
    p.add_argument("--stop", action="append", default=[], help="string that ends the answer (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extended-mind", description="Give a language model a memory of documents.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("memorize", help="memorize text files and save the memory to a directory")
    p.add_argument("files", nargs="+", type=Path, help="UTF-8 text files")
    p.add_argument("--out", required=True, type=Path, help="directory to write the memory to")
    p.add_argument("--force", action="store_true", help="replace the memory already saved in --out")
    _add_model_args(p)
    p = sub.add_parser("ask", help="answer a question from memories, with citations")
    p.add_argument("question")
    p.add_argument(
        "--memory",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="a saved memory directory or a text file (repeatable)",
    )
    _add_model_args(p)
    _add_generation_args(p)
    p = sub.add_parser("chat", help="chat on stdin; turns that leave the context are memorized, not dropped")
    p.add_argument("--memory", action="append", default=[], type=Path, metavar="PATH", help="documents (repeatable)")
    p.add_argument("--history", type=Path, default=None, help="directory that keeps the memorized turns (resumes)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-context-tokens", type=int, default=None, help="tokens of conversation kept in context")
    _add_model_args(p)
    _add_generation_args(p)
    _add_memory_commands(sub)
    _add_serve_command(sub)
    bench_cli.add_commands(sub)
    p = sub.add_parser("demo", help="memorize the bundled counterfactual Wikipedia article and ask about it")
    _add_model_args(p)
    _add_generation_args(p)
    return parser


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with named memories and a web page")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $EXTENDED_MIND_API_KEY)")
    p.add_argument("--memory-dir", type=Path, default=Path("memories"), help="where named memories live (./memories)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens one request may generate (1024)")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request body in MiB (16)")
    p.add_argument("--max-batch", type=int, default=16, help="generations decoded together (continuous batching; 16)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per decode step when a long prompt joins running generations, so "
                   "their streams never stall for a whole prompt (256; 0: whole prompts at once)")  # fmt: skip
    p.add_argument("--max-document-chars", type=int, default=4_000_000, help="largest document (4,000,000 chars)")
    p.add_argument("--max-memory-tokens", type=int, default=1_000_000, help="largest memory (1,000,000 tokens)")
    p.add_argument("--model", default=None, help="local model directory or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None,
                   help="auto (default; see `ask --help`), float32, bfloat16, float16, int8 or int4")  # fmt: skip


def _add_memory_commands(sub) -> None:
    p = sub.add_parser("memory", help="create, edit and inspect saved memories")
    ops = p.add_subparsers(dest="op", required=True)
    q = ops.add_parser("create", help="memorize text files into a new memory directory")
    q.add_argument("dir", type=Path)
    q.add_argument("files", nargs="+", type=Path)
    q.add_argument("--id", action="append", default=None, dest="ids", help="document id per file (default: file name)")
    _add_model_args(q)
    q = ops.add_parser("add", help="memorize more text files into a memory (others are not recomputed)")
    q.add_argument("dir", type=Path)
    q.add_argument("files", nargs="+", type=Path)
    q.add_argument("--id", action="append", default=None, dest="ids", help="document id per file (default: file name)")
    _add_model_args(q)
    q = ops.add_parser("rm", help="remove documents from a memory")
    q.add_argument("dir", type=Path)
    q.add_argument("doc_ids", nargs="+", metavar="ID")
    q = ops.add_parser("replace", help="memorize a new version of a document in its place")
    q.add_argument("dir", type=Path)
    q.add_argument("doc_id", metavar="ID")
    q.add_argument("file", type=Path)
    _add_model_args(q)
    for name, text in (("ls", "list a memory's documents"), ("info", "describe a memory")):
        q = ops.add_parser(name, help=text)
        q.add_argument("dir", type=Path)
        q.add_argument("--json", action="store_true", help="print JSON")
        if name == "info":
            q.add_argument("--verify", action="store_true", help="read every tensor file and check its checksum")
