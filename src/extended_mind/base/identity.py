"""Which model and tokenizer built a memory, so that a memory is never read by a model it does not belong to.

Keys and values are only meaningful to the exact weights that produced them, and token spans only to the tokenizer
that cut the text. An identity has three parts, each checked with its own error message: the architecture (config
fields that shape the tensors), a sample of the embedding weights (compared with a tolerance, so the same model in
bfloat16 still matches), and a hash of the tokenizer's vocabulary and special tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.base.errors import MemoryMismatchError

_ARCH_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(model: PreTrainedModel) -> str:
    c = model.config
    arch = {k: getattr(c, k, None) for k in _ARCH_FIELDS}
    rope = getattr(c, "rope_parameters", None) or {}
    arch["rope_theta"] = rope.get("rope_theta") if isinstance(rope, dict) else None
    return _sha(arch)


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return _sha({"vocab": vocab, "special": sorted(tokenizer.all_special_ids)})


def weights_sample(model: PreTrainedModel) -> tuple[float, ...]:
    emb = model.get_input_embeddings().weight
    return tuple(round(x, 6) for x in emb[:8, :8].detach().float().cpu().flatten().tolist())


@dataclass(frozen=True)
class ModelIdentity:
    source: str  # the name the model was loaded by (shown in messages, used by the CLI to reload it)
    config_hash: str
    tokenizer_hash: str
    weights_sample: tuple[float, ...]

    @classmethod
    def of(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str) -> ModelIdentity:
        return cls(source, config_hash(model), tokenizer_hash(tokenizer), weights_sample(model))

    def to_dict(self) -> dict:
        return asdict(self) | {"weights_sample": list(self.weights_sample)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelIdentity:
        return cls(
            str(d["source"]), str(d["config_hash"]), str(d["tokenizer_hash"]), tuple(map(float, d["weights_sample"]))
        )

    def same_weights(self, other: ModelIdentity) -> bool:
        a, b = torch.tensor(self.weights_sample), torch.tensor(other.weights_sample)
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=2e-2, atol=1e-3))

    def check(self, loaded: ModelIdentity, what: str = "memory") -> None:
        """Raise MemoryMismatchError unless `loaded` (the model in use) is the model that built this `what`."""
        if self.config_hash != loaded.config_hash:
            raise MemoryMismatchError(
                f"{what} was built by a different model ({self.source!r}, another architecture) than the one loaded "
                f"({loaded.source!r}); memorize the documents again with this model"
            )
        if not self.same_weights(loaded):
            raise MemoryMismatchError(
                f"{what} was built by a different model ({self.source!r}: same architecture, other weights) than the "
                f"one loaded ({loaded.source!r}); memorize the documents again with this model"
            )
        if self.tokenizer_hash != loaded.tokenizer_hash:
            raise MemoryMismatchError(
                f"{what} was built with a different tokenizer than the loaded model's ({loaded.source!r}); "
                "its token spans would not match: memorize the documents again with this tokenizer"
            )
