"""Prometheus counters, one registry per relay instance (no global state)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)


class Metrics:
    """Every counter the relay exposes on ``GET /metrics``.

    Tests read values with ``metrics.value("relay_cache_hits_total")``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, …:
        # read from /proc at scrape time, for the dashboard's process panels.
        ProcessCollector(registry=r)
        # Ingest (Application Service API)
        self.transactions = Counter(
            "relay_transactions",
            "Appservice transactions by outcome (processed, duplicate, failed)",
            ["outcome"],
            registry=r,
        )
        self.events = Counter(
            "relay_events",
            "Events received by outcome (processed, rejected)",
            ["outcome"],
            registry=r,
        )
        self.media_references = Counter(
            "relay_media_references",
            "Media references recorded, by role",
            ["role"],
            registry=r,
        )
        self.invalid_mxc = Counter(
            "relay_invalid_mxc",
            "Media references refused by the strict mxc parser",
            registry=r,
        )
        self.revocations = Counter(
            "relay_revocations",
            "Media revoked because its event was redacted",
            registry=r,
        )
        self.revocations_by_source = Counter(
            "relay_revocations_by_source",
            "Media revoked, by source (redaction, operator, homeserver); operator revocations "
            "are counted by each process that discovers them",
            ["source"],
            registry=r,
        )
        self.transaction_seconds = Histogram(
            "relay_transaction_seconds",
            "Time to commit one appservice transaction",
            registry=r,
        )
        # Fetch (homeserver)
        self.upstream_requests = Counter(
            "relay_upstream_requests",
            "Media requests to the homeserver by outcome "
            "(ok, not_found, too_large, rate_limited, unauthorized, upstream_error, timeout)",
            ["outcome"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "relay_upstream_bytes",
            "Bytes received from the homeserver",
            registry=r,
        )
        self.negative_cache_hits = Counter(
            "relay_negative_cache_hits",
            "Requests answered from the not-found cache",
            registry=r,
        )
        self.revalidations = Counter(
            "relay_revalidations",
            "Upstream checks of cached media by outcome (present, gone, failed)",
            ["outcome"],
            registry=r,
        )
        self.upstream_removals = Counter(
            "relay_upstream_removals",
            "Cached media the homeserver no longer serves (quarantined, deleted), purged",
            registry=r,
        )
        # Cache
        self.cache_hits = Counter(
            "relay_cache_hits", "Media served from the disk cache", registry=r
        )
        self.cache_misses = Counter("relay_cache_misses", "Media not in the disk cache", registry=r)
        self.cache_evictions = Counter(
            "relay_cache_evictions",
            "Cache entries evicted to stay under the size cap",
            registry=r,
        )
        self.coalesced_waiters = Counter(
            "relay_coalesced_waiters",
            "Requests that joined a download already under way",
            registry=r,
        )
        # Serve
        self.served = Counter(
            "relay_served_requests",
            "Public media requests by status",
            ["status"],
            registry=r,
        )
        self.link_requests = Counter(
            "relay_link_requests",
            "Public media requests by link kind (native, mediaproxy, heisenbridge, "
            "mautrix_publicmedia, legacy_media), config entry name and status",
            ["kind", "entry", "status"],
            registry=r,
        )
        self.public_request_seconds = Histogram(
            "relay_public_request_seconds",
            "Time to answer a public request (to the last byte handed to the kernel), by link kind",
            ["kind"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
            registry=r,
        )
        self.served_bytes = Counter("relay_served_bytes", "Body bytes sent to clients", registry=r)
        self.connections_refused = Counter(
            "relay_public_connections_refused",
            "Public connections closed at once: public.max_connections were open",
            registry=r,
        )
        self.signed = Counter(
            "relay_signed_urls",
            "Signed URLs minted, by who asked (bridge name or cli)",
            ["source"],
            registry=r,
        )
        self.thumbnails_generated = Counter(
            "relay_thumbnails_generated",
            "Thumbnails rendered by the relay",
            registry=r,
        )
        # Shared tier (media.store, relay.media.shared_tier)
        self.tier_requests = Counter(
            "relay_tier_requests",
            "Shared object-store tier operations by op (get, put, purge, sweep) and outcome "
            "(hit, miss, ok, error, skipped: the store failed less than a few seconds ago)",
            ["op", "outcome"],
            registry=r,
        )
        self.tier_evictions = Counter(
            "relay_tier_evictions",
            "Objects removed from the shared tier to stay under media.store.max_size",
            registry=r,
        )
        # Cluster (relay.store.leader)
        self.cluster_leader = Gauge(
            "relay_cluster_leader",
            "1 while this process runs the cluster-wide jobs (audit retention, sweeps), else 0",
            registry=r,
        )

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a counter sample (``0.0`` when it was never touched)."""
        sample = name if name.endswith(("_total", "_count", "_sum")) else f"{name}_total"
        got = self.registry.get_sample_value(sample, labels or {})
        return 0.0 if got is None else got

    def render(self) -> bytes:
        return generate_latest(self.registry)
