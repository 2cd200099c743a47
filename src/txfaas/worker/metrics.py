"""The worker's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WorkerMetrics:
    """The worker's Prometheus metrics, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge(
            "txfaas_worker_calls_in_flight",
            "Calls being handled now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.calls = Counter(
            "txfaas_worker_calls",
            "Calls run to a final status.",
            ["function", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "txfaas_worker_call_duration_seconds",
            "Time spent invoking the function.",
            ["function"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
        )
        self.callbacks = Counter(
            "txfaas_worker_callbacks", "Callback deliveries by outcome.", ["outcome"], registry=registry
        )
        self.requeued = Counter(
            "txfaas_worker_requeued",
            "Messages given back to the broker unfinished, by reason.",
            ["reason"],
            registry=registry,
        )
        self.skipped = Counter(
            "txfaas_worker_skipped",
            "Redelivered messages whose call had already finished (not run again).",
            registry=registry,
        )
        self.retries = Counter(
            "txfaas_worker_retries",
            "Attempts scheduled again after a retry code, by function.",
            ["function"],
            registry=registry,
        )
        self.callback_retries = Counter(
            "txfaas_worker_callback_retries", "Callback deliveries scheduled again.", registry=registry
        )
        self.callbacks_parked = Counter(
            "txfaas_worker_callbacks_parked",
            "Callbacks put back in the broker for a while: their host had all its slots, or the "
            "answers held filled --max-answer-memory.",
            registry=registry,
        )
        self.dead_letters = Counter(
            "txfaas_worker_dead_letters",
            "Calls sent to the dead-letter queue, by reason.",
            ["reason"],
            registry=registry,
        )
        self.kept = Counter(
            "txfaas_worker_dead_letters_kept",
            "Dead letters written to the dead-letter store, by reason.",
            ["reason"],
            registry=registry,
        )
        self.stale = Counter(
            "txfaas_worker_stale",
            "Messages dropped because a newer attempt, replay or delivery already exists.",
            ["kind"],
            registry=registry,
        )
        self.hops = Counter(
            "txfaas_worker_delay_hops",
            "Retries that arrived before their due time and were sent round again.",
            registry=registry,
        )
