"""Prequential replay on MovieLens-100k: static model vs real-time features vs online updates.

    python benchmarks/prequential_ml100k.py [--minutes 4] [--lr 1e-4] [--json]

Imports ../shared/data/ml-100k into artifacts/data/ml100k when missing, trains SASRec on the
first 80% of time (leave-one-out validation inside the training period for early stopping),
replays the last 20% in time order (rerank/online/prequential.py), prints a JSON summary and writes
benchmarks/results/prequential_ml100k.json and prequential_ml100k.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rerank.data.dataset import leave_one_out, load_dataset  # noqa: E402
from rerank.infra.results import write_results  # noqa: E402
from rerank.online.config import OnlineConfig  # noqa: E402
from rerank.online.prequential import PrequentialConfig, plot_windows, run_prequential, time_split, train_dataset  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "ml-100k"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "artifacts" / "data" / "ml100k"))
    p.add_argument("--minutes", type=float, default=4.0, help="offline training budget (default 4)")
    p.add_argument("--batch-size", type=int, default=32, help="offline batch size (default 32: ML-100k has 943 users)")
    p.add_argument("--lr", default="1e-4", help="online learning rate(s), comma-separated: the first is the "
                   "main result, the others are replayed against the SAME offline model (default 1e-4)")
    p.add_argument("--online-batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64, help="events per replay step (default 64)")
    p.add_argument("--holdout-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prequential_ml100k"))
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = p.parse_args()

    import torch

    from rerank.models.sequential import SequentialRecommender
    from rerank.models.train import seed_everything

    data = Path(args.data)
    if not (data / "dataset.json").is_file():
        if not SHARED.is_dir():
            print(f"error: {data} missing and {SHARED} not found", file=sys.stderr)
            return 2
        from rerank.data.importers import import_recbole

        import_recbole(SHARED / "ml-100k.inter", data, items=SHARED / "ml-100k.item")
    dataset = load_dataset(data)
    mask, split_ts = time_split(dataset, 0.8)
    train = train_dataset(dataset, mask)
    seed_everything(args.seed)
    torch.set_num_threads(2)
    t0 = time.monotonic()
    model = SequentialRecommender.create(train, seed=args.seed, max_minutes=args.minutes, device="cpu",
                                         spare_items=0, batch_size=args.batch_size, eval_every=2, patience=5)
    model.fit(train, leave_one_out(train))
    train_s = time.monotonic() - t0
    lrs = [float(x) for x in str(args.lr).split(",") if x.strip()]
    summary = None
    sweep = {}
    for lr in lrs:
        config = PrequentialConfig(chunk=args.chunk, seed=args.seed, progress=not args.json,
                                   online=OnlineConfig(lr=lr, batch_size=args.online_batch,
                                                       holdout_every=args.holdout_every))
        result = run_prequential(dataset, model, config)
        sweep[str(lr)] = {"online": result["systems"]["online"], "gaps": result["gaps"],
                          "online_stats": result["online_stats"]}
        summary = summary or result
    summary["online_lr_sweep"] = sweep
    summary["offline_train_seconds"] = round(train_s, 1)
    summary["command"] = " ".join(["python", *sys.argv])
    out = Path(args.out)
    write_results(out.with_suffix(".json"), summary)
    plot_windows(summary, out.with_suffix(".png"))
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps({"systems": summary["systems"], "diagnostics": summary["diagnostics"], "gaps": summary["gaps"],
                          "online_lr_sweep": summary["online_lr_sweep"],
                          "online_stats": summary["online_stats"]}, indent=2))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
