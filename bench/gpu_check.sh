#!/usr/bin/env bash
# One-shot self-check of the device path, bounded in time, with a compact summary:
#   synthesize (SARDFQ, fp32 and a short bf16 run) → quantize + block reconstruction → export →
#   validate, all with --device; then quantize + reconstruction under torchrun (1 process per GPU;
#   2 processes, compared with 1, when there are 2 GPUs; on the CPU 2 gloo processes).
#
#   bash bench/gpu_check.sh                    # on a GPU host: --device cuda, 5-minute budget
#   bash bench/gpu_check.sh --device cpu       # smoke test anywhere (tiny settings, ~3 min on 2 busy cores)
#   PYTHON=/path/to/python bash bench/gpu_check.sh   # a Python that has sardfq-export installed
#
# Uses the embedded reference model (offline) and Fashion-MNIST when installed (else no accuracy).
# With TensorRT importable and CUDA, export builds an engine and validate runs it. Exit 0 when
# every step passed, 1 otherwise (the summary says which); work files stay in --work (default a
# fresh /tmp folder) for a look afterwards.
set -uo pipefail

device=cuda
budget=300
work=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "usage: bash bench/gpu_check.sh [--device cuda|cuda:N|cpu] [--budget SECONDS] [--work DIR]" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$(bash "$root/tools/dev.sh" venv)/bin/python}
work=${work:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$work"
deadline=$((SECONDS + budget))
summary="$work/summary.tsv"
: > "$summary"

if [ "${device%%:*}" = cuda ]; then
  images=32; iters=100; recon=50; limit=2000; batches=1,32; scheme=w4a8  # w4a8: GPTQ + recon on the GPU
else
  images=4; iters=4; recon=2; limit=100; batches=1; scheme=w8a8  # the same steps, as small as they go
fi
data=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && data=(--data fashion-mnist --limit "$limit")

cli=("$py" -m sardfq_export)

# step NAME CMD...: runs CMD within what is left of the budget; its last JSON line is kept as NAME.json.
step() {
  local name=$1; shift
  local left=$((deadline - SECONDS))
  if [ "$left" -le 5 ]; then
    printf '%s\tSKIP\t0\tout of time budget\n' "$name" >> "$summary"; return 1
  fi
  local t0=$SECONDS rc
  timeout "$left" "$@" > "$work/$name.out" 2> "$work/$name.err"
  rc=$?
  grep '^{' "$work/$name.out" | tail -1 > "$work/$name.json"
  if [ $rc -eq 0 ]; then
    printf '%s\tok\t%s\t%s\n' "$name" $((SECONDS - t0)) "$("$py" "$work/note.py" "$name" "$work/$name.json")" >> "$summary"
  else
    local why; why=$([ $rc -eq 124 ] && echo "timed out" || tail -1 "$work/$name.err" | cut -c1-160)
    printf '%s\tFAIL(%s)\t%s\t%s\n' "$name" $rc $((SECONDS - t0)) "$why" >> "$summary"
  fi
  return $rc
}

# One line of numbers per step, read off its --json output.
cat > "$work/note.py" <<'EOF'
import json, sys
name, path = sys.argv[1], sys.argv[2]
try:
    r = json.load(open(path))
except Exception:
    print(""); sys.exit()
if name == "env":
    print(f"torch {r['torch']}, cuda {r['cuda']}, {r['gpus']}, bf16 {r['bf16']}, tensorrt {r['tensorrt']}")
elif name.startswith("synthesize"):
    print(f"{r['num_images']} images, {r['iters']} it in {r['wall_time_s']} s on {r['device']} ({r['precision']})")
elif name == "torchrun_compare":
    print(r.get("note", ""))
elif name.startswith("quantize") or name.startswith("torchrun"):
    rec = r.get("recon") or {}
    print(f"{r['scheme']}, recon final mse {rec.get('final_mse', float('nan')):.3g}, "
          f"{rec.get('processes', 1)} process(es), {r.get('device')}, {r['seconds']} s")
elif name == "export":
    print(f"opset {r.get('opset')}, lint {'passed' if (r.get('lint') or {}).get('passed') else 'FAILED'}"
          + (", engine built" if r.get("engine") else ""))
elif name == "validate":
    acc, fid, lat = r.get("accuracy") or {}, r.get("fidelity") or {}, r.get("latency") or {}
    parts = [f"torch on {(r.get('runtime') or {}).get('device_name')}"]
    if acc:
        parts.append(f"top-1 fp32 {acc['fp32_top1'] * 100:.2f}% deployed {acc['deployed_top1'] * 100:.2f}% (n={acc['n']})")
    parts.append(f"agreement vs fake-quant {fid.get('agreement_vs_fakequant')}")
    for b, row in (lat.get("by_batch") or {}).items():
        parts.append(f"b{b} {row.get('speedup', float('nan')):.2f}x")
    parts.append(f"gates {'passed' if (r.get('gates') or {}).get('passed') else 'FAILED'}")
    print(", ".join(parts))
EOF

# 0. what is here
step env "$py" -c '
import json, torch
try:
    import tensorrt; trt = tensorrt.__version__
except Exception:
    trt = None
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else "no GPU",
    "bf16": cuda and torch.cuda.is_bf16_supported(), "tensorrt": trt}))'
has_trt=$("$py" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(int(bool(r["tensorrt"] and r["gpus"] != "no GPU")))' "$work/env.json" 2>/dev/null || echo 0)
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)

# 1. synthesis on the device (fp32, the product default), and a short bf16 run
step synthesize "${cli[@]}" synthesize --method sardfq --num-images "$images" --batch-size "$images" --iters "$iters" \
  --device "$device" --out "$work/calib.safetensors" --overwrite --no-samples --json
step synthesize_bf16 "${cli[@]}" synthesize --method sardfq --num-images "$images" --batch-size "$images" --iters $((iters < 10 ? iters : 10)) \
  --device "$device" --precision bf16 --out "$work/calib_bf16.safetensors" --overwrite --no-samples --json

# 2. calibration + GPTQ + block reconstruction on the device
step quantize "${cli[@]}" quantize --calib "$work/calib.safetensors" --num-images "$images" --scheme "$scheme" --finetune recon \
  --iters "$recon" --device "$device" --out "$work/q" --json

# 3. export (TensorRT engine when TensorRT and a GPU are here), 4. validate
if [ "$has_trt" = 1 ]; then
  step export "${cli[@]}" export --quantized "$work/q" --out "$work/model.onnx" --target tensorrt --device "$device" --json
  engine=(--engine "$work/model.engine")
else
  step export "${cli[@]}" export --quantized "$work/q" --out "$work/model.onnx" --target onnxruntime --device "$device" --json
  engine=()
fi
step validate "${cli[@]}" validate --quantized "$work/q" --onnx "$work/model.onnx" "${engine[@]}" --images "$work/calib.safetensors" \
  "${data[@]}" --batches "$batches" --device "$device" --no-default-gates --min-agreement 0.9 --out "$work/v" --json

# 5. torchrun: fine-tuning data-parallel (NCCL on cuda:LOCAL_RANK, gloo on the CPU)
run_tr=("$py" -m torch.distributed.run --standalone)
tr_args=(-m sardfq_export quantize --calib "$work/calib.safetensors" --num-images "$images" --scheme "$scheme"
  --finetune recon --iters "$recon" --device "$device" --json)
if [ "${device%%:*}" = cuda ]; then
  # One GPU: the CLI under torchrun takes cuda:LOCAL_RANK (a 1-process group is not formed, so NCCL
  # itself is exercised only with 2 GPUs, below).
  step torchrun_1gpu "${run_tr[@]}" --nproc-per-node 1 "${tr_args[@]}" --out "$work/q_tr1"
  other="$work/q_tr1"
  if [ "$gpus" -ge 2 ]; then
    step torchrun_2gpu "${run_tr[@]}" --nproc-per-node 2 "${tr_args[@]}" --out "$work/q_tr2"
    other="$work/q_tr2"
  fi
else
  step torchrun_2cpu env OMP_NUM_THREADS=1 "${run_tr[@]}" --nproc-per-node 2 "${tr_args[@]}" --out "$work/q_tr2"
  other="$work/q_tr2"
fi
if [ -n "$other" ] && [ -d "$other" ]; then
  # K processes take the same steps as one (up to float summation order): compare the saved state.
  step torchrun_compare "$py" -c '
import json, sys, torch
from safetensors.torch import load_file
a, b = (load_file(f"{d}/quantized/state.safetensors") for d in sys.argv[1:3])
worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
ok = a.keys() == b.keys() and worst < 5e-3  # Adam turns float noise into steps of up to lr x iters
print(json.dumps({"note": f"1 vs K processes: {len(a)} tensors, max |diff| {worst:.2e}"}))
sys.exit(0 if ok else 1)' "$work/q" "$other"
fi

echo "gpu_check on --device $device (budget ${budget}s, used ${SECONDS}s; files in $work)"
column -t -s $'\t' "$summary" 2>/dev/null || cat "$summary"
! grep -q -P '\t(FAIL|SKIP)' "$summary"
