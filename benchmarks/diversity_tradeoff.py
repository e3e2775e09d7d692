"""What list diversity costs in accuracy: MMR and DPP re-ranking on real Beauty data; prints JSON.

    python benchmarks/diversity_tradeoff.py [--data artifacts/data/beauty] [--users 2000]
        [--candidates 500] [--k 10] [--lambdas 0 0.1 0.2 0.3 0.5 0.7] [--out FILE]

A model (ItemKNN by default, or --model DIR: any saved Recommender) scores the whole catalogue
for a sample of test users (leave-one-out: input = all but the last item); the top
`candidates` unseen items go through rerank.serving.ranking.rank (k items, the user's items excluded
as purchases) for each diversity method and trade-off. Reported per setting: HR@k and NDCG@k of
the held-out item (at lambda 0 these equal the full-ranking protocol's numbers, since the top k
always lie within the candidates), intra-list diversity (mean pairwise 1 - cosine of the
attribute vectors), distinct attributes per list, and the re-ranking time per list.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rerank.infra.progress import progress_bar  # noqa: E402
from rerank.infra.results import write_results  # noqa: E402
from rerank.infra.stats import percentile  # noqa: E402  (in the unit of its input)


def intra_list_diversity(attributes: np.ndarray) -> tuple[float, int]:
    """(mean pairwise 1 - cosine of the multi-hot attribute rows, distinct attribute ids)."""
    from rerank.serving.ranking import attribute_features

    feats = attribute_features(attributes).astype(np.float64)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    unit = np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 0)
    sim = unit @ unit.T
    n = len(sim)
    pairs = n * (n - 1)
    ild = float((pairs - (sim.sum() - np.trace(sim))) / pairs) if pairs else 0.0
    return ild, feats.shape[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "artifacts" / "data" / "beauty"))
    parser.add_argument("--model", default=None, help="a saved model directory (default: fit ItemKNN here)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.7])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="no progress bars (the output is JSON anyway)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from rerank.data.dataset import DatasetError, leave_one_out, load_dataset
    from rerank.serving.ranking import RankingRules, rank

    try:
        dataset = load_dataset(args.data)
    except DatasetError as err:
        raise SystemExit(f"diversity_tradeoff: {err}") from None
    split = leave_one_out(dataset)
    t0 = time.perf_counter()
    if args.model:
        from rerank.models.recommender import load_model

        model = load_model(args.model)
        model_name = Path(args.model).name
    else:
        from rerank.models.baselines import ItemKNN

        model = ItemKNN.create(dataset)
        model.fit(dataset, split)
        model_name = "itemknn (defaults, fit on the training split)"
    fit_s = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed)
    users = np.sort(rng.choice(split.users, min(args.users, len(split.users)), replace=False))
    histories = [dataset.sequences[u][:-1] for u in users]
    targets = split.test_target[users]
    attrs, item_ids = dataset.item_attributes, dataset.item_ids

    candidates = np.zeros((len(users), args.candidates), dtype=np.int64)
    cand_scores = np.zeros(candidates.shape)
    for lo in progress_bar(range(0, len(users), 256), desc="scoring", enabled=not args.json):
        scores = np.asarray(model.score(histories[lo : lo + 256]), dtype=np.float64)
        scores[:, 0] = -np.inf
        for b, h in enumerate(histories[lo : lo + 256]):
            scores[b, h] = -np.inf  # the protocol removes the user's own items
        top = np.argpartition(-scores, args.candidates, axis=1)[:, : args.candidates]
        candidates[lo : lo + 256] = top
        cand_scores[lo : lo + 256] = np.take_along_axis(scores, top, axis=1)
    index_of = {item_id: i for i, item_id in enumerate(item_ids)}

    rows = []
    settings = [("none", 0.0)] + [(m, lam) for m in ("mmr", "dpp") for lam in args.lambdas if lam > 0]
    for method, lam in progress_bar(settings, desc="re-ranking", enabled=not args.json):
        rules = RankingRules(k=args.k, diversity=lam, diversity_method=method if method != "none" else "mmr")
        hits, ndcg, ild, distinct, times = [], [], [], [], []
        for b in range(len(users)):
            idx = candidates[b]
            t = time.perf_counter()
            ranked = rank(item_ids[idx].tolist(), idx, cand_scores[b], rules=rules,
                          purchased_idx=histories[b], attributes=attrs[idx])
            times.append(time.perf_counter() - t)
            picked_idx = np.array([index_of[item_id] for item_id, _ in ranked], dtype=np.int64)
            where = np.flatnonzero(picked_idx == targets[b])
            hits.append(1.0 if where.size else 0.0)
            ndcg.append(1.0 / np.log2(where[0] + 2) if where.size else 0.0)
            d, n_attr = intra_list_diversity(attrs[picked_idx])
            ild.append(d)
            distinct.append(n_attr)
        rows.append({
            "method": method, "lambda": lam,
            f"hr@{args.k}": round(float(np.mean(hits)), 4), f"ndcg@{args.k}": round(float(np.mean(ndcg)), 4),
            "intra_list_diversity": round(float(np.mean(ild)), 4),
            "distinct_attributes": round(float(np.mean(distinct)), 2),
            "rank_ms_p50": round(percentile(times, 50) * 1000, 3),
        })  # fmt: skip

    report = {
        "benchmark": "diversity_tradeoff",
        "dataset": Path(args.data).name,
        "model": model_name,
        "fit_seconds": round(fit_s, 1),
        "users": len(users),
        "candidates": args.candidates,
        "k": args.k,
        "rows": rows,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
