#!/usr/bin/env bash
# One GPU session's checks and measurements, in the order that matters most when device time
# is short: `sae-sparse doctor` (every op, backend and path against the float64 reference on
# this card, then the fused path, the torch composition and the bare GEMM timed at shapes
# A-D, with the path chosen), install (no network), the GPU tests, the benchmark (saved to
# benchmarks/results/),
# the encode and decode sweeps, the step profile, adapter steps over millions of latents.
# Each part has its own time limit (under the device tool's 10 minutes per call) and writes a
# log to $OUT (default
# benchmarks/results/session-<date>/); a failing part does not stop the others. A short
# summary is printed last. Everything takes longer than one 10-minute call, so pick parts.
#
# A 15-minute lease (start-up, idle waits and hand-back included) has room for one call:
#
#     OUT=$OUT PARTS="doctor gputests bench" bash benchmarks/gpu_session.sh  # run: timeout_s 560
#
# It skips the install (the triton backend needs no C++ build; PYTHONPATH points here), runs
# the doctor (doctor.log: its table; doctor.json: the same for scripts), the GPU-only tests at realistic sizes and torch.compile on CUDA, then the benchmark at every
# shape (rows are printed as each shape ends, so a time limit keeps the finished
# shapes). With more device time, in this order:
#
#     OUT=$OUT PARTS="install tests" bash benchmarks/gpu_session.sh
#     OUT=$OUT PARTS="bench" bash benchmarks/gpu_session.sh
#     OUT=$OUT PARTS="encode decode profile" bash benchmarks/gpu_session.sh
#     OUT=$OUT PARTS="scale" bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/session-$(date +%F)}
PARTS=${PARTS:-"doctor gputests bench"}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
summary=()

part() {  # part NAME SECONDS COMMAND...
    local name=$1 secs=$2
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return ;; esac
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-8s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" \
        "$(tail -n 1 "$OUT/$name.log" | cut -c1-120)")")
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } >"$OUT/card.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    >>"$OUT/card.txt" 2>&1
git rev-parse --short HEAD >>"$OUT/card.txt" 2>&1

# first: is what the card computes right? (exit 1 on any mismatch; its JSON beside the log)
part doctor 200 python -m sae_sparse.doctor --save "$OUT/doctor.json"
# no network on the device: build the extension against the torch that is there
part install 240 pip install -e . --no-build-isolation --no-deps -q
# the GPU image has no pytest-xdist: replace pyproject's addopts (-n auto) by their other half
NOXDIST=(-o "addopts=-ra -m 'not exhaustive'")
part tests 330 python -m pytest -q "${NOXDIST[@]}" tests/test_triton_gpu.py tests/test_triton.py \
    tests/test_custom_ops.py tests/test_auxk.py tests/test_fold_cache.py tests/test_modules.py
part gputests 200 python -m pytest -q "${NOXDIST[@]}" tests/test_triton_gpu.py \
    "tests/test_custom_ops.py::test_torch_compile_traces_the_op" \
    "tests/test_custom_ops.py::test_torch_compile_traces_the_public_api"
part bench 330 python -u benchmarks/bench_gpu.py --save
part encode 300 python benchmarks/encode_sweep.py --quick
part decode 180 python benchmarks/decode_sweep.py
part profile 100 python benchmarks/profile_steps.py --shape A
part scale 400 python benchmarks/bench_scale.py --save

cat "$OUT/card.txt"
printf '%s\n' "${summary[@]}"
