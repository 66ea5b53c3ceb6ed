#!/usr/bin/env bash
# The GPU figures in one run (docs/benchmarks.md, "GPU"):
#
#   bash benchmarks/gpu_suite.sh WHEEL_DIR OUT_DIR          # on a CUDA machine
#   bash benchmarks/gpu_suite.sh WHEEL_DIR OUT_DIR --smoke  # the same steps, tiny, on the CPU
#
# WHEEL_DIR holds wheels of the packages the machine lacks (hydra-core, omegaconf,
# antlr4-python3-runtime); they are installed without network into a private folder that is put
# on PYTHONPATH. Pass "-" when everything is installed. Each step writes its log to OUT_DIR
# (unbuffered); a failing step is reported and the next one still runs; the exit status is the
# number of failed steps. Steps:
#   machine.txt      GPU, driver, torch / transformers versions
#   relevancy.log    engine vs reference, 8 targets, the mid-size model, bfloat16
#   relevancy_profile.log  phase timings and torch.profiler table of one engine call
#   relevancy_4b.log the same comparison at MedGemma 4B's text shape (34 layers, hidden 2560)
#   medgemma.log     MedGemma 4B shape: seconds per study at batch 1 and 16, peak memory, profile
#   e2e.log          run_pipeline.py on the demo model with model.device=cuda, and its summary
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash benchmarks/gpu_suite.sh WHEEL_DIR|- OUT_DIR [--smoke]" >&2
  exit 2
fi
WHEELS=$1
OUT=$2
SMOKE=${3:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "$WHEELS" != "-" ]; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$SMOKE" = "--smoke" ]; then
  DEV=(--device cpu --dtype float32)
  REL_SIZE=(--layers 2 --hidden 64 --image-tokens 16 --answer-tokens 12 --repeats 1)
  REL_4B=(--layers 2 --hidden 128 --heads 2 --kv-heads 1 --head-dim 64 --vocab 2048 --image-tokens 16 --answer-tokens 12 --repeats 1)
  MG=(--device cpu --dtype float32 --layers 1 --vision-layers 1 --image-size 224 --vocab 8192 --new 4 --batch 1,2 --attn eager,vision_sdpa)
  E2E=(model.device=cpu dataset.n=2 generate.max_new_tokens=24 "explain.methods=[chefer,random]" explain.explorer_samples=1 faithfulness.steps=2)
else
  DEV=(--device cuda --dtype bfloat16)
  REL_SIZE=()
  REL_4B=(--layers 34 --hidden 2560 --heads 8 --kv-heads 4 --head-dim 256 --vocab 262208 --sliding-window 1024 --repeats 2)
  MG=(--device cuda --batch 1,16 --attn eager,vision_sdpa)
  E2E=(model.device=cuda dataset.n=4)
fi

failed=0
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, report the time and status
  local name=$1
  shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

machine() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" - <<'EOF'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
EOF
}

e2e() {
  local run=$(mktemp -d)/run
  "$PY" run_pipeline.py run_dir="$run" "${E2E[@]}" || return 1
  "$PY" - "$run" <<'EOF'
import sys
from pathlib import Path
import pyarrow.dataset as ds
run = Path(sys.argv[1])
for table in ("samples", "generations", "relevancy", "faithfulness", "metrics", "sensitivity", "answers", "errors"):
    if (run / table).exists():
        t = ds.dataset(run / table, format="parquet").to_table()
        print(f"{table}: {t.num_rows} rows")
        if table == "errors" and t.num_rows:
            print(t.to_pandas().head(10).to_string())
EOF
  grep -h "stage .* done" "$run"/logs/*.log | cut -c1-160
  cp "$run/report/report.md" "$OUT/e2e_report.md" 2>/dev/null
  return 0
}

step machine machine
step relevancy "$PY" benchmarks/bench_relevancy.py "${DEV[@]}" "${REL_SIZE[@]}"
step relevancy_profile "$PY" benchmarks/bench_relevancy.py "${DEV[@]}" "${REL_SIZE[@]}" --profile
step medgemma "$PY" benchmarks/bench_medgemma.py "${MG[@]}" --profile --json "$OUT/medgemma.json"
step e2e e2e
step relevancy_4b "$PY" benchmarks/bench_relevancy.py "${DEV[@]}" "${REL_4B[@]}"
echo "== $failed step(s) failed"
exit $failed
