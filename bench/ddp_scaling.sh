#!/usr/bin/env bash
# Data-parallel scaling on one host (issue 16, item 5): the same `harness run` on 1 GPU, then on N GPUs
# (one process a GPU, PyTorch DDP through torchrun), and a table of what each run's manifest recorded:
# training tokens/s and the speedup, steps, global batch, and the (sharded) scoring times.
#
#   bench/ddp_scaling.sh TASK [N] [--set KEY=VALUE ...]
#   bench/ddp_scaling.sh amazon_desc 2 --set data.path=/data/amazontitles/trn.jsonl --set data.max_train=200000
#
# Both runs train the same examples for the same epochs with the same per-GPU batch (so N GPUs take
# 1/N of the optimizer steps at N times the global batch): tokens/s = the run's train_tokens / its
# training seconds, the training loop only (model loading, tokenizing and scoring are timed apart).
# Each run gets its own base-score cache, so both score the base model. Env: PYTHON (default python),
# WORK (default runs/ddp-scaling-<time>). NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '5,6p' "$0"; exit 2; }
task=$1; shift
n=2
if [ $# -ge 1 ] && [[ $1 =~ ^[0-9]+$ ]]; then n=$1; shift; fi
py=${PYTHON:-python}
work=${WORK:-runs/ddp-scaling-$(date +%Y%m%d-%H%M%S)}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
mkdir -p "$work"
for gpus in 1 "$n"; do
  echo "== $gpus GPU(s): $py -m harness run $task --gpus $gpus $*" | tee -a "$work/commands.txt"
  HARNESS_SCORE_CACHE="$work/score-cache-$gpus" "$py" -m harness run "$task" --gpus "$gpus" \
    --runs-dir "$work/runs-$gpus" "$@" 2>&1 | tee "$work/run-$gpus.log"
done
"$py" - "$work" 1 "$n" <<'EOF'
import json, sys
from pathlib import Path

work, counts = Path(sys.argv[1]), sys.argv[2:]
rows = []
for gpus in counts:
    (run,) = (work / f"runs-{gpus}").iterdir()
    m = json.loads((run / "manifest.json").read_text())
    t = m["train"]
    rows.append({"gpus": m["world_size"], "device": m["device"], "run": str(run), "steps": t["steps"],
                 "global_batch": t["global_batch"], "train_tokens": t["train_tokens"], "train_s": t["seconds"],
                 "tokens_per_s": t["train_tokens"] / t["seconds"], "score_base_s": m["timings_s"]["score_base"],
                 "score_tuned_s": m["timings_s"]["score_tuned"]})
one = rows[0]
for r in rows:
    r["speedup"] = r["tokens_per_s"] / one["tokens_per_s"]
print(f"device: {one['device']}")
print("| GPUs | steps | global batch | train tokens | train s | tokens/s | speedup | score base s | score tuned s |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['gpus']} | {r['steps']} | {r['global_batch']} | {r['train_tokens']} | {r['train_s']:.1f} | "
          f"{r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {r['score_base_s']:.1f} | {r['score_tuned_s']:.1f} |")
(work / "scaling.json").write_text(json.dumps(rows, indent=2))
EOF
