#!/usr/bin/env bash
# The GPU checks and the GPU figures of the README's performance table, for a short GPU lease.
#
#   bash bench/fetch_wheels.sh                           # first, where a package index is reachable
#   bash bench/gpu.sh checks sd15-lora                   # at most 6 minutes on one H100/H200: correctness first
#   bash bench/gpu.sh sd15-lora-compiled sdxl-lora sd15-full   # at most 8 minutes (the compile alone can take 2-3)
#   bash bench/gpu.sh                                    # all five, one after the other
#
# `checks` runs bench/gpu_checks.py: every stage and training option on the GPU with the tiny models, and the host
# syncs per training step. The others run bench/train_bench.py on the real SD 1.5 / SDXL shapes.
#
# Results (JSON, each run's log, and a summary table) go to bench/results/, or to $OUT when set. The packages the
# machine lacks are installed from bench/wheels/ into a scratch folder, never from the network. Each benchmark has its
# own time limit, so one that overruns (a slow compile) still leaves the others' results; the summary reads them all.
# BENCH_EXTRA is added to every benchmark's arguments (later ones win): a dry run of the whole script on a CPU is
#   BENCH_EXTRA="--arch tiny --device cpu --steps 2 --warmup 2 --batch-size 2" bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ! python3 -c "import diffusers, peft, pydantic, yaml, safetensors, accelerate, transformers" 2>/dev/null; then
    if ! ls bench/wheels/*.whl >/dev/null 2>&1; then
        echo "bench/gpu.sh: this Python lacks packages the bench needs and bench/wheels/ is empty;" \
            "run bash bench/fetch_wheels.sh where a package index is reachable, then carry bench/wheels" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sdft-site \
        bench/wheels/*.whl || exit 2
    export PYTHONPATH=/tmp/sdft-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'EOF' | tee "$OUT/machine.txt"
import diffusers, peft, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
EOF

run() {  # run <seconds> <name> <train_bench.py arguments...>
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    # shellcheck disable=SC2086  # BENCH_EXTRA is a list of arguments
    timeout "$limit" python3 bench/train_bench.py --out "$OUT/$name.json" "$@" ${BENCH_EXTRA:-} >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -12 "$OUT/$name.log"
    [ $rc -eq 0 ] || echo "!! $name ended with exit status $rc (124: over its ${limit}s limit); log: $OUT/$name.log"
}

benchmark() {
    case $1 in
    checks)
        echo "== checks (limit 200s)"
        OUT="$OUT" timeout 200 python3 bench/gpu_checks.py >"$OUT/checks.log" 2>&1
        local rc=$?
        grep -E '^(ok|FAIL) |checks passed' "$OUT/checks.log"
        [ $rc -eq 0 ] || echo "!! checks ended with exit status $rc (124: over the limit); log: $OUT/checks.log"
        ;;
    # SD 1.5 at 512 px, UNet LoRA: the recipe against the stage, fp32 (the un-optimised loss curve) and eager bf16.
    sd15-lora) run 170 sd15-lora --arch sd15 --batch-size 16 --steps 30 --warmup 10 ;;
    # The same stage compiled with CUDA graphs, which cut the launch overhead that bounds batch 8-16 (NOTES: 0.19 s per
    # step at either size). Compiling the training step takes minutes on a bare machine.
    sd15-lora-compiled)
        run 270 sd15-lora-compiled --arch sd15 --batch-size 16 --steps 30 --warmup 10 --variants stage-fast \
            --compile --compile-mode reduce-overhead
        ;;
    # Full fine-tuning of the whole UNet: diffusers' train_text_to_image.py loop against the stage, eager.
    sd15-full)
        run 110 sd15-full --arch sd15 --method full --batch-size 16 --steps 20 --warmup 5 --variants recipe,stage-fast
        ;;
    # SDXL at 1024 px, UNet LoRA: recipe and stage, eager.
    sdxl-lora) run 110 sdxl-lora --arch sdxl --batch-size 4 --steps 10 --warmup 5 --variants recipe,stage-fast ;;
    *)
        echo "bench/gpu.sh: unknown benchmark $1 (checks, sd15-lora, sd15-lora-compiled, sd15-full, sdxl-lora)" >&2
        return 2
        ;;
    esac
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(checks sd15-lora sd15-lora-compiled sdxl-lora sd15-full)
for name in "${names[@]}"; do
    benchmark "$name"
done
python3 bench/summary.py "$OUT" | tee "$OUT/summary.md"
