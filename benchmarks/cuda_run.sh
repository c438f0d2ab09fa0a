#!/usr/bin/env bash
# The GPU checks in one prepared run (a GPU machine is lent for minutes, not hours):
#   1. tests/cockpit/test_cuda.py: engine, curvature and a Cockpit log on CUDA against the
#      CPU float64 references;
#   2. workload B on CUDA: our presets beside Cockpit 1.0.2's, then our first-order
#      quantities beside BackPACK/Opacus/torch.func, then curvature beside BackPACK.
# Usage: bash benchmarks/cuda_run.sh OUT_DIR   (from the repository root; PYTHON=python3).
# The reference packages come from COCKPIT_BENCH_REF_PYTHON / COCKPIT_BENCH_REF_PATH when
# set (see benchmarks/reference_env.py), else from .bench-venv. Every stage has its own
# time limit and the results so far are packed into OUT_DIR/cuda.tgz after each, so a
# lease that ends early still returns what was measured. One process per suite
# (--one-process: CUDA start-up costs seconds per process) and short timed blocks
# (0.1 s plain, at most 1 s per configuration block, 10 interleaved repetitions).
set -u
out=${1:?usage: bash benchmarks/cuda_run.sh OUT_DIR}
py=${PYTHON:-python3}
res=${CUDA_RES_DIR:-$out/res}
mkdir -p "$res"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COCKPIT_BENCH_SOURCE=worktree
pack() { tar czf "$out/cuda.tgz" -C "$res" . ; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$res/gpu.txt" 2>&1
"$py" -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())' >>"$res/gpu.txt" 2>&1
cat "$res/gpu.txt"
timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/cockpit/test_cuda.py 2>&1 | tee "$res/test_cuda.log" | tail -15
pack
common=(--device cuda --one-process --workloads B --min-block-s 0.1 --max-block-s 1 --out "$res")
timeout 160 "$py" -m benchmarks presets "${common[@]}" \
  --configs "${PRESETS:-ours_economy,ours_business,ours_business_mc,ours_full,ref_economy,ref_business,ref_full}" \
  >"$res/presets.log" 2>&1; echo "presets rc=$?"; pack
timeout 150 "$py" -m benchmarks "${ENGINE_TARGET:-all}" "${common[@]}" >"$res/engine.log" 2>&1; echo "engine rc=$?"; pack
timeout 110 "$py" -m benchmarks curvature "${common[@]}" ${CURVATURE:+--configs "$CURVATURE"} >"$res/curvature.log" 2>&1; echo "curvature rc=$?"; pack
grep -h "x (" "$res"/*.log | head -60
