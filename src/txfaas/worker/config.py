"""The worker's settings: one frozen object, built by ``tap.py`` and passed down."""

from __future__ import annotations

import attrs

from txfaas.config import ConfigError, format_duration
from txfaas.retry import DEFAULT_TIERS, CallbackPolicy, RetryConfigError, RetryPolicy

#: How long the writes of a finished call are retried while the store is down.
RECORD_PATIENCE = 60.0
#: Safety margin between the longest a message may stay unacked and the broker's consumer timeout.
ACK_MARGIN = 30.0
#: Deliveries from the dead-letter queue handled at once.
KEEPER_PREFETCH = 10
#: How long a callback waits here for a slot of its host before it is parked in the broker.
CALLBACK_WAIT = 1.0
#: The largest answer the worker reads from a function (it is kept in memory and travels in
#: the callback queue's message; RabbitMQ's default largest message is 128 MiB).
MAX_FUNCTION_RESPONSE = 64 * 1024 * 1024


@attrs.frozen
class WorkerConfig:
    """Everything the worker decides by (built by ``tap.py`` from flags and environment)."""

    queues: tuple[str, ...] = ("faas-request",)
    max_inflight: int = 100
    exec_timeout: float = 30.0
    function_url_template: str = "http://{name}:8080"
    gateway_url: str | None = None
    callback_timeout: float = 10.0
    consumer_timeout: float = 30 * 60.0
    drain_timeout: float = 30.0
    max_result_size: int = 1024 * 1024
    retry_delay: float = 0.5
    max_retry_delay: float = 30.0
    health_timeout: float = 2.0
    #: Function retries (``--max-attempts``, ``--retry-*``); functions' annotations override it.
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    #: Callback retries (``--callback-max-attempts``, ``--callback-max-age``, ...).
    callback_retry: CallbackPolicy = attrs.field(factory=CallbackPolicy)
    #: A call older than this when picked up goes to the dead letters.
    max_age: float = 6 * 3600.0
    #: Interruptions (the worker died mid-call) a call survives before it is dead-lettered.
    delivery_limit: int = 5
    callback_queue: str = "txfaas.callbacks"
    dead_letter_queue: str = "txfaas.dead-letter"
    #: The broker's delay tiers: a retry arriving less than half the smallest early runs now.
    delay_tiers: tuple[float, ...] = DEFAULT_TIERS
    #: Callback deliveries at once (the callback queue's prefetch), apart from --max-inflight.
    callback_concurrency: int = 200
    #: Of those, at most this many to one destination host.
    callback_host_concurrency: int = 100
    #: Bytes of functions' answers held at once, all jobs together (--max-answer-memory).
    max_answer_memory: int = 64 * 1024 * 1024

    def backoff(self, failures: int) -> float:
        """The wait after ``failures`` consecutive failures: doubling from --retry-delay, capped."""
        return min(self.retry_delay * 2 ** min(failures, 30), self.max_retry_delay)

    @property
    def exec_timeout_limit(self) -> float:
        """The longest exec_timeout that keeps a message's whole handling below the consumer timeout."""
        return self.consumer_timeout - self.callback_timeout - RECORD_PATIENCE - ACK_MARGIN

    def check(self) -> WorkerConfig:
        """Refuse settings that would make the broker take a message back while it is still running."""
        if self.max_inflight < 1:
            raise ConfigError("--max-inflight", "must be at least 1")
        if not self.queues:
            raise ConfigError("--queue", "at least one queue is needed")
        if self.exec_timeout <= 0:
            raise ConfigError("--exec-timeout", "must be more than 0")
        if self.exec_timeout > self.exec_timeout_limit:
            raise ConfigError(
                "--exec-timeout",
                f"{format_duration(self.exec_timeout)} + --callback-timeout "
                f"{format_duration(self.callback_timeout)} + {format_duration(RECORD_PATIENCE)} "
                f"for recording + {format_duration(ACK_MARGIN)} margin must stay below --consumer-timeout "
                f"{format_duration(self.consumer_timeout)} (the broker's consumer_timeout), or the broker "
                "takes calls back while they run and they run twice",
            )
        names = {"attempts": "--max-attempts", "min_wait": "--retry-min-wait", "max_wait": "--retry-max-wait"}
        try:
            self.retry.check(names)
        except RetryConfigError as e:
            raise ConfigError(e.field, e.problem) from None
        if self.callback_retry.max_attempts < 1:
            raise ConfigError("--callback-max-attempts", "must be at least 1")
        if self.callback_retry.max_wait < self.callback_retry.min_wait:
            raise ConfigError("--callback-max-wait", "must not be below --callback-min-wait")
        if self.delivery_limit < 0:
            raise ConfigError("--delivery-limit", "must not be negative")
        if self.callback_concurrency < 1:
            raise ConfigError("--callback-concurrency", "must be at least 1")
        if self.callback_host_concurrency < 1:
            raise ConfigError("--callback-host-concurrency", "must be at least 1")
        if self.max_answer_memory < 64 * 1024:
            raise ConfigError("--max-answer-memory", "must be at least 64KiB")
        overlap = {self.callback_queue, self.dead_letter_queue} & set(self.queues)
        if overlap or self.callback_queue == self.dead_letter_queue:
            raise ConfigError(
                "--queue", "the work queues, --callback-queue and --dead-letter-queue must all differ"
            )
        return self
