#!/usr/bin/env bash
# The GPU checks, run on a lent GPU machine from the repository root (docs/measurements.md, "On a GPU"):
#   1. the CUDA tests (tests/attention/test_cuda.py: the correctness oracles with the model on the GPU) and the
#      bfloat16 tests (bfloat16 is the default model precision on a GPU);
#   2. benchmarks/speed.py on the GPU in bfloat16, memories of 16k to 1M tokens.
# That machine cannot download: the model there has SmolLM2-135M's configuration and tokenizer (copied into
# .gpu/smollm2 beforehand) with random weights of the same shapes; every timed run decodes exactly --tokens tokens,
# so times do not depend on the weights' values. Wheels in .whl/ (this project's pinned transformers) are installed
# first when present. Results go to $OUT (default runs/gpu). Prepared here, before the run (both folders are ignored):
#   mkdir -p .gpu/smollm2 && cp ~/.cache/extended-mind/models/SmolLM2-135M-Instruct-*/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/smollm2/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.24.0
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/machine.txt"
timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -s -p no:cacheprovider tests/attention/test_cuda.py \
    "tests/engine/test_generation.py::test_a_bfloat16_model_reads_its_memory" 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
timeout "${SPEED_TIMEOUT:-330}" python3 benchmarks/speed.py --model .gpu/smollm2 --random-weights --device cuda \
    --dtype bfloat16 --threads 8 --sizes 16384 65536 262144 1048576 --real-tokens 65536 --tokens 32 --repeats 3 \
    --no-approximate --out "$OUT/speed" 2>&1 | grep -v "memorizing:" | tee "$OUT/speed.log"
speed=${PIPESTATUS[0]}
echo "tests rc $tests, speed rc $speed"
exit $((tests || speed))
