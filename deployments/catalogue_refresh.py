"""Keeps a replica's in-process Catalogue current with the feature store (new items online)."""

from __future__ import annotations

import logging
import threading

from rerank.catalogue import Catalogue

logger = logging.getLogger("ray.serve")


class RefreshingCatalogue:
    """`current` starts as the model directory's catalogue; a daemon thread swaps in the
    feature store's (FeatureStore.catalogue()) every `every_s` seconds while Redis is up."""

    def __init__(self, model_dir: str, store, every_s: float = 15.0) -> None:
        self.current = Catalogue.from_model_dir(model_dir)
        self._store = store
        self._every_s = every_s
        self._stop = threading.Event()
        if store is not None and every_s > 0:
            threading.Thread(target=self._loop, name="catalogue-refresh", daemon=True).start()

    def refresh(self) -> bool:
        """One refresh attempt; False when the store is unreachable or has fewer items."""
        from rerank.feature_store import FeatureStoreUnavailable

        try:
            item_ids, attributes = self._store.catalogue()
        except FeatureStoreUnavailable:
            return False
        if len(item_ids) - 1 < self.current.n_items:
            return False  # store not loaded yet: keep the model's catalogue
        self.current = Catalogue(item_ids, attributes)  # one reference swap
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self.refresh()
            except Exception:  # never kill the thread over a bad read
                logger.exception("catalogue refresh failed")

    def close(self) -> None:
        self._stop.set()
