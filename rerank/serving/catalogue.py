"""The in-process item catalogue: shop item id <-> item_idx and item attributes.

Serving keeps one in memory (loaded from a model directory's items.parquet, and
refreshed from the feature store when it is reachable) so that ranking still
works while Redis is down, and so the whole catalogue can be ranked when a
request names no candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class Catalogue:
    """item_ids[idx] is the shop id of item_idx (""/0 = padding); attributes[idx] its attribute ids."""

    item_ids: np.ndarray  # (n_items+1,) object
    attributes: np.ndarray  # (n_items+1, A) int32, 0-padded
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.attributes):
            raise ValueError(f"catalogue: {len(self.item_ids)} ids but {len(self.attributes)} attribute rows")
        self._index = {str(item_id): idx for idx, item_id in enumerate(self.item_ids) if idx > 0}

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @classmethod
    def from_items_table(cls, items: pa.Table) -> "Catalogue":
        """From an items table (item_idx, item_id, attributes), e.g. a model dir's items.parquet."""
        idx = items["item_idx"].to_numpy().astype(np.int64)
        n = int(idx.max()) if len(idx) else 0
        ids = np.full(n + 1, "", dtype=object)
        ids[idx] = items["item_id"].to_numpy(zero_copy_only=False)
        lists = items["attributes"].to_pylist() if "attributes" in items.column_names else [[]] * len(idx)
        width = max([len(a) for a in lists if a] + [1])
        attrs = np.zeros((n + 1, width), dtype=np.int32)
        for i, a in zip(idx, lists):
            if a:
                attrs[i, : len(a)] = a
        return cls(ids, attrs)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "Catalogue":
        items_file = Path(path) / "items.parquet"
        if not items_file.is_file():
            raise FileNotFoundError(f"{items_file}: missing; not a model directory")
        return cls.from_items_table(pq.read_table(items_file))

    def index(self, item_ids: Sequence[str]) -> np.ndarray:
        """(len,) int32 item_idx, 0 for ids the catalogue does not know."""
        get = self._index.get
        return np.fromiter((get(str(i), 0) for i in item_ids), dtype=np.int32, count=len(item_ids))

    def attributes_of(self, item_idx: np.ndarray) -> np.ndarray:
        """(C, A) attribute ids of item_idx; rows of idx beyond the catalogue are 0."""
        item_idx = np.asarray(item_idx, dtype=np.int64)
        out = np.zeros((len(item_idx), self.attributes.shape[1]), dtype=np.int32)
        known = (item_idx > 0) & (item_idx <= self.n_items)
        out[known] = self.attributes[item_idx[known]]
        return out

    def all_items(self) -> tuple[list[str], np.ndarray]:
        """(ids, idx) of every item, for full-catalogue ranking."""
        idx = np.arange(1, self.n_items + 1, dtype=np.int32)
        return [str(i) for i in self.item_ids[1:]], idx


class RefreshingCatalogue:
    """A Catalogue kept current with the feature store (items first seen online).

    `current` starts as the model directory's catalogue; a daemon thread swaps in the
    store's (FeatureStore.catalogue()) every `every_s` seconds while Redis is up. Readers
    take `current` once per batch: the swap is one reference assignment.
    """

    def __init__(self, model_dir: str | Path, store=None, every_s: float = 15.0) -> None:
        import threading

        self.current = Catalogue.from_model_dir(model_dir)
        self._store = store
        self._every_s = every_s
        self._stop = threading.Event()
        if store is not None and every_s > 0:
            threading.Thread(target=self._loop, name="catalogue-refresh", daemon=True).start()

    def refresh(self) -> bool:
        """One refresh attempt; False when the store is unreachable or has fewer items."""
        from rerank.store.errors import FeatureStoreUnavailable

        try:
            item_ids, attributes = self._store.catalogue()
        except FeatureStoreUnavailable:
            return False
        if len(item_ids) - 1 < self.current.n_items:
            return False  # store not loaded yet: keep the model's catalogue
        self.current = Catalogue(item_ids, attributes)
        return True

    def _loop(self) -> None:
        import logging

        while not self._stop.wait(self._every_s):
            try:
                self.refresh()
            except Exception:  # never kill the thread over a bad read
                logging.getLogger(__name__).exception("catalogue refresh failed")

    def close(self) -> None:
        self._stop.set()
