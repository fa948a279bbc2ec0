"""What `bench TASK` runs when not told otherwise: the full run (`bench all`, about two hours here, 70 minutes of it
`icl`; larger runs with --n and --lengths resume where they stop) and `--quick` (every task in about 20 minutes on
this 2-core CPU).
Sized from costs measured on SmolLM2 with 2 threads: memorizing ~290 tokens/s; an 8k-token prompt ~30 s of prefill;
a prompt of 2,500 tokens reading a 16k-token memory ~75 s (every prompt token searches the memory); YaRN at 16k
several minutes per answer, so it is not in the presets (`--methods yarn` runs it). The full run puts block memory
(`emt`) beside the paper's token-level retrieval (`emt[retrieval=tokens]`) on every task."""

from __future__ import annotations

TOKENS = "emt[retrieval=tokens]"  # the paper's token-level retrieval, beside block memory
RAG_DEMOS = "rag[top=32]"  # icl: the 32 demonstrations nearest the question (about 1,200 tokens)
NEAREST = "emt[block_choice=embedding]"  # icl: block memory reading the blocks nearest the question (embedding)

PRESETS: dict[str, dict[str, dict]] = {
    "quick": {
        "passkey": {"lengths": [4096, 16384], "depths": [0.5], "n": 1, "methods": ["emt", "rag", "context", "none"]},
        "passkey-prose": {"lengths": [8192], "depths": [0.5], "n": 1, "methods": ["emt", "rag", "context"]},
        "general": {"lengths": [15000], "n": 10, "methods": ["emt", "none"]},  # n: questions
        "general-lists": {"lengths": [15000], "n": 10, "methods": ["emt", "none"]},
        "pair": {"lengths": [2], "n": 4, "methods": ["emt", "context"]},
        "niah": {"lengths": [2048, 8192], "depths": [0.5], "n": 1, "methods": ["emt", "rag", "context"]},
        "ruler": {"lengths": [2048], "n": 1, "methods": ["emt", "rag", "context"]},
        "wikiqa": {"lengths": [2048, 8192], "n": 2, "methods": ["emt", "rag", "context", "emt+rag"]},
        "perplexity": {"lengths": [4096], "n": 1, "methods": ["emt", "context", "none"]},
        "icl": {"lengths": [8, 64], "n": 16, "methods": ["emt", NEAREST, RAG_DEMOS, "context"]},  # N demonstrations
    },
    "full": {
        "general": {"lengths": [15000], "n": 40, "methods": ["emt", TOKENS, "none"]},
        "general-lists": {"lengths": [15000], "n": 40, "methods": ["emt", "none"]},
        "pair": {"lengths": [2, 10], "n": 10, "methods": ["emt", TOKENS, "rag", "context"]},
        "passkey-prose": {"lengths": [8192, 16384], "depths": [0.1, 0.5, 0.9], "n": 1,
                          "methods": ["emt", TOKENS, "rag", "context"]},
        "perplexity": {"lengths": [8192, 16384], "n": 3, "methods": ["emt", TOKENS, "context", "none"]},
        "niah": {"lengths": [2048, 4096, 8192], "depths": [0.1, 0.5, 0.9], "n": 1,
                 "methods": ["emt", TOKENS, "rag", "context"]},
        "ruler": {"lengths": [4096], "n": 1, "methods": ["emt", TOKENS, "rag", "context"]},
        "wikiqa": {"lengths": [2048, 16384], "n": 6, "methods": ["emt", TOKENS, "rag", "context", "emt+rag", "none"]},
        "passkey": {"lengths": [8192, 16384, 32768, 65536], "depths": [0.5], "n": 1,
                    "methods": ["emt", TOKENS, "context"]},
        "icl": {"lengths": [8, 64, 512, 4096], "n": 32,
                "methods": ["emt", NEAREST, TOKENS, RAG_DEMOS, "context", "emt+" + RAG_DEMOS, "none"]},
    },
}  # fmt: skip
