#!/usr/bin/env bash
# The Beauty benchmark of the best recipe (kind "hybrid"): train from scratch, evaluate on
# test, wall time of the whole thing. Writes benchmarks/results/beauty_hybrid_seed$SEED.json.
#   bash benchmarks/beauty_hybrid.sh [SEED]
set -euo pipefail
SEED=${1:-0}
DATA=artifacts/data/beauty
OUT=artifacts/models/beauty-hybrid-seed$SEED
[ -f $DATA/dataset.json ] || rerank data import --format sasrec ../shared/data/amazon-beauty/Beauty.txt \
  --item-attributes ../shared/data/amazon-beauty/Beauty_item2attributes.json --out $DATA
start=$(date +%s.%N)
rerank train --data $DATA --model hybrid --out $OUT --seed "$SEED" --no-eval --json > /tmp/beauty_hybrid_train.json
rerank evaluate --data $DATA --model $OUT --json > /tmp/beauty_hybrid_test.json
end=$(date +%s.%N)
python - "$SEED" "$start" "$end" <<'PY'
import json, sys
seed, start, end = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
train = json.load(open("/tmp/beauty_hybrid_train.json"))
test = json.load(open("/tmp/beauty_hybrid_test.json"))
weight = [json.loads(l) for l in open(f"artifacts/models/beauty-hybrid-seed{seed}/train_log.jsonl") if "knn_weight" in l][-1]
out = {"benchmark": "beauty_hybrid", "seed": seed, "wall_seconds_train_and_test": round(end - start, 1),
       "train_seconds": train.get("train_seconds"), "knn_weight": weight["knn_weight"],
       "valid_ndcg10_by_weight": weight["valid_ndcg10_by_weight"], "test": test}
json.dump(out, open(f"benchmarks/results/beauty_hybrid_seed{seed}.json", "w"), indent=2)
print(json.dumps(out))
PY
