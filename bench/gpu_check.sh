#!/usr/bin/env bash
# The whole GPU check in one call (issue 13). Prepare here, then run on the GPU machine:
#
#   bash bench/gpu_wheels.sh                      # here: wheels the GPU machine lacks -> .whl/
#   device run, carry [".whl"], timeout 600:  bash bench/gpu_check.sh
#
# On the GPU machine it: installs the carried wheels into /tmp/site; runs the CUDA tests
# (torch engine on CUDA bit-identical to the CPU kernels, tensor and CLI level); synthesizes
# a family of Llama-7B-shaped layers (hidden 4096, intermediate 11008, vocab 32000, bf16;
# LAYERS of them, 12 by default: 3 x 5.4 GB of inputs and five 5.4 GB outputs fit a 64 GB disk);
# runs bench/merge_bench.py --device cuda: ours on CUDA (torch engine), ours on the CPU
# (kernels, all cores), mergekit 0.1.5 with --cuda, and the I/O floor, side by side; prints the
# table and writes it as JSON to $OUT (or bench/out/) with the test log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
LAYERS="${LAYERS:-12}"
ROUNDS="${ROUNDS:-1}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== CUDA tests =="
# conftest.py starts the test Hub and needs the project's own huggingface_hub: not here
python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_torch_engine.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark: $LAYERS Llama-7B-shaped layers =="
mk=()
cat > /tmp/mergekit-yaml <<'SH'
#!/bin/sh
exec python3 -c "import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; main()" "$@"
SH
chmod +x /tmp/mergekit-yaml
if /tmp/mergekit-yaml --help >/dev/null 2>&1; then
  export MERGEKIT_YAML=/tmp/mergekit-yaml
else
  echo "gpu_check: mergekit does not import here; measuring without it"
  mk=(--no-mergekit)
fi
python3 bench/merge_bench.py --device cuda --hidden 4096 --intermediate 11008 --heads 32 --vocab 32000 \
  --layers "$LAYERS" --rounds "$ROUNDS" --exact-layers 0 "${mk[@]}" --json "$OUT/gpu_results.json" \
  2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
