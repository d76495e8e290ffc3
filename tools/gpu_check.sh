#!/usr/bin/env bash
# The GPU check: one call on a machine with an NVIDIA GPU, under 8 minutes in all. Each step runs under `timeout`,
# capped by what is left of BUDGET_S (the whole), so a slow step shortens or skips the later ones instead of
# overrunning; every step's exit status and time go to ${OUT}/summary.txt.
#
#   1. install (below), versions, the GPU;
#   2. lora-train adapt models/demo-base.pt --device cuda --precision bf16 --steps 200: timed, the training
#      record's losses (first / last), held-out losses, world size, global batch -> train_cuda.json;
#   3. tools/bench_train.py --device cuda --rounds 2: training throughput, 1 process (and 2 on two GPUs), fp32 /
#      bf16 / fp16, demo and 25M -> bench_train_cuda.json / .md;
#   4. pytest -m gpu;
#   5. ONNX Runtime on CUDA, where its CUDAExecutionProvider really runs (else recorded as skipped): the demo's
#      fp32 / fp16 exports validated on --providers cuda (asked for explicitly, so a silent CPU fallback is an
#      error), and generation through onnxruntime-genai on CUDA.
# tools/bench_perf.py and tools/bench_decode.py are not run: they have no CUDA option (CPUExecutionProvider only).
#
# Install. The device machine reaches no package registry; its image's python3 holds torch (CUDA), onnx,
# onnxruntime (CPU), onnxscript, click, numpy, safetensors, matplotlib, tqdm, pytest. The rest travels as wheels in
# .whl/ (named in the call's carry) and goes, with this project, into /tmp/site (pip --no-index --no-deps
# --target; PYTHONPATH and PATH point there). Fetch the wheels once, here, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
#     onnxslim==0.1.98 onnx-ir==1.1.0
# onnxruntime-gpu (some 300 MB) cannot travel (64 MiB a call), nor onnxruntime-genai-cuda, which needs it: hence
# step 5 runs only where the machine's own onnxruntime runs CUDA.
#
# The device call:  run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Everything lands in ${OUT:-gpu_check_out}/: summary.txt, train_cuda.json, bench_train_cuda.json/.md, and
# logs.tgz (each step's log, the parity reports): five files, as the device's 8-file limit wants.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
logs=$(mktemp -d)  # packed into $out/logs.tgz at the end
work=$(mktemp -d)
BUDGET_S=${BUDGET_S:-465}  # + at most 10 s of kill grace and the packing: under 8 minutes
deadline=$(($(date +%s) + BUDGET_S))
failed=()
last_s=0  # the last step's seconds

log() { echo "== $*" | tee -a "$out/summary.txt"; }

# step NAME LIMIT_S COMMAND...: COMMAND under timeout (LIMIT_S, never past the deadline), output in $logs/NAME.log;
# its seconds in last_s.
step() {
    local name=$1 limit=$2 left rc began ms
    shift 2
    left=$((deadline - $(date +%s)))
    ((left < limit)) && limit=$left
    if ((limit < 15)); then
        log "$name: skipped (time budget spent)"
        failed+=("$name")
        return 99
    fi
    began=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - began) / 1000000))
    last_s=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
    ((rc == 124)) && log "$name: timed out after $limit s"
    log "$name: exit $rc in $last_s s"
    ((rc == 0)) || failed+=("$name")
    return $rc
}

finish() {
    ((${#failed[@]})) && log "failed or skipped: ${failed[*]}" || log "no step failed"
    tar czf "$out/logs.tgz" -C "$logs" . && rm -rf "$logs" "$work"
    exit $((${#failed[@]} ? 1 : 0))
}

timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 \
    | tee -a "$out/summary.txt"

# 1. install
if ! ls .whl/*.whl >/dev/null 2>&1; then
    log "install: no wheels in .whl/ (fetch them as this script's header says, and name .whl in the call's carry)"
    failed+=(install)
    finish
fi
step install 150 python3 -m pip install --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl . || { tail -5 "$logs/install.log" | tee -a "$out/summary.txt"; finish; }
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
timeout 60 python3 -c "import sys, torch, onnxruntime as o; print('python', sys.version.split()[0], '| torch',
    torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), '| ORT', o.__version__,
    o.get_available_providers())" 2>&1 | tee -a "$out/summary.txt"

# 2. training on CUDA, bf16
if step train_cuda 150 lora-train adapt models/demo-base.pt -o "$work/cuda-adapt.pt" --device cuda --precision bf16 \
    --steps 200; then
    timeout 60 python3 - "$work/cuda-adapt.pt" "$out/train_cuda.json" "$last_s" <<'EOF' 2>&1 | tee -a "$out/summary.txt"
import json, sys
from lora_export.model.checkpoint import read_checkpoint
t = read_checkpoint(sys.argv[1])["training"]
keep = ("world_size", "global_batch", "batch_size", "seq_len", "steps", "device", "precision", "base_eval_loss",
        "adapted_eval_loss", "eval_losses", "torch_version")
record = {"command_s": float(sys.argv[3]), "loss_first": t["losses"][0], "loss_last": t["losses"][-1],
          **{k: t[k] for k in keep}}
open(sys.argv[2], "w").write(json.dumps(record, indent=1) + "\n")
print(f"train_cuda: {record['command_s']:.1f} s, loss {record['loss_first']:.4f} -> {record['loss_last']:.4f}, "
      f"held-out {record['base_eval_loss']:.4f} -> {record['adapted_eval_loss']:.4f}, {t['device']} {t['precision']}")
EOF
fi

# 3. training throughput on CUDA
step bench_train 270 python3 tools/bench_train.py --device cuda --rounds 2 --results "$out"
[[ -f $out/bench_train_cuda.md ]] && grep '^| ' "$out/bench_train_cuda.md" >>"$out/summary.txt"

# 4. the GPU-marked tests
step pytest_gpu 120 python3 -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors
tail -3 "$logs/pytest_gpu.log" | tee -a "$out/summary.txt"

# 5. ONNX Runtime on CUDA, where it runs
if ! timeout 60 python3 - <<'EOF' >"$logs/ort_cuda_probe.log" 2>&1; then
import onnx, onnxruntime as ort
from onnx import helper, TensorProto
io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy"]
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", io[:1], io[1:])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
got = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"]).get_providers()
raise SystemExit(0 if got[0] == "CUDAExecutionProvider" else 1)
EOF
    log "ORT CUDA steps: skipped (this onnxruntime has no working CUDAExecutionProvider; onnxruntime-gpu cannot travel)"
    finish
fi
cp models/demo.pt "$work/"
step export_fp32_fp16_cuda 90 lora-export "$work/demo.pt" --fp16 --providers cpu,cuda --report "$logs/fp32_parity" \
    --json
step validate_fp16_cuda 60 lora-export validate "$work/demo.fp16.onnx" --checkpoint "$work/demo.pt" --providers cuda \
    --report "$logs/fp16_parity" --json
if step genai_export 60 lora-export "$work/demo.pt" --genai --adapters-as-inputs --no-validate -o "$work/genai" \
    --quiet; then
    step genai_cuda 60 lora-export generate "$work/genai" --prompt 'def ' --max-new-bytes 40 --device cuda
    tail -3 "$logs/genai_cuda.log" | tee -a "$out/summary.txt"
fi
finish
