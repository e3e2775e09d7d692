"""Quality benchmark of the baselines: train pop / itemknn / mf with their defaults on each
dataset, evaluate valid and test (leave-one-out, full ranking), print JSON and save it.

    python benchmarks/baselines.py [--data artifacts/data/beauty artifacts/data/ml100k]
        [--kinds pop itemknn mf] [--models artifacts/models] [--out benchmarks/results/baselines.json]
        [--set kind.key=value ...]

Each model is saved to MODELS/<dataset>-<kind> so that `rerank evaluate --compare` can reuse it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from rerank.cli.train import parse_overrides
from rerank.infra.results import write_results
from rerank.data.dataset import leave_one_out, load_dataset
from rerank.models.evaluate import evaluate
from rerank.models.recommender import load_model
from rerank.models.train import train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["artifacts/data/beauty", "artifacts/data/ml100k"])
    p.add_argument("--kinds", nargs="+", default=["pop", "itemknn", "mf"])
    p.add_argument("--models", default="artifacts/models")
    p.add_argument("--out", default="benchmarks/results/baselines.json")
    p.add_argument("--set", action="append", default=[], metavar="KIND.KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    overrides: dict[str, dict] = {}
    for item in args.set:
        kind, _, rest = item.partition(".")
        overrides.setdefault(kind, {}).update(parse_overrides([rest]))
    results = []
    for data in args.data:
        dataset = load_dataset(data)
        split = leave_one_out(dataset)
        name = Path(data).name
        for kind in args.kinds:
            out = Path(args.models) / f"{name}-{kind}"
            options = overrides.get(kind, {})
            _, summary = train(kind, data, out, seed=args.seed, evaluate_valid=False, **options)
            model = load_model(out)  # evaluate what was saved, not the in-memory object
            start = time.monotonic()
            test = evaluate(model, dataset, split, which="test", progress=True)
            test_seconds = time.monotonic() - start
            valid = evaluate(model, dataset, split, which="valid")
            row = {
                "dataset": name, "kind": kind, "model_dir": str(out), "options": options, "seed": args.seed,
                "train_seconds": summary["train_seconds"], "test_eval_seconds": round(test_seconds, 2),
                "valid": valid, "test": test,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "benchmark": "baselines",
        "protocol": "leave-one-out, full ranking over all items, prefix items masked, ties pessimistic",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "results": results,
    }
    write_results(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
