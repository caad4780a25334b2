"""Prometheus metrics for the server, in a registry of their own (several apps may share a process)."""

from __future__ import annotations

from collections.abc import Mapping


class Metrics:
    """Requests by endpoint and status, compositions by kind and cache result, latency, tokens, load."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("loramerge_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.compositions = Counter("loramerge_compositions", "Compositions resolved, by kind and cache result",
                                    ["kind", "cache"], registry=self.registry)
        self.cache_hits = Counter("loramerge_composition_cache_hits", "Composition cache hits", registry=self.registry)
        self.cache_misses = Counter("loramerge_composition_cache_misses", "Composition cache misses (built)",
                                    registry=self.registry)
        self.truncations = Counter("loramerge_composition_truncations", "Compositions truncated to max_lora_rank",
                                   registry=self.registry)
        self.latency = Histogram(
            "loramerge_composition_seconds", "Time to resolve and build (or fetch) a composition", ["cache"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=self.registry)
        self.tokens = Counter("loramerge_generated_tokens", "Generated tokens", registry=self.registry)
        self.inflight = Gauge("loramerge_inflight_requests", "Requests being served", registry=self.registry)
        self.cache_entries = Gauge("loramerge_composition_cache_entries", "Composed adapters on disk",
                                   registry=self.registry)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe(self, composition: Mapping) -> None:
        kind = composition.get("kind", "?")
        cache = "none" if kind == "base" else ("hit" if composition.get("cache_hit") else "miss")
        self.compositions.labels(kind=kind, cache=cache).inc()
        if cache == "hit":
            self.cache_hits.inc()
        elif cache == "miss":
            self.cache_misses.inc()
        if composition.get("truncated") and cache == "miss":
            self.truncations.inc()
        self.latency.labels(cache=cache).observe(composition.get("compose_ms", 0.0) / 1000)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["Metrics"]
