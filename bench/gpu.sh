#!/usr/bin/env bash
# The GPU figures of the README's performance table, in one run that fits a short GPU lease (about 10 minutes).
#
#   bash bench/gpu.sh                  # results (JSON + the printed tables) in bench/results/, or in $OUT when set
#
# Meant for a bare machine that has torch with CUDA: Python packages it lacks are installed from wheels in
# bench/wheels/ (fetch them first where there is a package index:
#   pip download --no-deps -d bench/wheels diffusers==0.42.1 pydantic pydantic-core annotated-types typing-inspection
# ), never from the network. Each benchmark has its own time limit, so one that overruns (a slow compile) still
# leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

for module in diffusers pydantic yaml safetensors accelerate peft; do
    if ! python -c "import $module" 2>/dev/null; then
        wheels=$(ls bench/wheels/*.whl 2>/dev/null)
        [ -n "$wheels" ] && pip install -q --no-index --no-deps $wheels
        break
    fi
done
python - <<'EOF' | tee "$OUT/machine.txt"
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF

run() {  # run <seconds> <name> <train_bench.py arguments...>
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" python bench/train_bench.py --out "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.txt" | tail -12
}

# SD 1.5 at 512 px: the recipe against the stage, eager (bf16 frozen weights, fused AdamW, channels-last).
run 200 sd15-b16 --arch sd15 --resolution 512 --batch-size 16 --steps 30 --warmup 5
# The same stage compiled: CUDA graphs cut the launch overhead that bounds batch 8-16 (NOTES: 0.19 s/step either way).
run 240 sd15-b16-compiled --arch sd15 --resolution 512 --batch-size 16 --steps 30 --warmup 5 --compile \
    --compile-mode reduce-overhead --variants stage-fast
# SDXL at 1024 px: recipe and stage, eager.
run 150 sdxl-b4 --arch sdxl --resolution 1024 --batch-size 4 --steps 10 --warmup 3 --variants recipe,stage-fast
ls -l "$OUT"
