"""Shared helpers of the online-learning tests: a tiny synthetic shop and a quickly trained SASRec."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from rerank.data.dataset import load_dataset, leave_one_out
from rerank.models.recommender import save_model
from rerank.data.synth import SynthConfig, write_synth

TINY_SASREC = dict(d_model=32, n_layers=1, n_heads=1, max_len=20, dropout=0.1, attn_dropout=0.1,
                   epochs=25, eval_every=25, lr=5e-3, max_minutes=0, batch_size=64, progress=False, device="cpu",
                   spare_items=20)


def small_shop(root: Path, seed: int) -> tuple[Path, Path]:
    """(dataset dir, model dir): a 300-user, 150-item synthetic shop and a SASRec trained on it for
    a few seconds through `rerank.models.train` (the serving end-to-end tests' shop)."""
    from rerank.models.train import train

    write_synth(root / "data", SynthConfig(n_users=300, n_items=150, seed=seed))
    train("sasrec", root / "data", root / "model", evaluate_valid=False, epochs=3, max_minutes=0.5,
          d_model=32, n_layers=1, progress=False, threads=1, spare_items=16)
    return root / "data", root / "model"


def tiny_model_dir(root: Path) -> tuple[Path, Path]:
    """(dataset dir, trained model dir) of a 150-user, 60-item synthetic shop (seconds to train)."""
    from rerank.models.sequential import SequentialRecommender

    data = root / "data"
    write_synth(data, SynthConfig(n_users=150, n_items=60, seed=3))
    dataset = load_dataset(data)
    torch.manual_seed(0)
    model = SequentialRecommender.create(dataset, seed=0, **TINY_SASREC)
    model.fit(dataset, leave_one_out(dataset))
    out = root / "model"
    save_model(model, out, dataset)
    return data, out


def synth_events(dataset_dir: Path, limit: int) -> list[tuple[str, str, str, float]]:
    """(user_id, item_id, type, ts) of the dataset in time order, the first `limit`."""
    ds = load_dataset(dataset_dir)
    ev = ds.events
    order = np.argsort(ev["ts"].to_numpy(), kind="stable")[:limit]
    users = ds.user_ids[ev["user_idx"].to_numpy()[order]]
    items = ds.item_ids[ev["item_idx"].to_numpy()[order]]
    types = ev["event_type"].to_numpy(zero_copy_only=False)[order]
    ts = ev["ts"].to_numpy()[order]
    return [(str(u), str(i), str(t), float(s)) for u, i, t, s in zip(users, items, types, ts)]


class HandleCaller:
    """Calls Serve DeploymentHandles from synchronous test code.

    With RAY_SERVE_THROUGHPUT_OPTIMIZED=1 a handle's router runs on the caller's event loop, so
    a handle can only be used inside one: this keeps one loop in a daemon thread and runs each
    call there. `calls(lambda: handle.stats.remote())` returns the result.
    """

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="handle-caller", daemon=True).start()

    def __call__(self, make_response, timeout_s: float = 30.0):
        import asyncio

        async def run():
            return await make_response()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)


def wait_until(check, what: str, timeout_s: float = 90.0, every_s: float = 0.2):
    """Poll `check()` until it returns a truthy value, which is returned (a wait, not a speed check)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
