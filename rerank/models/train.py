"""Training entry point shared by every model kind: seed, fit, log, save.

`train(kind, data_dir, out_dir)` loads the dataset, splits it leave-one-out, seeds
numpy/torch/random, builds `MODEL_KINDS[kind]` and fits it on the training part only,
writing a JSON-lines log (`out_dir/train_log.jsonl`) as it goes, then saves the model
directory (see rerank.models.recommender).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from rerank.data.dataset import DatasetError, leave_one_out, load_dataset
from rerank.models.recommender import Recommender, TRAIN_LOG_FILE, model_class, save_model
from rerank.models.train_log import TrainLog


class TrainSetupError(ValueError):
    """Training cannot start: unknown model kind, bad data directory or options the model does not take."""


def seed_everything(seed: int) -> None:
    """Seed python's random, numpy's global generator and torch (when installed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.manual_seed(seed)


def train(
    kind: str,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    evaluate_valid: bool = True,
    echo: bool = False,
    **options: Any,
) -> tuple[Recommender, dict]:
    """Train a `kind` model on `data_dir` and save it to `out_dir`; returns (model, summary).

    The summary holds kind, seed, options, train_seconds and, with `evaluate_valid`, the
    validation metrics of the final model. Raises TrainSetupError for an unknown kind, a bad
    data dir or options the model does not take.
    """
    from rerank.models.evaluate import evaluate

    try:
        cls = model_class(kind)
    except KeyError as err:
        raise TrainSetupError(err.args[0]) from None
    try:
        dataset = load_dataset(data_dir)
    except DatasetError as err:
        raise TrainSetupError(str(err)) from None
    split = leave_one_out(dataset)
    if len(split.users) == 0:
        raise TrainSetupError(f"{data_dir}: no user has 3 or more events; nothing to validate or test on")
    seed_everything(seed)
    try:
        model = cls.create(dataset, seed=seed, **options)
    except (TypeError, ValueError) as err:
        raise TrainSetupError(str(err)) from None
    out = Path(out_dir)
    log_path = out.parent / f".{out.name}.{TRAIN_LOG_FILE}"  # out_dir is replaced atomically on save
    log = TrainLog(log_path, echo=echo)
    log.log(event="start", kind=kind, seed=seed, options=options, dataset=dataset.meta.get("name"))
    start = time.monotonic()
    model.fit(dataset, split, log)
    train_seconds = time.monotonic() - start
    summary: dict[str, Any] = {
        "kind": kind,
        "seed": seed,
        "options": options,
        "data": str(data_dir),
        "out": str(out),
        "n_items": dataset.n_items,
        "train_seconds": round(train_seconds, 2),
    }
    if evaluate_valid:
        summary["valid"] = evaluate(model, dataset, split, which="valid")
    log.log(event="end", **{k: v for k, v in summary.items() if k not in ("options",)})
    try:
        save_model(model, out, dataset, extra={"seed": seed, "train_seconds": summary["train_seconds"]},
                   train_log=log_path)
    finally:
        log_path.unlink(missing_ok=True)
    return model, summary
