"""What each command does: memorize, ask, chat, demo, serve and the memory subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

from extended_mind.base.documents import load_documents, read_text_file
from extended_mind.base.errors import ExtendedMindError
from extended_mind.engine.chat import ChatSession
from extended_mind.engine.mind import ExtendedMind
from extended_mind.engine.options import (
    GenerationOptions,
    shared_options,
)
from extended_mind.memory.memory import Memory, is_saved_memory
from extended_mind.memory.store import check_save_target, edit_lock
from extended_mind.parallel.group import active_group

DEMO_QUESTION = (
    "Question: How many termites can one aardwolf eat in a single night?\nAnswer: One aardwolf can eat about"
)


def serve_command(args: argparse.Namespace) -> None:
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
    if args.prefill_chunk < 0:
        raise ExtendedMindError("--prefill-chunk must be 0 (whole prompts at once) or a positive number of tokens")
    import uvicorn

    from extended_mind.server import create_app

    config = ServerConfig(
        memory_dir=args.memory_dir,
        api_key=key,
        max_body_bytes=int(args.max_body_mb * 2**20),
        default_max_tokens=min(256, args.max_tokens),
        prefill_chunk=args.prefill_chunk or None,
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


def memory_command(args: argparse.Namespace) -> None:
    if args.op == "create":
        if is_saved_memory(args.dir):
            raise ExtendedMindError(f"{args.dir} already holds a memory: use `memory add` or `memory replace`")
        mind = _load_mind(args, [])
        memory = mind.memorize(args.files, ids=args.ids, stride=args.stride, window=args.window, storage=args.storage,
                               progress=_progress())
        mind.prepare_to_save(memory)
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
            mind.prepare_to_save(memory)
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


def chat_command(args: argparse.Namespace) -> None:
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
    return ExtendedMind.from_pretrained(model, args.device, args.dtype, compile=getattr(args, "compile", None))


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


def memorize_command(args: argparse.Namespace) -> None:
    documents = load_documents(args.files)  # read and checked before the model loads
    check_save_target(args.out)
    if is_saved_memory(args.out) and not args.force:
        raise ExtendedMindError(
            f"{args.out} already holds a memory: `extended-mind memory add {args.out} FILE...` adds to it, "
            "--force replaces it"
        )
    mind = _load_mind(args, [])
    memory = mind.memorize(documents, stride=args.stride, window=args.window, storage=args.storage,
                           progress=_progress())  # fmt: skip
    mind.prepare_to_save(memory)
    memory.save(args.out)
    print(f"saved {memory.num_tokens} memory tokens from {len(memory.documents)} document(s) to {args.out}")


def ask_command(args: argparse.Namespace) -> None:
    saved = _saved_memories(args.memory, args)
    mind = _load_mind(args, list(saved.values()))
    _generate(mind, args.question, _memories(mind, args.memory, saved, args), args)


def demo_command(args: argparse.Namespace) -> None:
    article = Path(str(files("extended_mind") / "data" / "aardwolf.txt"))
    print((article.parent / "aardwolf.ATTRIBUTION.txt").read_text(), file=sys.stderr)
    mind = _load_mind(args, [])
    memory = mind.memorize(article, stride=args.stride, window=args.window)
    print(f"memorized {memory.num_tokens} tokens of {article.name}; the prompt holds only the question.\n")
    print(DEMO_QUESTION, end="")
    args.no_chat, args.answer_prefix, args.stop = True, "", args.stop or ["\n"]
    _generate(mind, DEMO_QUESTION, [memory], args)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "memorize": memorize_command, "memory": memory_command, "chat": chat_command, "serve": serve_command,
    "ask": ask_command, "demo": demo_command,
}  # fmt: skip
