"""The leave-one-out, full-ranking protocol over any Recommender; model comparison table and plot.

Protocol (../shared/data/README.md, as in the S3-Rec/ICLRec/BSARec code): for each user with
a target, the model sees the prefix before the target (valid: all but the last two events;
test: all but the last), scores ALL items, item 0 and every item of the prefix are set to
-inf (so a target that already occurs in the prefix is a miss, as in the reference code),
and the target's rank gives HR@k, NDCG@k and MRR (see rerank.models.metrics for ties).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from rerank.data.dataset import Dataset, LeaveOneOut
from rerank.models.metrics import metrics_from_ranks, target_ranks
from rerank.models.recommender import Recommender

SPLITS = {"valid": 2, "test": 1}  # which -> how many trailing events the input drops


def mask_history(scores: np.ndarray, histories: Sequence[np.ndarray]) -> torch.Tensor:
    """(B, n_items+1) scores as a float32 tensor with column 0 and each row's history items at -inf."""
    s = torch.tensor(np.asarray(scores), dtype=torch.float32)  # a copy: the caller's array is untouched
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    if lengths.sum():
        rows = torch.from_numpy(np.repeat(np.arange(len(histories)), lengths))
        cols = torch.from_numpy(np.concatenate(histories).astype(np.int64))
        s[rows, cols] = -torch.inf
    s[:, 0] = -torch.inf
    return s


def evaluate(
    model: Recommender,
    dataset: Dataset,
    split: LeaveOneOut,
    which: str = "test",
    ks: Iterable[int] = (5, 10, 20),
    batch_size: int = 512,
    users: np.ndarray | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """HR@k, NDCG@k, MRR of `model` on the `which` targets ("valid" or "test") of `split`.

    `users` restricts the evaluation to those user_idx (default: every user with targets).
    Returns {"hr@5", ..., "ndcg@20", "mrr", "users"}.
    """
    if which not in SPLITS:
        raise ValueError(f"which must be one of {sorted(SPLITS)}, got {which!r}")
    drop = SPLITS[which]
    targets_all = split.valid_target if which == "valid" else split.test_target
    users = split.users if users is None else np.asarray(users, dtype=np.int64)
    if len(users) and (targets_all[users] == 0).any():
        bad = users[targets_all[users] == 0][:5]
        raise ValueError(f"users without a {which} target (fewer than 3 events): {bad.tolist()}")
    ks = tuple(ks)
    ranks = np.empty(len(users), dtype=np.int64)
    batches = range(0, len(users), batch_size)
    if progress:
        from rerank.infra.progress import progress_bar

        batches = progress_bar(batches, desc=f"evaluate {which}", unit="batch", leave=False)
    for start in batches:
        batch = users[start : start + batch_size]
        histories = [dataset.sequences[u][:-drop] for u in batch]
        types = [dataset.event_type_sequences[u][:-drop] for u in batch]
        with torch.inference_mode():
            scores = model.score(histories, None, types)
        expected = (len(batch), dataset.n_items + 1)
        if np.shape(scores) != expected:
            raise ValueError(f"{type(model).__name__}.score returned shape {np.shape(scores)}, expected {expected}")
        masked = mask_history(scores, histories)
        ranks[start : start + len(batch)] = target_ranks(masked, targets_all[batch])
    return metrics_from_ranks(ranks, ks)


def compare(
    model_dirs: Sequence[str | os.PathLike],
    dataset: Dataset,
    split: LeaveOneOut,
    which: str = "test",
    progress: bool = False,
) -> list[dict]:
    """Evaluate each saved model on the same split: one row per model {"model", "kind", metrics...}."""
    from rerank.models.recommender import load_model

    rows = []
    for path in model_dirs:
        model = load_model(path)
        if model.n_items != dataset.n_items:
            raise ValueError(f"{path}: model has {model.n_items} items, the dataset {dataset.n_items}")
        metrics = evaluate(model, dataset, split, which=which, progress=progress)
        rows.append({"model": str(path), "kind": model.kind, **metrics})
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A fixed-width text table of comparison rows (metric columns as 4-decimal floats)."""
    if not rows:
        return "(no models)"
    columns = list(columns or [c for c in rows[0] if c not in ("model", "kind")])
    names = [f"{Path(r['model']).name} ({r['kind']})" for r in rows]
    width = max(len("model"), *(len(n) for n in names))
    head = "model".ljust(width) + "".join(f"{c:>10}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, row in zip(names, rows):
        cells = "".join(_cell(c, row[c]) for c in columns)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if column == "seconds":
        return f"{value:>10.1f}"
    return f"{value:>10.4f}" if isinstance(value, float) else f"{value:>10}"


def plot_comparison(rows: Sequence[dict], out: str | os.PathLike,
                    metrics: Sequence[str] = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr")) -> Path:
    """Grouped bar chart (one group per metric, one bar per model) written to `out` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 2, 4))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(metrics))
    for i, row in enumerate(rows):
        values = [row[m] for m in metrics]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"{Path(row['model']).name} ({row['kind']})")
    ax.set_xticks(x, metrics)
    ax.set_ylabel("score")
    ax.set_title("leave-one-out, full ranking")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
