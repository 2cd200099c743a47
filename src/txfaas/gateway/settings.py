"""The settings the gateway's routes share (one frozen object, built by the tap)."""

from __future__ import annotations

import attrs

from txfaas.http.ssrf import AddressPolicy
from txfaas.model import DEFAULT_NAMESPACE, DEFAULT_QUEUE, ReservedQueues


@attrs.frozen
class AppSettings:
    provider: str = "txfaas"
    orchestration: str = "process"
    async_enabled: bool = True
    callback_policy: AddressPolicy = attrs.field(factory=AddressPolicy)
    retry_after: int = 5
    resolve_timeout: float = 5.0
    #: How long a gateway's claim on a call id holds before another may take it over: longer
    #: than a publish can take (the broker's confirm timeout), with a margin.
    claim_window: float = 10.0
    reserved_queues: ReservedQueues = attrs.field(factory=ReservedQueues)
    #: The namespace of requests that name none (``--default-namespace``).
    default_namespace: str = DEFAULT_NAMESPACE
    #: Where the async calls of a function without a ``com.openfaas.queue`` annotation go.
    default_queue: str = DEFAULT_QUEUE
    #: Most ``/system/logs?follow=true`` streams open at once (503 past it).
    log_followers: int = 64
    #: How often a follower looks for new lines.
    log_poll: float = 0.5
