"""Ray metrics of the serving graph (exported on Ray's Prometheus endpoint)."""

from __future__ import annotations

from ray.util.metrics import Counter, Histogram

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class ServingMetrics:
    """Counters/histograms one replica records; created in the replica (not at import)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "rerank_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self.degraded = Counter("rerank_degraded", description="/rank answers served without the feature store")
        self.events = Counter("rerank_events", description="events stored / duplicates", tag_keys=("result",))
        self.impressions = Counter("rerank_impressions", description="/rank answers recorded as impressions "
                                   "(recorded) or not, Redis failing (lost)", tag_keys=("result",))
        self.attributed = Counter("rerank_events_attributed", description="events by attribution: request_id, "
                                  "window or none", tag_keys=("how",))
        self.stage_ms = Histogram(
            "rerank_stage_latency_ms",
            description="latency per stage of /rank (features, score, rank, total)",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("stage",),
        )
        self.batch_size = Histogram(
            "rerank_batch_size", description="requests per batch at each hop", boundaries=BATCH_BOUNDARIES,
            tag_keys=("hop",),
        )
