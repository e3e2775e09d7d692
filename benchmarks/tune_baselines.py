"""Grid search of a baseline's options on the VALIDATION split (never test), one JSON line per setting.

    python benchmarks/tune_baselines.py --data artifacts/data/beauty --model itemknn \
        --grid '{"shrink": [10, 30, 100], "alpha": [0.5, 0.75]}' [--users 8000] [--seed 0]

Validation users are a fixed random subset (--users, 0 = all) so settings are compared on the
same users. The defaults in rerank/models/baselines.py are the best settings this found on Beauty.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np

from rerank.data.dataset import leave_one_out, load_dataset
from rerank.models.evaluate import evaluate
from rerank.models.recommender import model_class
from rerank.models.train import seed_everything
from rerank.models.train_log import TrainLog


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True, choices=["pop", "itemknn", "mf"])
    p.add_argument("--grid", required=True, help='JSON object {"option": [values, ...]}')
    p.add_argument("--users", type=int, default=8000, help="validation users (fixed random subset; 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    grid = json.loads(args.grid)
    dataset = load_dataset(args.data)
    split = leave_one_out(dataset)
    users = split.users
    if 0 < args.users < len(users):
        users = np.sort(np.random.default_rng(args.seed).choice(users, args.users, replace=False))
    for values in itertools.product(*grid.values()):
        options = dict(zip(grid, values))
        seed_everything(args.seed)
        model = model_class(args.model).create(dataset, seed=args.seed, **options)
        log = TrainLog()
        start = time.monotonic()
        model.fit(dataset, split, log)
        fit_seconds = time.monotonic() - start
        valid = evaluate(model, dataset, split, which="valid", users=users, ks=(10, 20))
        epochs = sum(1 for r in log.records if "epoch" in r)
        print(json.dumps({"model": args.model, **options, "valid_ndcg@10": round(valid["ndcg@10"], 5),
                          "valid_hr@10": round(valid["hr@10"], 5), "valid_ndcg@20": round(valid["ndcg@20"], 5),
                          "users": valid["users"], "fit_seconds": round(fit_seconds, 1), "epochs": epochs}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
