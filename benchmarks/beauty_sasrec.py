"""Beauty SASRec benchmark: train from scratch with a recipe, evaluate test, print JSON.

    python benchmarks/beauty_sasrec.py --data artifacts/data/beauty --seeds 0 1 2 \
        [--set key=value ...] [--out benchmarks/results/beauty_sasrec.json]

Each seed: load the dataset, leave-one-out split, `SequentialRecommender.create(...)`, fit
(early stopping on validation, wall-clock budget `max_minutes`), then the test metrics
(input: all but the last event; full ranking; prefix items masked). `wall_seconds` counts
everything from loading the data to the test metrics. Also records what else ran (load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def parse_set(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected key=value")
        options[key.replace("-", "_")] = value
    return options


def run_one(data: str, seed: int, options: dict, log_path: Path | None) -> dict:
    import torch

    from rerank.data.dataset import leave_one_out, load_dataset
    from rerank.models.evaluate import evaluate
    from rerank.models.sequential import SequentialRecommender
    from rerank.models.train import seed_everything
    from rerank.models.train_log import TrainLog

    start = time.monotonic()
    dataset = load_dataset(data)
    split = leave_one_out(dataset)
    seed_everything(seed)
    model = SequentialRecommender.create(dataset, seed=seed, **options)
    log = TrainLog(log_path, echo=True)
    model.fit(dataset, split, log)
    fit_done = time.monotonic()
    test = evaluate(model, dataset, split, which="test")
    valid = evaluate(model, dataset, split, which="valid")
    wall = time.monotonic() - start
    epochs = [r for r in log.records if "epoch" in r]
    fit = next(r for r in log.records if r.get("event") == "fit_done")
    return {
        "seed": seed,
        "options": options,
        "test": test,
        "valid": valid,
        "best_epoch": fit["best_epoch"],
        "epochs_run": fit["epochs_run"],
        "stop": fit["stop"],
        "fit_seconds": round(fit_done - start, 1),
        "wall_seconds": round(wall, 1),
        "mean_epoch_seconds": round(float(np.mean([r["seconds"] for r in epochs])), 2) if epochs else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg_end": os.getloadavg(),
        "log": epochs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="artifacts/data/beauty")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument("--name", default="", help="a label for this recipe in the results")
    args = parser.parse_args()
    options = parse_set(args.sets)
    runs = []
    for seed in args.seeds:
        log_path = Path(args.out).with_suffix(f".seed{seed}.jsonl") if args.out else None
        runs.append(run_one(args.data, seed, options, log_path))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "log"}), file=sys.stderr)
    ndcg = np.array([r["test"]["ndcg@10"] for r in runs])
    hr = np.array([r["test"]["hr@10"] for r in runs])
    result = {
        "benchmark": "beauty_sasrec",
        "name": args.name,
        "data": args.data,
        "options": options,
        "seeds": args.seeds,
        "test_ndcg@10_mean": float(ndcg.mean()),
        "test_ndcg@10_std": float(ndcg.std()),
        "test_hr@10_mean": float(hr.mean()),
        "test_hr@10_std": float(hr.std()),
        "max_wall_seconds": max(r["wall_seconds"] for r in runs),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "runs": runs,
    }
    if args.out:
        from rerank.infra.results import write_results

        write_results(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
