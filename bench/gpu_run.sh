#!/usr/bin/env bash
# The one GPU run of the benchmarks. Installs the carried wheels (.whl/), prints the machine and the versions,
# then runs the benchmarks in order of importance, each under a timeout cut to what is left of BUDGET_S
# (a step that no longer fits is skipped), writing JSON results and this log into $OUT, and ends with all tables.
#
#   on the GPU machine:  bash bench/gpu_run.sh            (device run: carry [".whl"], timeout_s 560)
#   CPU dry run here:    SMOKE=1 bash bench/gpu_run.sh    (tiny sizes, wheels not installed, OUT=/tmp/gpu-dry-run)
#   a short re-measure:  PARTS="tokenise precision tokenise_map" BUDGET_S=150 bash bench/gpu_run.sh
#   fused trials only:   PARTS="search packing" WAYS=fused bash bench/gpu_run.sh
#
# WAYS (bench_search.py --ways; default "processes fused") picks how the search and packing steps run their trials,
# in that order: one process per trial, --fused_trials (one trial engine per GPU, one shared base model, as many
# trials at once as its memory plan gives it), and fused8 (fused, 8 trials at once; search only). Each way adds a
# whole search (~150 s) to the search step and a packed run (~80 s) to the packing step, so with
# both ways those two steps need ~450 s and ~240 s: WAYS=fused (or processes) fits them in a short lease.
#
# PARTS picks the steps, in order (default: the full run). Each step writes $OUT/<step>.json:
#   train        lorasent train() vs the hand loop, Predictor (goal 2)
#   repeat       one seed-config trial (1 epoch) three times in a fresh process: cold vs warm per-trial cost
#   syncs        how often an epoch of train() and of the hand loop, and Predictor.predict, wait for the GPU (CUDA's
#                sync debug mode: value reads and blocking copies); then host work per step of both at small width
#                (Python calls, median step time), where a batch-16 step is launch-bound
#   search       seed-style grid vs the lorasent search, each of WAYS (goal 1)
#   scale        tokenisation + a batch-256 epoch at scale (goal 4)
#   packing      8 trials on one GPU, each of WAYS, vs one trial per GPU (goal 3)
#   train_extra  the issue's anchors, bf16-vs-fp32 Trainer, kernel census, fresh-process cold start
#   tokenise     tokenisation only (scale's first part)
#   precision    bf16-vs-fp32 Trainer epochs + kernel census only (train_extra without anchors / fresh process)
#   tokenise_map the previous tokenisation (datasets.map, 8 processes) on the same reviews, and the speed-up
#   epoch        batch-256 epochs: lorasent as shipped, the hand loop, bf16 base weights, a step's kernels (goals 2, 4)
#   epoch_compile  the same lorasent epoch with torch_compile (epoch 1 includes compiling)
#   cores        the tokenizer alone, lorasent's thread and process encoders in 1 process, then 1 per core: the ceiling
#   fused        K trials on one shared base in one process (peft mixed batch, stacked LoRA) vs K processes
#   imports      what tune/run.py's imports cost on this box (python -X importtime, the 15 slowest): G3's driver spent
#                ~27 s before ray.init here, ~6 s on the 2-core CPU
#   startup      a trial process's and the driver's imports and exit, Python's garbage collector as is vs as lorasent
#                runs them (collection paused over the imports, then frozen; no last walk at exit)
# Files in $OUT (flat): gpu_log.txt and one JSON file per step, tarred into results.tar past the 8 files that come back.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
PARTS=${PARTS:-"train search scale packing train_extra"}
read -ra WAYS <<< "${WAYS:-processes fused}"
OUT=${OUT:-/tmp/gpu-dry-run}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_log.txt") 2>&1

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
export HF_DATASETS_DISABLE_PROGRESS_BARS=1 HF_HUB_DISABLE_PROGRESS_BARS=1  # keep the log's tail for the figures
export TOKENIZERS_PARALLELISM=true BENCH_WORKDIR=${BENCH_WORKDIR:-/tmp/lorasent-bench}
export LORASENT_CACHE=${LORASENT_CACHE:-/tmp/lorasent-cache}
# Ray on a 16-core box with no network: no usage stats, no uv hook, a small object store (trials pass only small
# dicts; the tokenised data is read from lorasent's on-disk cache), no memory-monitor kills.
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 RAY_USAGE_STATS_ENABLED=0 RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION=0.02
export RAY_memory_monitor_refresh_ms=0

if [ "$SMOKE" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  FLAGS=(--smoke)
  SCALE=4  # a loaded 2-core CPU is slower than the GPU box
  BUDGET_S=${BUDGET_S:-1800}
  export PYTHONPATH=${EXTRA_PYTHONPATH:+$EXTRA_PYTHONPATH:}$PWD
else
  PY=${PY:-python3}
  FLAGS=()
  SCALE=1
  BUDGET_S=${BUDGET_S:-480}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "!!! WHEEL INSTALL FAILED: ray/optuna/datasets parts will fail"
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  export BENCH_ASSETS=$PWD/.whl/bench-assets
  # The wheels went in without bytecode (--no-compile). Where Python may not write it either, every process would
  # compile Ray, Optuna, datasets and peft as it imports them (~1.3 s a process on the 2-core CPU): a cost no pip
  # install has, inside every figure that starts a process. So compile them once, now, outside the figures.
  if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then
    started=$SECONDS
    "$PY" -m compileall -q -j 0 /tmp/site lorasent tune analysis bench >/dev/null 2>&1
    echo "PYTHONDONTWRITEBYTECODE is set: wheels and repo compiled to bytecode in $((SECONDS - started))s"
  fi
fi

echo "=== machine $(date -u +%FT%TZ) budget ${BUDGET_S}s smoke=$SMOKE ways=${WAYS[*]}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv \
  2>/dev/null || echo "no nvidia-smi"
echo "cpus: $(nproc)  mem: $(free -g | awk '/Mem:/{print $2 " GiB"}')  /dev/shm: $(df -h /dev/shm | awk 'NR==2{print $4}') free"
# Ray, Optuna and the tune / analysis layers take ~15 s to import: checked only when a step needs them.
[[ " $PARTS " =~ \ (search|packing)\  ]] && export BENCH_CHECK_SEARCH=1
timeout 120 "$PY" - <<'EOF'
import importlib, os, sys
search = os.environ.get("BENCH_CHECK_SEARCH") == "1"
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "peft", "datasets", "ray", "optuna", "pydantic", "sqlalchemy", "tensorboardX",
             "pyarrow", "pandas", "numpy", "sklearn", "huggingface_hub", "tokenizers", "safetensors", "accelerate",
             "fsspec", "protobuf", "typing_extensions", "lorasent", "tune", "analysis"):
    if not search and name in ("ray", "optuna", "pydantic", "sqlalchemy", "tensorboardX", "tune", "analysis"):
        continue
    try:
        module = importlib.import_module(name if name != "protobuf" else "google.protobuf")
        print(f"  {name:18} {getattr(module, '__version__', '?'):14} {getattr(module, '__file__', '')}")
    except Exception as e:  # report every missing piece, not just the first
        print(f"  {name:18} IMPORT FAILED: {type(e).__name__}: {e}")
if search:
    try:
        import ray.tune.search.optuna  # noqa: F401
        import lorasent.train, tune.trainable, analysis.results  # noqa: E401, F401
        print("  imports for the search: ok")
    except Exception as e:
        print(f"  imports for the search FAILED: {type(e).__name__}: {e}")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"  cuda: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"bf16 {torch.cuda.is_bf16_supported()}, torch cuda {torch.version.cuda}")
    # A device whose sm_XY is missing from the build runs PTX that the driver JIT-compiles at each kernel's first use
    print(f"  capability sm_{p.major}{p.minor}; torch built for {' '.join(torch.cuda.get_arch_list())}; "
          f"CUDA_MODULE_LOADING={os.environ.get('CUDA_MODULE_LOADING', '(unset: lazy)')}")
EOF

# The automatic GPU plan reads device properties in the driver (tune/cluster.py local_gpu_memory), and the checks
# ask whether the GPU has bf16 (lorasent.model.device_precision): neither may create a CUDA context there, which
# would hold GPU memory for the whole search.
timeout 60 "$PY" - <<'EOF'
import os, subprocess, torch
if torch.cuda.device_count():
    total = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    torch.cuda.is_bf16_supported(including_emulation=False)
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.splitlines()
    mine = [line for line in apps if line.split(",")[0].strip() == str(os.getpid())]
    print(f"  device query as the plan does it: {total / 2**30:.1f} GiB; this process holds GPU memory: {mine or 'no'}")
EOF

step() {  # step NAME MAX_SECONDS MIN_SECONDS COMMAND...: run under min(MAX, what is left of the budget)
  local name=$1 max=$(($2 * SCALE)) min=$(($3 * SCALE)); shift 3
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt "$min" ]; then
    echo "=== SKIP $name: ${left}s of the budget left, it needs ${min}s"
    return
  fi
  local limit=$((left < max ? left : max)) started=$SECONDS
  echo "=== $name: timeout ${limit}s ($(date +%T), ${left}s of the budget left)"
  timeout -k 15 "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - started))s"
  if [ "$SMOKE" != 1 ] && [[ $name == search || $name == packing ]]; then  # leave no Ray behind (GPU box is ours)
    "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true
  fi
}

run_part() {  # the steps: name, longest and shortest useful time (s), command
  case $1 in
    imports) step imports 60 20 bash -c '"$0" -X importtime -c "import tune.run, tune.search, tune.cluster, \
      tune.trainable, lorasent.tokenize, lorasent.footprint" 2>&1 >/dev/null | sort -t"|" -k2 -n | tail -15' "$PY" ;;
    startup) step startup 90 40 "$PY" bench/bench_startup.py "${FLAGS[@]}" --repeats 3 --out "$OUT/startup.json" ;;
    train) step train 150 60 "$PY" bench/bench_train.py "${FLAGS[@]}" --skip repeat syncs host anchors precision \
      census fresh --out "$OUT/train.json" ;;
    syncs) step syncs 150 30 "$PY" bench/bench_train.py "${FLAGS[@]}" --skip repeat train predict anchors precision \
      census fresh --out "$OUT/syncs.json" ;;
    repeat) step repeat 60 30 "$PY" bench/bench_train.py "${FLAGS[@]}" --skip train predict syncs host anchors \
      precision census fresh --out "$OUT/repeat.json" ;;
    search) step search $((150 + 150 * ${#WAYS[@]})) 120 "$PY" bench/bench_search.py "${FLAGS[@]}" \
      --parts baseline search --ways "${WAYS[@]}" --timeout 210 --out "$OUT/search.json" ;;
    scale) step scale 120 45 "$PY" bench/bench_scale.py "${FLAGS[@]}" --out "$OUT/scale.json" ;;
    packing) step packing $((80 + 80 * ${#WAYS[@]})) 70 "$PY" bench/bench_search.py "${FLAGS[@]}" --parts packing \
      --ways "${WAYS[@]}" --timeout 120 --out "$OUT/packing.json" ;;
    train_extra) step train_extra 130 40 "$PY" bench/bench_train.py "${FLAGS[@]}" --skip repeat train predict syncs \
      host --probe_timeout 100 --out "$OUT/train_extra.json" ;;
    tokenise) step tokenise 80 30 "$PY" bench/bench_scale.py "${FLAGS[@]}" --parts tokenise \
      --out "$OUT/tokenise.json" ;;
    precision) step precision 90 35 "$PY" bench/bench_train.py "${FLAGS[@]}" --skip repeat train predict syncs host \
      anchors fresh --out "$OUT/precision.json" ;;
    tokenise_map) step tokenise_map 60 35 "$PY" bench/bench_scale.py "${FLAGS[@]}" --parts tokenise_map \
      --out "$OUT/tokenise_map.json" ;;
    fused) step fused 150 60 "$PY" bench/bench_fused.py "${FLAGS[@]}" --out "$OUT/fused.json" ;;
    cores) step cores 40 15 "$PY" bench/bench_scale.py "${FLAGS[@]}" --parts cores --out "$OUT/cores.json" ;;
    epoch) step epoch 120 50 "$PY" bench/bench_scale.py "${FLAGS[@]}" --parts epoch --out "$OUT/epoch.json" ;;
    epoch_compile) step epoch_compile 200 60 "$PY" bench/bench_scale.py "${FLAGS[@]}" --parts epoch_compile \
      --out "$OUT/epoch_compile.json" ;;
    *) echo "=== unknown part $1 (see the list at the top of $0)" ;;
  esac
}

# Most valuable and cheapest first. Each script saves its JSON after every part, so a cut step keeps what it did.
for part in $PARTS; do
  run_part "$part"
done

echo "=== all steps done after ${SECONDS}s"
# The reply shows the log's last 12,000 characters: the first (most important) step's table goes last.
summaries=()
for part in $PARTS; do
  [ -f "$OUT/$part.json" ] && summaries=("$OUT/$part.json" "${summaries[@]}")
done
[ ${#summaries[@]} -gt 0 ] && "$PY" bench/data.py summary "${summaries[@]}"
# The device tool brings back at most 8 files: past that, the steps' JSON files travel as one tar.
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  tar -C "$OUT" -cf "$OUT/results.tar" "${summaries[@]#"$OUT"/}" && rm -f "${summaries[@]}"
  echo "=== more than 8 files: the JSON files are in $OUT/results.tar"
fi
