"""The precision of the model's weights on a CPU: float32, or int8 or int4 for decoding, chosen by measurement.

Decoding one token multiplies a few rows by every weight matrix, so its time is the time to read the weights: 540 MB
per token for SmolLM2 in float32. `int8` keeps the model in float32 and gives each dense layer a copy of its weight
as int8 codes with one scale per output channel; decode steps (one token per row, at most DECODE_ROWS rows) are
multiplied with the codes by torch's packed int8 weight-only kernel (`torch._weight_int8pack_mm`, the CPU kernel
behind torchao's int8 weight-only quantization; checked on this machine before use); prompts, memorization and
scoring keep the float32 weights. So memories, block selection and the relevance test are float32's, and the
model's parameters, state dict and identity are unchanged. `bfloat16-int8` is the same over a bfloat16 model.
`int4` is the same with 4-bit codes and a scale and zero per 32 inputs (`torch._weight_int4pack_mm_for_cpu`, the
kernel behind torchao's int4 weight-only CPU layout): llama.cpp's Q4_1 blocks, so the layers of the GGUF we ship
get their own codes back (scales rounded to bfloat16). The output layer (an 8-bit table in that GGUF) gets 4-bit
codes too, but only to shortlist: the HEAD_SHORTLIST tokens with the best estimated logits are scored again with
the float weight, so the token chosen is float32's choice whenever float32's best is on the shortlist. All 4-bit
codes alone picked float32's token at 86% of the probe's steps, an int8 output layer at 98%, the shortlist at 98%
in 9% less time per token (SmolLM2, 1 thread, docs/measurements.md).

`auto` measures, once per CPU, thread count and model (cached in the cache directory): float32's greedy answers to
PROBE_PROMPTS, then int8 and int4 (each applied in place, then undone) fed those answers token by token through
their decode path. A candidate counts when it picks float32's token at PROBE_AGREEMENT of the steps and its decode
step takes at most MIN_GAIN of float32's; the fastest that counts is chosen, else float32. bfloat16 is not a
candidate: computing prompts and memories in bfloat16 moves block memory's relevance scores (SmolLM2's demo
question read no block in bfloat16, docs/measurements.md), which decoding agreement does not see. On a GPU `auto`
is bfloat16.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from functools import lru_cache

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.base.compat import with_cache
from extended_mind.base.identity import config_hash, weights_sample
from extended_mind.base.kv_cache import new_cache
from extended_mind.base.machine import cpu_info
from extended_mind.base.paths import cache_dir

DECODE_ROWS = 16  # int8 up to here: 1.4x faster than float32 at 16 rows, even up to 32 (1 thread) and 64 (2)
PROBE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, a small robot",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Q: What is the largest planet?\nA:",
    "import numpy as np\nx =",
    "In 1492, Christopher Columbus",
)
PROBE_TOKENS = 16
# the share of steps at which a candidate, fed float32's greedy answers token by token, picks float32's token
PROBE_AGREEMENT = 0.9
MIN_GAIN = 0.95  # a candidate's decode step must take at most this share of float32's
WEIGHTS = ("float32", "int8", "int4")  # what `auto` chooses from
HEAD_SHORTLIST = 64  # tokens per row whose logits an int4 output layer computes again from the float weight
INT4_GROUP = 32  # inputs per 4-bit scale and zero: llama.cpp's Q4_1 blocks, the layout of the GGUF we ship
METHOD = 5  # part of the cache key: a change to the probe or the rule measures again


@lru_cache(maxsize=1)
def int8_decode_available() -> bool:
    """Whether torch's packed int8 weight-only kernel runs here and computes what it should (a private op:
    checked, not assumed; in_features must be a multiple of 16, see `use_decode_weights`)."""
    try:
        codes = torch.tensor([[1, -2] * 8, [3, 0] * 8], dtype=torch.int8)
        x = torch.ones(1, 16, dtype=torch.bfloat16)
        got = torch._weight_int8pack_mm(x, codes, torch.tensor([0.5, 2.0], dtype=torch.bfloat16))
        return got.float().tolist() == [[-4.0, 48.0]]
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@lru_cache(maxsize=1)
def int4_decode_available() -> bool:
    """Whether torch's packed int4 weight-only CPU kernel runs here and computes what it should (private ops:
    checked, not assumed; out_features must be a multiple of 16 and in_features of INT4_GROUP)."""
    try:
        codes = torch.arange(16, dtype=torch.int32).repeat(16, 2)  # (16 outputs, 32 inputs), each code twice
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
        scales_zeros = torch.tensor([[[0.5, 1.0]] * 16], dtype=torch.bfloat16)  # w = (code - 8) * 0.5 + 1
        got = torch._weight_int4pack_mm_for_cpu(torch.ones(1, 32, dtype=torch.bfloat16), packed, INT4_GROUP,
                                                scales_zeros)  # fmt: skip
        return got.float().tolist() == [[24.0] * 16]
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def decode_weights_available(kind: str) -> bool:
    """Whether decode weights of `kind` ("int8" or "int4") run here (int4 needs the int8 kernel too: its output
    layer is int8, see `use_decode_weights`)."""
    return int8_decode_available() and (kind == "int8" or int4_decode_available())


@torch.library.custom_op("extended_mind::int8_weight_mm", mutates_args=())
def int8_weight_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """torch's int8 weight-only kernel as an opaque op for compiled graphs."""
    return torch._weight_int8pack_mm(x, codes, scales)


@int8_weight_mm.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], codes.shape[0]))


@torch.library.custom_op("extended_mind::int4_weight_mm", mutates_args=())
def int4_weight_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """torch's int4 weight-only CPU kernel as an opaque op for compiled graphs."""
    return torch._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales_zeros)


@int4_weight_mm.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))


class DecodeLinear(torch.nn.Linear):
    """A float Linear that multiplies decode steps (one token per row, at most DECODE_ROWS rows) by quantized codes
    of its weight, in bfloat16 (see the module docstring); other inputs go through the float weight. Made by
    changing a Linear's class in place: its parameters, state dict and hooks stay."""

    CODES: tuple[str, ...] = ()  # the attributes that hold the quantized weight

    def codes(self) -> list[torch.Tensor]:
        """The tensors a decode step reads instead of the float weight."""
        return [getattr(self, name) for name in self.CODES]

    def _multiply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        one_token_rows = x.dim() < 3 or x.shape[-2] == 1  # a decode step (a prompt's rows are float32's)
        if rows > DECODE_ROWS or not one_token_rows or x.device != getattr(self, self.CODES[0]).device:
            return super().forward(x)
        y = self._decode(x.reshape(rows, -1)).reshape(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """A decode step's rows (rows, in), in the model's dtype, times the weight."""
        return self._multiply(x.to(torch.bfloat16))


class Int8DecodeLinear(DecodeLinear):
    """Decode steps through int8 codes with one scale per output channel."""

    int8_codes: torch.Tensor  # (out, in) int8
    int8_scales: torch.Tensor  # (out,) bfloat16
    CODES = ("int8_codes", "int8_scales")

    def _multiply(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the same kernel as eager: inductor's own lowering differs and is slower
            return int8_weight_mm(x, self.int8_codes, self.int8_scales)
        return torch._weight_int8pack_mm(x, self.int8_codes, self.int8_scales)


class Int4DecodeLinear(DecodeLinear):
    """Decode steps through 4-bit codes with a scale and a zero point per INT4_GROUP inputs of each output."""

    int4_packed: torch.Tensor  # (out, in / 2) uint8 in the CPU kernel's layout
    int4_scales_zeros: torch.Tensor  # (in / INT4_GROUP, out, 2) bfloat16: w = (code - 8) * scale + zero
    CODES = ("int4_packed", "int4_scales_zeros")

    def _multiply(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return int4_weight_mm(x, self.int4_packed, self.int4_scales_zeros)
        return torch._weight_int4pack_mm_for_cpu(x, self.int4_packed, INT4_GROUP, self.int4_scales_zeros)


class Int4ShortlistHead(Int4DecodeLinear):
    """The output layer with 4-bit codes: every token's logit estimated from the codes, then the HEAD_SHORTLIST
    best of each row computed again from the float weight. The tokens that can be chosen get the float model's
    logits (greedy picks float32's token whenever it is among the shortlist), the rest keep the estimate, capped
    at the shortlist's lowest logit; the layer reads half the bytes of int8 (and the shortlist's float rows)."""

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        estimate = self._multiply(x.to(torch.bfloat16)).to(x.dtype)
        best = estimate.topk(min(HEAD_SHORTLIST, estimate.shape[-1]), dim=-1).indices  # (rows, shortlist)
        exact = torch.matmul(self.weight[best], x.unsqueeze(-1)).squeeze(-1)  # (rows, shortlist, in) @ (rows, in)
        # the rest never outranks the shortlist (an estimate off by more than the gap could otherwise be chosen)
        estimate = torch.minimum(estimate, exact.amin(-1, keepdim=True))
        return estimate.scatter_(-1, best, exact)


def _give_int8(module: torch.nn.Linear) -> None:
    w = module.weight.detach().float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    module.int8_codes = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    module.int8_scales = scales.to(torch.bfloat16)
    module.__class__ = Int8DecodeLinear


def _give_int4(module: torch.nn.Linear) -> None:
    """Asymmetric 4-bit codes per group of INT4_GROUP inputs (min to max in 15 steps: llama.cpp's Q4_1, so a layer
    dequantized from Q4_1 gets its own codes back), the codes computed against the bfloat16-rounded scale and zero
    the kernel reads."""
    w = module.weight.detach().float()
    groups = w.reshape(w.shape[0], -1, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-12).to(torch.bfloat16)
    zero = (low + 8 * scale.float()).to(torch.bfloat16)
    codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    module.int4_packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).reshape(w.shape), 2)
    module.int4_scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    module.__class__ = Int4DecodeLinear


def _give_int4_head(module: torch.nn.Linear) -> None:
    _give_int4(module)
    module.__class__ = Int4ShortlistHead


def use_decode_weights(model: PreTrainedModel, kind: str = "int8") -> int:
    """Give the model's dense layers on the CPU decode weights of `kind`; returns how many layers got them.
    "int8": one scale per output channel (layers whose in_features is a multiple of 16, what the kernel handles
    correctly). "int4": 4-bit codes per INT4_GROUP inputs (layers with in_features a multiple of INT4_GROUP and
    out_features of 16), the output layer with a float shortlist (`Int4ShortlistHead`: its logits choose every
    token); other layers int8 where they can. Raises RuntimeError where a kernel is unavailable."""
    if not decode_weights_available(kind):
        raise RuntimeError(f"torch's {kind} weight-only kernel is not available here")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    done = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.in_features % 16 or module.weight.device.type != "cpu":
            continue
        int4 = kind == "int4" and not module.in_features % INT4_GROUP and not module.out_features % 16
        if int4:
            (_give_int4_head if module is head else _give_int4)(module)
        else:
            _give_int8(module)
        done += 1
    return done


def drop_decode_weights(model: PreTrainedModel) -> None:
    """Undo `use_decode_weights`: plain Linears again, the codes freed."""
    for module in model.modules():
        if isinstance(module, DecodeLinear):
            for name in module.CODES:
                module.__dict__.pop(name, None)
            module.__class__ = torch.nn.Linear


def _probe(model: PreTrainedModel, prompts: list[list[int]], forced: list[list[int]] | None) -> dict:
    """Greedy answers to the probe prompts (or, with `forced`, the model's choice at each step of those answers fed
    token by token through the decode path) and the median decode step in seconds."""
    answers, steps = [], []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            cache = new_cache(model.config)
            out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, **with_cache(model, cache))
            chosen = [int(out.logits[0, -1].argmax())]
            for j in range(PROBE_TOKENS - 1):
                fed = chosen[-1] if forced is None else forced[i][j]
                start = time.perf_counter()
                out = model(input_ids=torch.tensor([[fed]], device=device), use_cache=True,
                            **with_cache(model, cache))  # fmt: skip
                chosen.append(int(out.logits[0, -1].argmax()))
                steps.append(time.perf_counter() - start)
            answers.append(chosen)
    return {"answers": answers, "decode_s": statistics.median(steps)}


def measure(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Time float32 (the loaded model) and each decode-weight kind here; returns {"choice": ..., per precision: the
    decode step in ms, and for the quantized ones the share of float32's tokens they agree with and whether they
    count}. The choice is the fastest that counts, else float32."""
    prompts = [tokenizer(p)["input_ids"] for p in PROBE_PROMPTS]
    base = _probe(model, prompts, None)
    found: dict = {"float32": {"decode_ms": 1000 * base["decode_s"]}, "choice": "float32"}
    for kind in WEIGHTS[1:]:
        if not decode_weights_available(kind):
            continue
        use_decode_weights(model, kind)  # measured in place, then undone
        try:
            got = _probe(model, prompts, base["answers"])
        finally:
            drop_decode_weights(model)
        pairs = [(a, b) for x, y in zip(got["answers"], base["answers"]) for a, b in zip(x, y)]
        agree = sum(a == b for a, b in pairs) / len(pairs)
        counts = agree >= PROBE_AGREEMENT and got["decode_s"] <= MIN_GAIN * base["decode_s"]
        found[kind] = {"decode_ms": 1000 * got["decode_s"], "agreement": agree, "counts": counts}
        if counts and found[kind]["decode_ms"] < found[found["choice"]]["decode_ms"]:
            found["choice"] = kind
    return found


def _summary(found: dict) -> str:
    parts = []
    for name in WEIGHTS:
        if "decode_ms" in found.get(name, {}):
            agree = f", {found[name]['agreement']:.0%} of float32's tokens" if "agreement" in found[name] else ""
            parts.append(f"{name} {found[name]['decode_ms']:.0f} ms/token{agree}")
    return "; ".join(parts)


def _choice_file():
    return cache_dir() / "weights-choice.json"


def _key(model: PreTrainedModel) -> str:
    cpu = cpu_info()
    return json.dumps([METHOD, cpu["model"], cpu["flags"], torch.get_num_threads(), torch.__version__,
                       config_hash(model), weights_sample(model)])  # fmt: skip


def choose(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """The measured weight precision for `model` (float32, loaded on the CPU) here: from the cache, else measured
    now (seconds, once) and cached."""
    path, key = _choice_file(), _key(model)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and known[key].get("choice") in WEIGHTS:
        return known[key]["choice"]
    print("extended-mind: measuring once which weight precision decodes fastest on this CPU ...", file=sys.stderr)
    found = measure(model, tokenizer)
    print(f"extended-mind: {found['choice']} weights ({_summary(found)}; cached in {path})", file=sys.stderr)
    known[key] = found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".weights-choice.")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache measures again next time
    return found["choice"]
