#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU: install, then the CUDA tests, the demo's fp32 / fp16
# exports validated on CUDAExecutionProvider (asked for explicitly, so a silent CPU fallback is an error), and
# generation through onnxruntime-genai on CUDA. Figures and reports land in ${OUT:-gpu_check_out}/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/summary.txt"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
pip install -q torch==2.13.0 && pip install -q -e ".[dev]" || { log "install failed"; exit 1; }
python -c "import onnxruntime as o; print('ORT', o.__version__, o.get_available_providers())" | tee -a "$out/summary.txt"

log "pytest -m gpu"
python -m pytest -q -m gpu 2>&1 | tail -5 | tee -a "$out/summary.txt"

work=$(mktemp -d)
cp models/demo.pt "$work/"
log "export merged + fp16, validate on cuda"
lora-export "$work/demo.pt" --fp16 --providers cpu,cuda --report "$out/fp32_parity" --json > "$out/fp32.json"
echo "exit $?" | tee -a "$out/summary.txt"
lora-export validate "$work/demo.fp16.onnx" --checkpoint "$work/demo.pt" --providers cuda --report "$out/fp16_parity" \
    --json > "$out/fp16.json"
echo "exit $?" | tee -a "$out/summary.txt"
log "genai on cuda"
lora-export "$work/demo.pt" --genai --adapters-as-inputs --no-validate -o "$work/genai" --quiet
lora-export generate "$work/genai" --prompt 'def ' --max-new-bytes 40 --device cuda 2>&1 | tee -a "$out/summary.txt"
