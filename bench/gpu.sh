#!/usr/bin/env bash
# GPU benchmarks on one GPU machine, in under 10 minutes, with only this repository:
#
#   GPU=1 make setup && bash bench/gpu.sh            # DET_2_5G=/path/det_2.5g.onnx to add SCRFD-2.5GF
#   SMOKE=1 bash bench/gpu.sh                        # here, on CPU: every line runs once, in ~30 s
#
# Parts, each under a hard wall-clock limit (timeout(1) stops a part that overruns; the next runs):
#   faces  bench/gpu_faces.py  onnxruntime-gpu SCRFD at 640 px: CUDA EP (+ TensorRT EP if usable),
#                              batched + IO binding, decode excluded and included; ratio vs 2,000 img/s
#   train  bench/gpu_train.py  torchvision ResNet-50, 224 px, bf16, channels_last; ratio vs 2,470 img/s (A100)
#   input  bench/train_input.py --only shards: the training loader from webdataset shards on local disk
#                              (training.input = "shards"), 224 px crops, one worker per CPU core;
#                              ratio vs 2,000 img/s (can the CPUs feed the GPU?)
# Without a GPU (and without SMOKE=1) it stops at once with the reason, exit status 2.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
SMOKE=${SMOKE:-0}
FACES_LIMIT_S=270   # the faces part's own budget is 210 s (--budget); the rest is start-up and slack
TRAIN_LIMIT_S=150   # 60 s timed + warm-up (cudnn.benchmark) + model and CUDA start-up
INPUT_LIMIT_S=150   # writing 1,500 synthetic JPEGs and their shards (~60-90 s), then 3 x 4 timed epochs
started=$(date +%s)

fail() { echo "gpu.sh: $*" >&2; exit 2; }

[ -x "$PY" ] || fail "$PY is missing: run 'GPU=1 make setup' first"
cores=$(nproc)
input=(--images 1500 --epochs 4 --repeats 3 --workers "$cores")
if [ "$SMOKE" = 1 ]; then
    echo "gpu.sh: SMOKE=1: CPU provider, tiny sizes, a few iterations (no figure here means anything)"
    mode=(--smoke)
    input=(--images 80 --epochs 1 --repeats 1 --workers 1 --batch 8 --image-size 32)
else
    mode=(--require-gpu)
    command -v nvidia-smi > /dev/null || fail "no nvidia-smi on PATH: this is not a GPU machine (SMOKE=1 runs on CPU)"
    gpus=$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader) \
        || fail "nvidia-smi failed or hung: no usable GPU driver"
    [ -n "$gpus" ] || fail "nvidia-smi lists no GPU"
    echo "gpu.sh: $gpus"
    timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || fail "torch sees no CUDA device (torch build: $("$PY" -c 'import torch; print(torch.__version__)' 2>&1))"
    timeout 60 "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
        || fail "onnxruntime has no CUDAExecutionProvider: run 'GPU=1 make setup' (it swaps in onnxruntime-gpu)"
fi
if [ -n "${DET_2_5G:-}" ] && [ ! -f "$DET_2_5G" ]; then
    fail "DET_2_5G=$DET_2_5G is not a file"
fi

failed=()
part() {  # part NAME LIMIT_S COMMAND...: run under a hard limit, record a failure, never stop the script
    local name=$1 limit=$2
    shift 2
    echo
    echo "==== $name (limit ${limit} s)"
    timeout --kill-after=15 "$limit" "$@"
    local rc=$?
    case $rc in
        0) ;;
        124|137) echo "gpu.sh: part '$name' stopped at its ${limit} s limit" >&2; failed+=("$name (time limit)") ;;
        *) echo "gpu.sh: part '$name' failed (exit status $rc)" >&2; failed+=("$name (exit $rc)") ;;
    esac
}

# -u: unbuffered, so a part stopped at its limit still shows what it measured
part faces "$FACES_LIMIT_S" "$PY" -u bench/gpu_faces.py --budget 210 "${mode[@]}" ${DET_2_5G:+--det-2-5g "$DET_2_5G"}
part train "$TRAIN_LIMIT_S" "$PY" -u bench/gpu_train.py --seconds 60 "${mode[@]}"
part input "$INPUT_LIMIT_S" "$PY" -u bench/train_input.py --only shards --goal 2000 "${input[@]}"

echo
echo "gpu.sh: $(( $(date +%s) - started )) s in all"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu.sh: failed parts: ${failed[*]}" >&2
    exit 1
fi
