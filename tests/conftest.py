"""Shared fixtures: tiny random models of every supported family with a byte-level tokenizer, and SmolLM2."""

from __future__ import annotations

import copy
import os
import signal
import time
import zlib

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MptConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from extended_mind import ExtendedMind

# Tests compare exact answers: the model precision is float32 unless a test asks for another (the default, "auto",
# measures which precision is fastest on the machine, so answers could differ between machines; tests/base covers it)
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")

VOCAB = 260  # 256 bytes + <s>, </s>, and room
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    head_dim=16,
)

NEOX = {k: v for k, v in COMMON.items() if k not in ("num_key_value_heads", "head_dim")}  # multi-head only

FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON),  # q/k norms before RoPE
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "gemma2": lambda: Gemma2Config(**COMMON, sliding_window=512, attn_logit_softcapping=50.0),  # softcap
    "gemma3": lambda: Gemma3TextConfig(**COMMON, sliding_window=512),  # two RoPE kinds, sliding layers
    "phi3": lambda: Phi3Config(**COMMON, partial_rotary_factor=0.5, pad_token_id=0),  # fused qkv, partial rotary
    "gpt_neox": lambda: GPTNeoXConfig(**NEOX, rotary_pct=0.25),  # partial rotary, parallel residual
    # ALiBi, attention computed inline (the adapter in attention/alibi.py)
    "mpt": lambda: MptConfig(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=512),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code (no download): one token per byte, offsets supported."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    config.eos_token_id = None  # random models would stop at random; tests compare fixed lengths
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_pair(family):
    """(mind, reference): a patched tiny model and an untouched copy with the same weights."""
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    return ExtendedMind(model, byte_tokenizer(), f"tiny-{family}"), reference


@pytest.fixture
def tiny_mind() -> ExtendedMind:
    return ExtendedMind(tiny_model("llama"), byte_tokenizer(), "tiny-llama")


@pytest.fixture(scope="session")
def smol() -> ExtendedMind:
    torch.set_num_threads(2)
    return ExtendedMind.from_pretrained()


class WordEmbedder:
    """A stand-in for MiniLM: bag of words hashed into 64 dimensions, normalized; one piece per text."""

    def embed(self, texts, batch: int = 32):
        out = torch.zeros(len(texts), 64)
        for i, text in enumerate(texts):
            for w in text.lower().split():
                out[i, zlib.crc32(w.strip(".?").encode()) % 64] += 1  # not hash(): salted per process
        return torch.nn.functional.normalize(out, dim=-1), list(range(len(texts)))


# Processes the tests start (servers, torchrun launchers, ranks): none may outlive the session.
_OURS = ("extended_mind", "sharded_worker", "torch.distributed.run")


def _started_after(pid: int, since: int) -> list[int]:
    """Processes below `pid`, or orphaned (their parent gone), started after clock tick `since` (since boot), whose
    command line names one of _OURS. (Another test session's live processes have a parent: they are not taken.)"""
    parent, found = {}, []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pid:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        if fields[0] != "Z" and int(fields[19]) >= since and any(name in cmd for name in _OURS):
            found.append(int(entry))

    def ours(p: int) -> bool:
        while p in parent:
            if parent[p] in (pid, 1):
                return True
            p = parent[p]
        return False

    return [p for p in found if ours(p)]


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """Fails the session when a server, launcher or rank a test started is still running at its end (then kills
    it, so that `make test` never leaves one behind)."""
    if not os.path.isdir("/proc"):
        yield
        return
    with open(f"/proc/{os.getpid()}/stat") as f:
        since = int(f.read().rsplit(")", 1)[1].split()[19])
    yield
    deadline = time.monotonic() + 15  # a stopped server may take a moment to exit
    while (left := _started_after(os.getpid(), since)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes started by the tests were still running at the end (killed now): {left}"
