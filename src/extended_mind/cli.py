"""Command line: `extended-mind memorize|ask|chat|memory|serve|demo|bench|tune|data`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.resources import files
from pathlib import Path

from extended_mind.base.documents import load_documents, read_text_file
from extended_mind.base.errors import ExtendedMindError
from extended_mind.bench import cli as bench_cli
from extended_mind.engine.chat import ChatSession
from extended_mind.engine.mind import ExtendedMind
from extended_mind.engine.options import (
    DEFAULT_STRIDE,
    DEFAULT_WINDOW,
    GenerationOptions,
    shared_options,
)
from extended_mind.memory.memory import Memory, is_saved_memory
from extended_mind.memory.precision import STORAGE_DTYPES
from extended_mind.memory.store import check_save_target, edit_lock
from extended_mind.parallel.group import ShardError, active_group, init_from_env, launched_distributed

DEMO_QUESTION = (
    "Question: How many termites can one aardwolf eat in a single night?\nAnswer: One aardwolf can eat about"
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="local model directory or hub id (default: SmolLM2-135M-Instruct, "
        "or the model a saved memory was built with)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)"
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
    p.add_argument("--max-document-chars", type=int, default=4_000_000, help="largest document (4,000,000 chars)")
    p.add_argument("--max-memory-tokens", type=int, default=1_000_000, help="largest memory (1,000,000 tokens)")
    p.add_argument("--model", default=None, help="local model directory or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")


def _serve(args: argparse.Namespace) -> None:
    import os

    from extended_mind.server.config import ServerConfig, is_loopback

    key = args.api_key or os.environ.get("EXTENDED_MIND_API_KEY") or None
    if not is_loopback(args.host) and not key:
        raise ExtendedMindError(
            f"refusing to serve on {args.host} without an API key: anyone who can reach it could read and change "
            "your memories. Pass --api-key KEY (or set EXTENDED_MIND_API_KEY), or bind to 127.0.0.1"
        )
    limits = {
        "max_tokens": args.max_tokens,
        "max_document_chars": args.max_document_chars,
        "max_memory_tokens": args.max_memory_tokens,
        "max_batch": args.max_batch,
    }
    bad = [f"--{k.replace('_', '-')}" for k, v in limits.items() if v < 1] + (
        ["--max-body-mb"] if args.max_body_mb <= 0 else []
    )
    if bad:
        raise ExtendedMindError(f"{', '.join(bad)} must be positive")
    import uvicorn

    from extended_mind.server import create_app

    config = ServerConfig(
        memory_dir=args.memory_dir,
        api_key=key,
        max_body_bytes=int(args.max_body_mb * 2**20),
        default_max_tokens=min(256, args.max_tokens),
        **limits,
    )
    group = active_group()
    if group is not None and group.rank != 0:  # under torchrun: rank 0 serves, this rank follows it
        from extended_mind.server.sharded import follow

        follow(_load_mind(args, []), config)
        return
    app = create_app(lambda: _load_mind(args, []), config)  # loads in the background; /health says 503 until ready
    where = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}"
    print(
        f"serving {args.model or 'the default model'} at {where}/ (web page) and {where}/v1 (OpenAI API), "
        f"{where}/health and {where}/metrics; memories in {args.memory_dir.resolve()}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


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


def _memory_command(args: argparse.Namespace) -> None:
    if args.op == "create":
        if is_saved_memory(args.dir):
            raise ExtendedMindError(f"{args.dir} already holds a memory: use `memory add` or `memory replace`")
        mind = _load_mind(args, [])
        memory = mind.memorize(args.files, ids=args.ids, stride=args.stride, window=args.window, storage=args.storage,
                               progress=_progress())
        mind.build_index(memory, only_above_threshold=True)
        memory.save(args.dir)
        print(f"created {args.dir}: {len(memory)} document(s), {memory.num_tokens} tokens")
        return
    if not is_saved_memory(args.dir):
        raise ExtendedMindError(f"no saved memory at {args.dir}")
    memory = Memory.load(args.dir)
    if args.op in ("add", "replace"):
        if args.stride is not None or args.window is not None or args.storage is not None:
            raise ExtendedMindError("stride, window and storage are set when the memory is created")
        mind = _load_mind(args, [memory])
        with edit_lock(args.dir):  # another process's edit waits for this one (or this for it): none is lost
            memory = Memory.load(args.dir)  # as it is now, after any edit that came first
            if args.op == "add":
                mind.add(memory, args.files, ids=args.ids)
                done = f"added {len(args.files)} document(s)"
            else:
                mind.replace(memory, args.doc_id, args.file)
                done = f"replaced {args.doc_id!r}"
            mind.build_index(memory, only_above_threshold=True)
            memory.save()
        print(f"{done}; {args.dir} now holds {len(memory)} document(s), {memory.num_tokens} tokens")
    elif args.op == "rm":
        with edit_lock(args.dir):
            memory = Memory.load(args.dir).remove(args.doc_ids)
            memory.save()
        print(f"removed {len(args.doc_ids)} document(s); {args.dir} now holds {len(memory)} document(s)")
    elif args.op == "ls":
        rows = [
            {"id": s.document.id, "name": s.document.name, "chars": len(s.document.text), "tokens": s.num_tokens}
            for s in memory.segments
        ]
        if args.json:
            print(json.dumps(rows, ensure_ascii=False, indent=2))
            return
        print(f"{'id':<32} {'tokens':>8} {'chars':>9}  name")
        for r in rows:
            print(f"{r['id']:<32} {r['tokens']:>8} {r['chars']:>9}  {r['name'] or ''}")
    elif args.op == "info":
        if args.verify:
            memory.verify()
        info = memory.info() | ({"verified": True} if args.verify else {})
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for k, v in info.items():
                print(f"{k:>16}: {v}")


def _generation_options(args: argparse.Namespace) -> dict:
    """The options of `_add_generation_args` that `ExtendedMind.stream` and `ChatSession` share."""
    shared = {name: getattr(args, name) for name, _, _ in shared_options()}
    return {**shared, "max_new_tokens": args.max_new_tokens, "stop": args.stop}


def _chat(args: argparse.Namespace) -> None:
    if args.no_chat or args.answer_prefix or args.json:
        raise ExtendedMindError(
            "chat always uses the chat template and prints text: drop --no-chat/--answer-prefix/--json"
        )
    saved = _saved_memories(args.memory, args)
    mind = _load_mind(args, list(saved.values()))
    session = ChatSession(
        mind,
        memory=_memories(mind, args.memory, saved, args) or None,
        system=args.system,
        max_context_tokens=args.max_context_tokens,
        history=args.history,
        storage=args.storage,
        **_generation_options(args),
    )
    interactive = sys.stdin.isatty()
    if session.memorized_turns:
        print(f"({session.memorized_turns} earlier turns in memory from {args.history})", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        before = session.memorized_turns
        for token in session.stream(line.strip()):
            print(token.text, end="", flush=True)
        print()
        if session.memorized_turns > before:
            print(f"  (memorized {session.memorized_turns - before} old turn(s))", file=sys.stderr)
        for c in session.last.citations if session.last else []:
            print(f"  [{c.weight:.3f}] {c.doc}: {c.text[:100]}", file=sys.stderr)


def _saved_memories(paths: list[Path], args: argparse.Namespace | None = None) -> dict[Path, Memory]:
    """The saved memories among `paths`, opened; every path and (with `args`) every generation option checked
    first, so that a typo is reported at once, not after the model has loaded."""
    for p in paths:
        if not p.exists():
            raise ExtendedMindError(f"memory path not found: {p}")
        if p.is_dir() and not is_saved_memory(p):
            raise ExtendedMindError(f"{p} is a directory but not a saved memory")
        if not p.is_dir():
            read_text_file(p)  # a text file to memorize: readable, text, not empty
    if args is not None:
        GenerationOptions.of(**_generation_options(args))
    return {p: Memory.load(p) for p in paths if is_saved_memory(p)}


def _progress() -> bool | None:
    """A progress bar for memorizing whenever a person watches (any length); elsewhere only for long inputs."""
    return True if sys.stderr.isatty() else None


def _load_mind(args: argparse.Namespace, saved: list[Memory]) -> ExtendedMind:
    model = args.model
    if model is None and saved:
        model = saved[0].model_source  # the model that built the memory
    print(f"loading model {model or 'SmolLM2-135M-Instruct'} ...", file=sys.stderr)
    return ExtendedMind.from_pretrained(model, args.device, args.dtype)


def _memories(mind: ExtendedMind, paths: list[Path], saved: dict[Path, Memory], args) -> list[Memory]:
    """Saved memories as loaded (generation checks their model), plus one memory of all the text files."""
    memories = [saved[p] for p in paths if p in saved]
    texts = [p for p in paths if p not in saved]
    if texts:
        print(f"memorizing {len(texts)} file(s) ...", file=sys.stderr)
        memories.append(mind.memorize(texts, stride=args.stride, window=args.window, storage=args.storage,
                                      progress=_progress()))
    return memories


def _generate(mind: ExtendedMind, question: str, memories: list[Memory], args) -> None:
    stream = mind.stream(
        question,
        memory=memories or None,
        chat=not args.no_chat,
        answer_prefix=args.answer_prefix,
        **_generation_options(args),
    )
    if args.json:
        for _ in stream:
            pass
        out = stream.result.to_dict()
        if mind.shard_group is not None and memories:  # where the memory lives: each rank's documents and tokens
            out["shards"] = Memory.merge(memories).shard_layout() if len(memories) > 1 else memories[0].shard_layout()
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return
    if args.answer_prefix:
        print(args.answer_prefix, end="", flush=True)
    for token in stream:
        print(token.text, end="", flush=True)
    print()
    result = stream.result
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if memories and result.blocks_read == 0:
        print("(no memory block was relevant to the question: none was read)", file=sys.stderr)
    if result.citations:
        print("\nCited spans (attention weight, document, characters):")
        for c in result.citations:
            print(f"  [{c.weight:.4f}] {c.doc} {c.start}-{c.end}: {c.text}")
    for r in result.retrievals:
        print(
            f"  re-retrieved step {r.step}: entropy {r.entropy:.2f} -> {r.new_entropy:.2f} nats,"
            f" k {r.topk} -> {r.new_topk}"
        )


# Commands that run under torchrun, with their memories sharded over the ranks
SHARDED_COMMANDS = ("ask", "memorize", "demo", "serve")


def _exit_with_launcher() -> None:
    """A rank ends when its launcher does (Linux: the parent-death signal): a killed torchrun must not leave ranks
    serving on their own, holding the model in memory."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the rank outlives its launcher, as before
        return
    if os.getppid() != launcher:  # the launcher died before the signal was set
        raise ExtendedMindError("the launcher of this rank is gone")


def _join_process_group() -> int:
    """Under torchrun: join the process group (memories are then sharded over the ranks) and leave the output to
    rank 0. Returns this process's rank (0 when alone)."""
    _exit_with_launcher()
    group = init_from_env()
    if group is None or group.rank == 0:
        return 0
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - rank 0 reports errors of every rank
    return group.rank


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = 0
    try:
        if launched_distributed() and args.command not in SHARDED_COMMANDS:
            raise ExtendedMindError(
                f"'{args.command}' does not run under torchrun; sharded over ranks: {', '.join(SHARDED_COMMANDS)}"
            )
        rank = _join_process_group() if launched_distributed() else 0
        if args.command == "memorize":
            documents = load_documents(args.files)  # read and checked before the model loads
            check_save_target(args.out)
            if is_saved_memory(args.out) and not args.force:
                raise ExtendedMindError(
                    f"{args.out} already holds a memory: `extended-mind memory add {args.out} FILE...` adds to it, "
                    "--force replaces it"
                )
            mind = _load_mind(args, [])
            memory = mind.memorize(documents, stride=args.stride, window=args.window, storage=args.storage,
                                   progress=_progress())
            mind.build_index(memory, only_above_threshold=True)
            memory.save(args.out)
            print(f"saved {memory.num_tokens} memory tokens from {len(memory.documents)} document(s) to {args.out}")
        elif args.command == "memory":
            _memory_command(args)
        elif args.command == "chat":
            _chat(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command in ("bench", "tune", "data"):
            return bench_cli.run(args)
        elif args.command == "ask":
            saved = _saved_memories(args.memory, args)
            mind = _load_mind(args, list(saved.values()))
            _generate(mind, args.question, _memories(mind, args.memory, saved, args), args)
        elif args.command == "demo":
            article = Path(str(files("extended_mind") / "data" / "aardwolf.txt"))
            print((article.parent / "aardwolf.ATTRIBUTION.txt").read_text(), file=sys.stderr)
            mind = _load_mind(args, [])
            memory = mind.memorize(article, stride=args.stride, window=args.window)
            print(f"memorized {memory.num_tokens} tokens of {article.name}; the prompt holds only the question.\n")
            print(DEMO_QUESTION, end="")
            args.no_chat, args.answer_prefix, args.stop = True, "", args.stop or ["\n"]
            _generate(mind, DEMO_QUESTION, [memory], args)
    except ExtendedMindError as exc:
        print(f"extended-mind: error: {exc}", file=sys.stderr)
        if sys.stderr is not sys.__stderr__ and not isinstance(exc, ShardError):  # a rank's own error: say it
            print(f"extended-mind (rank {rank}): error: {exc}", file=sys.__stderr__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
