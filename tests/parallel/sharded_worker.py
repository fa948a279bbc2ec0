"""One rank of a sharded-memory test (tests/parallel/test_distributed.py), or the single-process reference of it.

    python tests/parallel/sharded_worker.py SCENARIO OUT_DIR [MEMORY_DIR]

Run as rank r of N (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set), it joins the gloo group, runs the scenario and
writes OUT_DIR/rank{r}.json. The test runs the same scenario in its own process with shards=False and compares.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from extended_mind import ExtendedMind  # noqa: E402
from extended_mind.parallel.group import init_from_env  # noqa: E402
from extended_mind.retrieval.index import IndexSettings  # noqa: E402

# Every document starts differently: documents with a common opening have identical keys there (exact ties).
DOCS = [
    "Ansel, the lighthouse keeper, painted the tower blue in the spring of 1911. " * 3,
    "Marigold the goat escaped twice from the farm near the river and ate the mayor's hat. " * 2,
    "Copper ore was carried by the northern railway from the mines to the harbour until 1956. " * 2,
    "Quentin kept bees on the roof of the library; the honey was sold at the winter fair. " * 2,
    "Visitors saw a violin made of glass at the exhibition, and nobody was allowed to play it. " * 2,
]
NEW_DOC = "In August the observatory on the hill recorded a comet with a green tail. " * 2
REPLACED = "Seaweed and clover are all that Marigold the goat eats now, on her island. " * 2
PROMPTS = ["Who painted the tower?", "What did the goat eat?", "What did the railway carry?"]

# Memory in layer 1 only: layer 0's keys depend on the token alone, so every occurrence of a byte ties exactly with
# the others, and which of them a top-k returns is arbitrary even in one process (same logits, other citations).
CONFIGS = {
    "tokens": dict(retrieval="tokens", topk=6, memory_layers=[1]),
    "tokens-cosine-threshold": dict(retrieval="tokens", topk=5, ranking="cosine", similarity_threshold=0.05,
                                    memory_layers=[1]),  # fmt: skip
    "tokens-zero": dict(retrieval="tokens", topk=4, position_policy="zero", memory_layers=[1]),
    "blocks": dict(retrieval="blocks", blocks=2, block_size=16, topk=6),
    "approximate": dict(retrieval="tokens", topk=6, search="approximate", index=IndexSettings(nlist=2, nprobe=2),
                        memory_layers=[1]),  # fmt: skip
    "tokens-all-layers": dict(retrieval="tokens", topk=6),  # ties in layer 0: tokens and logits compared only
}
TIES = ("tokens-all-layers",)


def tiny_mind(shards: bool | None) -> ExtendedMind:
    from tests.conftest import byte_tokenizer, tiny_model

    mind = ExtendedMind(tiny_model("llama"), byte_tokenizer(), source="tiny-llama", shards=shards)
    mind._head_scores = torch.tensor([[0.0] * 4, [1.0] * 4])  # block selection by layer 1 (not layer 0: ties)
    return mind


def result(mind: ExtendedMind, prompt: str, memory, options: dict) -> dict:
    r = mind.generate(prompt, memory, max_new_tokens=6, chat=False, **options)
    return {
        "tokens": [t.id for t in r.tokens],
        "citations": [[c.doc, c.start, c.end, round(c.weight, 5)] for c in r.citations],
        "token_citations": [[[c.doc, c.start, c.end] for c in t.citations] for t in r.tokens],
    }


def logits(mind: ExtendedMind, memory, options: dict) -> list[float]:
    ids = torch.tensor([mind.tokenizer.encode("The goat and the lighthouse keeper met at the fair.")])
    opts = {k: v for k, v in options.items()}
    return mind.logits(ids, memory, **opts)[0, -6:, :40].flatten().tolist()


def scenario_tiny(mind: ExtendedMind, memory_dir: Path | None) -> dict:
    out: dict = {}
    memory = mind.memorize(DOCS, ids=[f"d{i}" for i in range(len(DOCS))], window=64, stride=16)
    out["info"] = memory.info()
    for name, options in CONFIGS.items():
        out[name] = [result(mind, p, memory, options) for p in PROMPTS]
        out[name + "-logits"] = logits(mind, memory, options)
    batch = mind.generate_batch(PROMPTS, [memory] * len(PROMPTS), max_new_tokens=6, chat=False, **CONFIGS["tokens"])
    out["batch"] = [[t.id for t in r.tokens] for r in batch]
    mind.add(memory, NEW_DOC, ids=["new"])
    memory.remove("d2")
    mind.replace(memory, "d1", REPLACED)
    out["edited-info"] = memory.info()
    for name in ("tokens", "blocks"):
        out["edited-" + name] = [result(mind, p, memory, CONFIGS[name]) for p in PROMPTS]
    if memory_dir is not None:
        memory.save(memory_dir)
        reopened = mind.load_memory(memory_dir)
        out["reopened-tokens"] = [result(mind, p, reopened, CONFIGS["tokens"]) for p in PROMPTS]
        out["reopened-layout"] = reopened.info().get("shards")
    return out


def scenario_smol(mind: ExtendedMind, memory_dir: Path | None) -> dict:
    """SmolLM2 on a saved memory (memory_dir, written by the test): default block memory and token retrieval."""
    memory = mind.load_memory(memory_dir)
    question = "What is the passkey? The passkey is"
    out = {"info": memory.info()}
    for name, options in {"blocks": {}, "tokens": {"retrieval": "tokens", "topk": 8}}.items():
        r = mind.generate(question, memory, max_new_tokens=8, **options)
        out[name] = {"text": r.text, "tokens": [t.id for t in r.tokens],
                     "citations": [[c.doc, c.start, c.end, round(c.weight, 4)] for c in r.citations]}  # fmt: skip
    return out


def scenario_fault(mind: ExtendedMind, memory_dir: Path | None) -> dict:
    """Rank 1 dies before the first exchange; rank 0 must report it, not hang."""
    memory = mind.load_memory(memory_dir)
    if mind.shard_group.rank == 1:
        os._exit(3)
    mind.generate("Who painted the tower?", memory, max_new_tokens=4, chat=False, retrieval="tokens")
    return {}


def scenario_open(mind: ExtendedMind, memory_dir: Path | None) -> dict:
    """Open a saved memory sharded (a damaged file makes it fail on the rank that holds it)."""
    memory = mind.load_memory(memory_dir)
    return {"info": memory.info()}


SCENARIOS = {"tiny": scenario_tiny, "smol": scenario_smol, "fault": scenario_fault, "open": scenario_open}


def run(scenario: str, shards: bool | None, memory_dir: Path | None) -> dict:
    mind = ExtendedMind.from_pretrained(shards=shards) if scenario == "smol" else tiny_mind(shards)
    return SCENARIOS[scenario](mind, memory_dir)


def main() -> int:
    torch.set_num_threads(1)
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    memory_dir = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    group = init_from_env()
    rank = group.rank if group is not None else 0
    try:
        out = {"ok": True, "result": run(scenario, True, memory_dir)}
    except Exception as exc:  # the test reads the error each rank reported
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
