"""The `Recommender` contract every model implements, and the model directory format.

A model directory (written by `save_model`, read by `load_model`):

    config.json      {"kind", "format_version": 1, "n_items", ...model config,
                      "dataset": the dataset's dataset.json, ...extra}
    weights          whatever `save_weights` writes: weights.pt (torch.load(weights_only=True))
                     or weights.npz (np.load(allow_pickle=False))
    items.parquet    item_idx, item_id, attributes: the id mapping the model was trained with
    train_log.jsonl  the training log, when there is one

Scores depend only on a history of item_idx (never on a user id), so any user, known or
new, is scored from what the feature store holds about them.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from typing_extensions import Self

    from rerank.data.dataset import Dataset, LeaveOneOut
    from rerank.models.train_log import TrainLog

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
ITEMS_FILE = "items.parquet"
TRAIN_LOG_FILE = "train_log.jsonl"

# kind -> module that registers it; imported lazily so that `import rerank.models.recommender` stays light.
KIND_MODULES: dict[str, str] = {
    "pop": "rerank.models.baselines",
    "itemknn": "rerank.models.baselines",
    "mf": "rerank.models.baselines",
    "sasrec": "rerank.models.sequential",
    "hybrid": "rerank.models.hybrid",
}


class ModelLoadError(ValueError):
    """A model directory that is missing, incomplete or does not match what it claims."""


MODEL_KINDS: dict[str, type["Recommender"]] = {}


def register_model(kind: str):
    """Class decorator: `@register_model("pop") class Popularity(Recommender)` fills MODEL_KINDS."""

    def decorate(cls: type[Recommender]) -> type[Recommender]:
        if kind in MODEL_KINDS and MODEL_KINDS[kind] is not cls:
            raise ValueError(f"model kind {kind!r} is already registered by {MODEL_KINDS[kind].__name__}")
        cls.kind = kind
        MODEL_KINDS[kind] = cls
        return cls

    return decorate


def model_class(kind: str) -> type["Recommender"]:
    """The class registered for `kind`, importing its module on first use."""
    if kind not in MODEL_KINDS and kind in KIND_MODULES:
        importlib.import_module(KIND_MODULES[kind])
    if kind not in MODEL_KINDS:
        known = sorted(set(KIND_MODULES) | set(MODEL_KINDS))
        raise KeyError(f"unknown model kind {kind!r} (known: {', '.join(known)})")
    return MODEL_KINDS[kind]


class Recommender(ABC):
    """A next-item recommender over item_idx 1..n_items (0 = padding / unknown item)."""

    kind: ClassVar[str]
    n_items: int

    @classmethod
    @abstractmethod
    def create(cls, dataset: Dataset, seed: int = 0, **options: Any) -> Self:
        """A fresh, untrained model for `dataset`; `options` come from CLI flags.

        Raise ValueError naming any option the model does not take.
        """

    @abstractmethod
    def fit(self, dataset: Dataset, split: LeaveOneOut, log: TrainLog | None = None) -> None:
        """Train on `split.train` only (never on validation/test targets); may early-stop on valid."""

    @abstractmethod
    def score(
        self,
        histories: Sequence[np.ndarray],
        candidates: np.ndarray | None = None,
        event_types: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Scores for each history (item_idx in time order; event codes aligned when given).

        With `candidates` (B, C) int item_idx: (B, C) float32, where idx 0 (unknown item) gets a
        finite cold-start score (the lowest finite score when the model knows nothing better).
        Without: (B, n_items+1) float32 over the whole catalogue, column 0 = -inf.
        Items already in the history are NOT masked here; that is the caller's choice.
        """

    @abstractmethod
    def save_weights(self, path: Path) -> dict:
        """Write weight files into the directory `path`; return the JSON-able model config."""

    @classmethod
    @abstractmethod
    def load_weights(cls, path: Path, config: dict) -> Self:
        """Rebuild the model from `config` (what save_weights returned) and the files in `path`."""


def take_candidates(full: np.ndarray, candidates: np.ndarray | None) -> np.ndarray:
    """Pick candidate columns out of full-catalogue scores (B, n_items+1).

    Candidates with idx 0 (unknown items) get the lowest finite score of their row.
    Raises ValueError for candidate ids outside 0..n_items.
    """
    full = np.asarray(full, dtype=np.float32)
    if candidates is None:
        return full
    candidates = np.asarray(candidates)
    if candidates.ndim != 2 or candidates.shape[0] != full.shape[0]:
        raise ValueError(f"candidates must have shape (B={full.shape[0]}, C), got {candidates.shape}")
    if candidates.size and (candidates.min() < 0 or candidates.max() >= full.shape[1]):
        raise ValueError(f"candidate item_idx must lie in 0..{full.shape[1] - 1}")
    out = np.take_along_axis(full, candidates.astype(np.int64), axis=1)
    unknown = candidates == 0
    if unknown.any():
        finite = np.where(np.isfinite(full[:, 1:]), full[:, 1:], np.inf)
        lowest = finite.min(axis=1, keepdims=True) if full.shape[1] > 1 else np.zeros((len(full), 1))
        lowest = np.where(np.isfinite(lowest), lowest, 0.0).astype(np.float32)
        out = np.where(unknown, lowest, out)
    return out.astype(np.float32, copy=False)


def save_model(
    model: Recommender,
    path: str | os.PathLike,
    dataset: Dataset,
    extra: dict | None = None,
    train_log: str | os.PathLike | None = None,
) -> Path:
    """Write a model directory atomically (a temporary sibling renamed into place).

    `extra` keys are added to config.json; `train_log` is copied in as train_log.jsonl.
    """
    out = Path(path)
    if model.n_items != dataset.n_items:
        raise ValueError(f"model has n_items={model.n_items} but the dataset has {dataset.n_items}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model_config = model.save_weights(tmp)
        config = {"kind": model.kind, "format_version": FORMAT_VERSION, "n_items": int(model.n_items)}
        clash = set(model_config) & {"kind", "format_version", "dataset"}
        if clash:
            raise ValueError(f"save_weights returned reserved config keys {sorted(clash)}")
        config.update(model_config)
        config["dataset"] = dataset.meta
        config.update(extra or {})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        pq.write_table(dataset.items, tmp / ITEMS_FILE)
        if train_log is not None and Path(train_log).is_file():
            shutil.copyfile(train_log, tmp / TRAIN_LOG_FILE)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "model")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a model directory, checked for format_version, kind and n_items."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: not a model directory (train one with `rerank train`)")
    config_file = root / CONFIG_FILE
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file}: missing; the model directory is incomplete")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_file}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(f"{config_file}: format_version {version!r}, expected {FORMAT_VERSION}")
    for key in ("kind", "n_items"):
        if key not in config:
            raise ModelLoadError(f"{config_file}: field {key!r} is missing")
    if not isinstance(config["n_items"], int) or config["n_items"] < 1:
        raise ModelLoadError(f"{config_file}: field 'n_items' must be a positive integer, got {config['n_items']!r}")
    return config


def model_items(path: str | os.PathLike) -> pa.Table:
    """items.parquet of a model directory: item_idx, item_id, attributes (the id mapping)."""
    items_file = Path(path) / ITEMS_FILE
    if not items_file.is_file():
        raise ModelLoadError(f"{items_file}: missing; the model directory is incomplete")
    return pq.read_table(items_file)


def load_model(path: str | os.PathLike) -> Recommender:
    """Load a model directory written by `save_model`; ModelLoadError says what does not match."""
    root = Path(path)
    config = read_config(root)
    try:
        cls = model_class(config["kind"])
    except KeyError as err:
        raise ModelLoadError(f"{root / CONFIG_FILE}: field 'kind': {err.args[0]}") from None
    n_rows = model_items(root).num_rows
    if n_rows != config["n_items"]:
        raise ModelLoadError(
            f"{root / ITEMS_FILE}: {n_rows} items, but {CONFIG_FILE} says n_items={config['n_items']}"
        )
    try:
        model = cls.load_weights(root, config)
    except ModelLoadError:
        raise
    except FileNotFoundError as err:
        raise ModelLoadError(f"{root}: weights file missing: {err.filename or err}") from None
    except (KeyError, ValueError, RuntimeError, OSError, pickle.UnpicklingError, EOFError) as err:
        raise ModelLoadError(f"{root}: cannot load {config['kind']!r} weights: {err}") from None
    if model.n_items != config["n_items"]:
        raise ModelLoadError(f"{root}: weights hold {model.n_items} items, config.json says {config['n_items']}")
    return model
