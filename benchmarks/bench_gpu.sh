#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md ("On a GPU"), as one script for a lent machine.
#
#   bash benchmarks/bench_gpu.sh TOYS_ARRAYS.tar.gz OUT_DIR [PHASES]
#   OLD_CODE=/path/to/an/older/checkout bash benchmarks/bench_gpu.sh ...   # adds that code's sampled-loss arm
#
# TOYS_ARRAYS.tar.gz: the prepared training arrays of the Amazon Toys benchmark (a tar of the
# `arrays/` folder under <data_root>/1M/checkpoints after `benchmarks/bench_public.py` or the
# taac_data job + semantic_id_codebooks + taac_dagster.steps.train_cli's preparation), so the GPU machine needs
# neither the raw data nor DuckDB's warehouse. Every phase is bounded by `timeout`, so the whole
# fits a 10-minute call; figures land in OUT_DIR (JSON reports and logs). PHASES: a comma list
# of toys, training, retrieval, compile, ab (default: all of them, in that order).
#
# 1. Toys at the GPU default, alone: wall time, steps, validation HR@10 / NDCG@10.
# 2. bench_training.py on a generated 1M-shaped slice: the whole run against the median step
#    (batches built ahead in pinned memory), and the model step's share of the bf16 peak at the
#    default and at wider/deeper shapes, compiled and not.
# 3. Exact top-10 with history exclusion in torch on the GPU: 1M users x 660K candidates.
# 4. The compiled blocks against the plain ones, at the widest shape.
# 5. Toys A/B, concurrently (quality only: their times share the GPU): larger GPU batches, and
#    the sampled loss (what real data trains with) against phase 1's full softmax.
set -uo pipefail
TOYS=${1:?Toys arrays tarball}
OUT=${2:?output folder}
PHASES=",${3:-toys,training,retrieval,compile,ab},"
has() { [[ $PHASES == *",$1,"* ]]; }
mkdir -p "$OUT" /tmp/gpu_bench
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
[ -d /tmp/gpu_bench/arrays ] || tar xzf "$TOYS" -C /tmp/gpu_bench
ARRAYS=/tmp/gpu_bench/arrays

toys() {  # NAME [--set ...]: one Toys training run on the prepared arrays (at most $T s), report in OUT/toys_NAME.json
    local name=$1; shift
    local started=$(date +%s%N)
    timeout "${T:-240}" $PY -m taac_dagster.steps.train_cli --config default --track 1M --arrays "$ARRAYS" \
        --checkpoint-dir "/tmp/gpu_bench/ck_$name" --no-resume --report "$OUT/toys_$name.json" "$@" > "$OUT/toys_$name.log" 2>&1
    local rc=$?
    echo "toys $name: rc $rc, wall $(( ($(date +%s%N) - started) / 1000000 )) ms" | tee -a "$OUT/summary.txt"
}

if has toys; then
    echo "== 1. Toys, GPU default, alone" | tee -a "$OUT/summary.txt"
    T=100 toys gpu_default
fi

if has training; then
    echo "== 2. bench_training" | tee -a "$OUT/summary.txt"
    timeout 160 $PY benchmarks/bench_training.py --users 20000 --items 50000 --presets default --modes e2e,model \
        --shapes 512x8,1024x8 --loss infonce --steps 30 --work /tmp/gpu_bench/train_data > "$OUT/bench_training.log" 2>&1
    echo "bench_training rc $?" | tee -a "$OUT/summary.txt"
fi

if has retrieval; then
    echo "== 3. exact top-10 on the GPU" | tee -a "$OUT/summary.txt"
    timeout 70 $PY benchmarks/bench_retrieval.py --torch-only --torch-device cuda --users 1000000 --pool 660000 --dim 64 \
        > "$OUT/bench_retrieval.log" 2>&1
    echo "bench_retrieval rc $?" | tee -a "$OUT/summary.txt"
fi

if has compile; then  # the data of phase 2 (its --work folder) is reused
    echo "== 4. compiled blocks" | tee -a "$OUT/summary.txt"
    timeout 110 $PY benchmarks/bench_training.py --presets default --modes "" --shapes 1024x8 --loss infonce \
        --compile --steps 30 --work /tmp/gpu_bench/train_data > "$OUT/bench_compile.log" 2>&1
    echo "bench_compile rc $?" | tee -a "$OUT/summary.txt"
fi

if has ab; then
    echo "== 5. Toys A/B (concurrent)" | tee -a "$OUT/summary.txt"
    export OMP_NUM_THREADS=2
    pids=()
    arm() { T=${AB_SECONDS:-220} toys "$@" & pids+=($!); }
    # Batch on the GPU (full softmax, Toys' auto loss; the default is the CPU's 256, phase 1):
    arm b1024 --set train.cuda_batch_size=1024
    arm b2048 --set train.cuda_batch_size=2048
    # The sampled loss at batch 256 against b256's full softmax. Toys batches hold 700-2,300
    # distinct items: batch_negatives 128 keeps ~10% of them, about what 2,048 keeps of a real
    # 1M-track batch, so the subset (and its log Q) behaves as on real data.
    S="--set model.loss=infonce --set train.cuda_batch_size=256 --set train.batch_negatives=128"
    if [ -d "${OLD_CODE:-}" ]; then  # the code before the logQ fix and the pool negatives, same arrays
        (cd "$OLD_CODE" && timeout "${AB_SECONDS:-220}" $PY -m models.train --config default --track 1M --arrays "$ARRAYS" \
            --checkpoint-dir /tmp/gpu_bench/ck_old --no-resume --report "$OUT/toys_infonce_old.json" \
            --set model.loss=infonce --set train.batch_negatives=128 > "$OUT/toys_infonce_old.log" 2>&1) & pids+=($!)
    fi
    arm infonce_logq $S --set train.pool_negatives=0 --set train.queue_batches=0
    arm infonce_pool $S --set train.pool_negatives=512 --set train.queue_batches=0
    arm infonce_pool_queue $S --set train.pool_negatives=512 --set train.queue_batches=4
    wait "${pids[@]}"
fi

# Each run's best validation, read from its log (a run stopped by its timeout wrote no report).
$PY - "$OUT" <<'EOF' | tee -a "$OUT/summary.txt"
import json, pathlib, sys
for log in sorted(pathlib.Path(sys.argv[1]).glob("toys_*.log")):
    events = []
    for line in log.read_text().splitlines():
        if "{" in line:
            try:
                events.append(json.loads(line[line.index("{"):]))
            except ValueError:
                pass
    vals = [e for e in events if e.get("event") == "validation"]
    start = next((e for e in events if e.get("event") == "start"), {})
    report = log.with_suffix(".json")
    done = json.loads(report.read_text()) if report.is_file() else {}
    best = max(vals, key=lambda e: e["score"]) if vals else {}
    print(f"{log.stem:26s} {'finished' if done else 'CUT':8s} batch {start.get('batch')}, "
          f"loss {done.get('model_config', {}).get('loss', '?')}, steps {done.get('steps', vals[-1]['step'] if vals else 0)}, "
          f"{done.get('seconds', float('nan')):.1f} s of training, best step {best.get('step')}: "
          f"val HR@10 {best.get('hr@10', float('nan')):.4f} NDCG@10 {best.get('ndcg@10', float('nan')):.4f} "
          f"score {best.get('score', float('nan')):.4f} (popularity {best.get('popularity_score', float('nan')):.4f})")
EOF
