#!/usr/bin/env bash
# Every GPU benchmark and the accelerator-path tests in one run: ~6-8 minutes on an H100.
# Test it on CPU first with SMOKE=1 (tiny).
#   bash benchmarks/gpu_session.sh             # on the GPU machine, from the repository root
# Writes results/benchmarks/<gpu name>/gpu_*.{json,md}; every file is rewritten after each
# measured row, so a run cut short by its time limit keeps what it measured.
# Needs jax, flax, optax, orbax and pandas; the fig6 estimate (--preset) also needs hydra-core
# and omegaconf and is skipped without them.
set -u
PY=${PY:-python3}
OUT_ARG=${OUT:+--out $OUT}   # OUT=dir writes there instead (the smoke test)
if [ "${SMOKE:-0}" = 1 ]; then
  DEPTHS="8 14"; FIG6=""; STEPS="--steps 2 --repeats 1"; SEEDS="1 2"; EXTRA="--image-size 8"
else
  DEPTHS="20 56 110"; FIG6=1; STEPS="--steps 100 --repeats 3"; SEEDS="1 4 16"; EXTRA=""
fi
"$PY" -c "import jax; print(jax.devices())"
# The accelerator path through the real loop: scanned stages and steps, bfloat16, seed groups.
if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_modes.py
fi
# ResNet-20/56/110 and the plain nets, fp32 and bf16: step time, CIFAR-10 epoch seconds
# (target: ResNet-56 bf16 <= 0.5 s on an H100), compile time, peak memory.
"$PY" -m benchmarks.step_time --models plain residual --depths $DEPTHS \
  --precisions float32 bfloat16 $STEPS $EXTRA $OUT_ARG --name gpu_plain_residual_fp32_bf16
# Several seeds of one small net as one program against one seed (images/s of all seeds).
"$PY" -m benchmarks.step_time --models residual --depths ${DEPTHS%% *} --precisions bfloat16 \
  --vmap-seeds $SEEDS $STEPS $EXTRA $OUT_ARG --name gpu_vmap_seeds
# The whole he2015_fig6 preset's wall time on this GPU (its 8 nets, 64k iterations each).
if [ -n "$FIG6" ] && "$PY" -c "import hydra" 2>/dev/null; then
  "$PY" -m benchmarks.step_time --preset he2015_fig6 --precisions float32 bfloat16 $STEPS $OUT_ARG \
    --name gpu_he2015_fig6_estimate
fi
