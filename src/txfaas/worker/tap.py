"""``twistd -n faas-worker``: options, and the only place the worker's real objects are built.

Most of its length is the flag table (FLAGS), one entry per option.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.application import service
from twisted.logger import Logger

from txfaas.cli import CommandOptions
from txfaas.config import (
    AMQPURL,
    ConfigError,
    Flag,
    Flags,
    RedisURL,
    amqp_url_text,
    option_or_env,
    parse_amqp_url,
    parse_count,
    parse_duration,
    parse_http_url,
    parse_networks,
    parse_positive_duration,
    parse_positive_int,
    parse_redis_url,
    parse_size,
    parse_url_template,
    read_secret,
)
from txfaas.http.ssrf import AddressPolicy
from txfaas.model import check_queue_name
from txfaas.multiprocess import prepare_multiprocess_metrics
from txfaas.retry import CallbackPolicy, RetryPolicy, parse_codes, parse_tiers
from txfaas.service import Listener, OrderedMultiService, exit_on_startup_error
from txfaas.store import open_store
from txfaas.worker.callback import parse_signing_secret
from txfaas.worker.config import WorkerConfig

PLUGIN = "faas-worker"
log = Logger()
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
#: Idle keep-alive connections kept per callback receiver, and for how long (below the idle
#: timeouts of common servers, e.g. Node's 5 s, so a kept connection is rarely closed under us).
CALLBACK_CONNECTIONS_PER_HOST = 32
CALLBACK_IDLE_TIMEOUT = 4.0

FLAGS = Flags(
    Flag(
        "amqp",
        ("TXFAAS_AMQP",),
        "amqp://guest:guest@127.0.0.1:5672/%2F",
        "RabbitMQ URL (amqp://user:pass@host:port/vhost), or memory: for an in-process queue.",
    ),
    Flag(
        "amqp-url-file",
        ("TXFAAS_AMQP_URL_FILE",),
        None,
        "File holding the RabbitMQ URL, e.g. a Docker secret (instead of --amqp, which shows it in the environment)",
    ),
    Flag(
        "redis",
        ("TXFAAS_REDIS",),
        "redis://127.0.0.1:6379/0",
        "Redis URL (redis://[:pass@]host[:port][/db]), or memory: for an in-process store.",
    ),
    Flag("redis-prefix", ("TXFAAS_REDIS_PREFIX",), "txfaas:", "Prefix of every Redis key."),
    Flag(
        "max-inflight",
        ("TXFAAS_MAX_INFLIGHT", "max_inflight"),
        "100",
        "Calls run at once by this process (also the broker prefetch).",
    ),
    Flag(
        "exec-timeout",
        ("TXFAAS_EXEC_TIMEOUT",),
        "30s",
        "Time limit of a call whose function sets none (10, 10s, 1m30s, 500ms); the call is cut off and its status is 504.",
    ),
    Flag(
        "function-url-template",
        ("TXFAAS_FUNCTION_URL_TEMPLATE",),
        "http://{name}:8080",
        "Where a function without its own URL answers ({name}, {namespace}).",
    ),
    Flag(
        "gateway-url",
        ("TXFAAS_GATEWAY_URL",),
        None,
        "Invoke functions through this gateway (its /function/{name}) instead of directly.",
    ),
    Flag(
        "callback-allow",
        ("TXFAAS_CALLBACK_ALLOW",),
        None,
        "Comma-separated CIDRs and host names callbacks may reach although not public (e.g. 127.0.0.0/8).",
    ),
    Flag(
        "callback-secret",
        ("TXFAAS_CALLBACK_SECRET",),
        None,
        "Sign callbacks (Standard Webhooks) with this key: whsec_<base64>, or any text used as is.",
    ),
    Flag(
        "callback-secret-file",
        ("TXFAAS_CALLBACK_SECRET_FILE",),
        None,
        "Read --callback-secret from this file.",
    ),
    Flag("callback-timeout", ("TXFAAS_CALLBACK_TIMEOUT",), "10s", "Time limit of one callback delivery."),
    Flag(
        "callback-concurrency",
        ("TXFAAS_CALLBACK_CONCURRENCY",),
        "200",
        "Callback deliveries at once (the callback queue's prefetch), apart from --max-inflight calls.",
    ),
    Flag(
        "callback-host-concurrency",
        ("TXFAAS_CALLBACK_HOST_CONCURRENCY",),
        "100",
        "Of those, at most this many to one host; more wait a second, then go back to the broker for a while.",
    ),
    Flag(
        "consumer-timeout",
        ("TXFAAS_CONSUMER_TIMEOUT",),
        "30m",
        "The broker's consumer_timeout; exec timeouts plus callback time must stay below it.",
    ),
    Flag(
        "drain-timeout",
        ("TXFAAS_DRAIN_TIMEOUT",),
        "30s",
        "On SIGTERM, how long running calls may finish before they go back to the queue.",
    ),
    Flag(
        "max-answer-memory",
        ("TXFAAS_MAX_ANSWER_MEMORY",),
        "64MiB",
        "Bytes of functions' answers the worker holds at once; past it, it reads answers and starts calls only as memory frees (one answer over it fails with 502).",
    ),
    Flag(
        "max-result-size",
        ("TXFAAS_MAX_RESULT_SIZE",),
        "1MiB",
        "Largest response body kept in the call's stored result (callbacks get it whole).",
    ),
    Flag("call-ttl", ("TXFAAS_CALL_TTL",), "24h", "How long call records and results are kept."),
    Flag("listen", ("TXFAAS_WORKER_LISTEN",), "tcp:8081", "Endpoint of the worker's /healthz and /metrics."),
    Flag(
        "processes",
        ("TXFAAS_WORKER_PROCESSES",),
        "1",
        "Worker processes to run (each with --max-inflight calls); above 1, this process supervises them, restarts one that dies, and serves /healthz and /metrics added up over all of them.",
    ),
    Flag(
        "max-attempts",
        ("TXFAAS_MAX_ATTEMPTS",),
        "5",
        "Attempts per call when the function answers a retry code, cannot be reached or times out (1: no retries); annotation com.openfaas.retry.attempts overrides it per function.",
    ),
    Flag(
        "retry-codes",
        ("TXFAAS_RETRY_CODES",),
        "408,429,500,502,503,504",
        "Function statuses that are retried (com.openfaas.retry.codes overrides).",
    ),
    Flag(
        "retry-min-wait",
        ("TXFAAS_RETRY_MIN_WAIT",),
        "1s",
        "Shortest wait before a retry; waits double, with full jitter (com.openfaas.retry.min_wait).",
    ),
    Flag(
        "retry-max-wait",
        ("TXFAAS_RETRY_MAX_WAIT",),
        "2m",
        "Longest wait before a retry, Retry-After included (com.openfaas.retry.max_wait).",
    ),
    Flag(
        "callback-max-attempts",
        ("TXFAAS_CALLBACK_MAX_ATTEMPTS",),
        "10",
        "Delivery attempts per callback (on connection errors, timeouts, 408, 429, 3xx, 5xx; 410 stops).",
    ),
    Flag(
        "callback-max-age",
        ("TXFAAS_CALLBACK_MAX_AGE",),
        "24h",
        "No callback attempt later than this after the first one.",
    ),
    Flag("callback-min-wait", ("TXFAAS_CALLBACK_MIN_WAIT",), "5s", "Shortest wait before a callback retry."),
    Flag("callback-max-wait", ("TXFAAS_CALLBACK_MAX_WAIT",), "1h", "Longest wait before a callback retry."),
    Flag(
        "max-age",
        ("TXFAAS_MAX_AGE",),
        "6h",
        "A call older than this when a worker picks it up is dead-lettered, not run.",
    ),
    Flag(
        "delivery-limit",
        ("TXFAAS_DELIVERY_LIMIT",),
        "5",
        "Times a call may be found interrupted (its worker died mid-call) and run again before it is dead-lettered as a call that keeps killing workers.",
    ),
    Flag(
        "delay-tiers",
        ("TXFAAS_DELAY_TIERS",),
        "1s,2s,5s,10s,30s,1m,2m,5m,10m,30m,1h",
        "The delay queues retries wait in (one RabbitMQ queue per tier); a wait is met within half the smallest tier.",
    ),
    Flag(
        "retry-prefix",
        ("TXFAAS_RETRY_PREFIX",),
        "txfaas",
        "Prefix of the retry exchange and delay queues (<prefix>.retry, <prefix>.delay.<ms>).",
    ),
    Flag("dead-letter-queue", ("TXFAAS_DEAD_LETTER_QUEUE",), "txfaas.dead-letter", "The dead-letter queue."),
    Flag(
        "log-lines",
        ("TXFAAS_LOG_LINES",),
        "1000",
        "Lines kept of each function's log (its invocation log: one line per finished call).",
    ),
    Flag(
        "callback-queue",
        ("TXFAAS_CALLBACK_QUEUE",),
        "txfaas.callbacks",
        "The queue of callbacks waiting for another attempt.",
    ),
)


class Options(CommandOptions):
    """``twistd faas-worker``'s flags; each falls back to its environment variable."""

    synopsis = "[options]"
    longdesc = (
        "Consume queued calls, invoke the functions, record each outcome in Redis, deliver callbacks, "
        "then acknowledge. Every flag falls back to the environment variable named in its help."
    )
    optParameters = FLAGS.opt_parameters()

    def __init__(self) -> None:
        super().__init__()
        self["queue"] = []

    def opt_queue(self, name: str) -> None:
        """A queue to consume; repeat for several [$TXFAAS_QUEUES, comma-separated; default faas-request]"""
        self["queue"].append(name)


@attrs.frozen
class Settings:
    """The parsed options: the worker's config plus what only ``makeService`` needs."""

    worker: WorkerConfig
    amqp: AMQPURL
    redis: RedisURL
    redis_prefix: str
    call_ttl: float
    callback_policy: AddressPolicy
    signing_key: bytes | None
    listen: str
    processes: int = 1
    retry_prefix: str = "txfaas"
    log_lines: int = 1000


def _queues(value: Any) -> tuple[str, ...]:
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    for name in names:
        check_queue_name(name, "queue")
    return tuple(dict.fromkeys(names))


def _prefix(value: str) -> str:
    check_queue_name(value, "prefix")
    return value


def _codes(value: Any) -> frozenset[int]:
    codes = parse_codes(value)
    if not codes:
        raise ValueError("at least one status code is needed (use --max-attempts 1 for no retries)")
    return codes


def _signing_key(get: Callable[..., Any]) -> bytes | None:
    """The callback signing key, from --callback-secret or its file."""
    secret = get("callback-secret", str)
    secret_file = get("callback-secret-file", str)
    if secret_file:
        if secret:
            raise ConfigError("--callback-secret-file", "give --callback-secret or its file, not both")
        secret = read_secret(os.path.dirname(secret_file) or ".", os.path.basename(secret_file))
    try:
        return parse_signing_secret(secret) if secret else None
    except ValueError as e:
        raise ConfigError("--callback-secret", str(e)) from None


def _worker_config(get: Callable[..., Any], queue_names: tuple[str, ...]) -> WorkerConfig:
    """The worker's own settings, checked."""
    return WorkerConfig(
        queues=queue_names,
        max_inflight=get("max-inflight", parse_positive_int),
        exec_timeout=get("exec-timeout", parse_positive_duration),
        function_url_template=get("function-url-template", parse_url_template),
        gateway_url=get("gateway-url", parse_http_url),
        callback_timeout=get("callback-timeout", parse_positive_duration),
        callback_concurrency=get("callback-concurrency", parse_positive_int),
        callback_host_concurrency=get("callback-host-concurrency", parse_positive_int),
        consumer_timeout=get("consumer-timeout", parse_positive_duration),
        drain_timeout=get("drain-timeout", parse_duration),
        max_result_size=get("max-result-size", parse_size),
        max_answer_memory=get("max-answer-memory", parse_size),
        retry=RetryPolicy(
            max_attempts=get("max-attempts", parse_positive_int),
            min_wait=get("retry-min-wait", parse_duration),
            max_wait=get("retry-max-wait", parse_duration),
            codes=get("retry-codes", _codes),
        ),
        callback_retry=CallbackPolicy(
            max_attempts=get("callback-max-attempts", parse_positive_int),
            max_age=get("callback-max-age", parse_positive_duration),
            min_wait=get("callback-min-wait", parse_duration),
            max_wait=get("callback-max-wait", parse_duration),
        ),
        max_age=get("max-age", parse_positive_duration),
        delivery_limit=get("delivery-limit", parse_count),
        delay_tiers=get("delay-tiers", parse_tiers),
        callback_queue=get("callback-queue", _prefix),
        dead_letter_queue=get("dead-letter-queue", _prefix),
    ).check()


def settings_from(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Turn parsed flags (and the environment) into :class:`Settings`; :class:`ConfigError` names the flag."""
    environ = os.environ if environ is None else environ

    get = FLAGS.reader(options, environ)

    queue_names = option_or_env(
        {"queue": options.get("queue") or None},
        "queue",
        ("TXFAAS_QUEUES",),
        ("faas-request",),
        _queues,
        environ,
    )
    networks, hosts = get("callback-allow", parse_networks) or ((), ())
    key = _signing_key(get)
    worker = _worker_config(get, queue_names)
    return Settings(
        worker=worker,
        amqp=parse_amqp_url(amqp_url_text(options, environ, get)),
        redis=get("redis", parse_redis_url),
        redis_prefix=get("redis-prefix", str),
        call_ttl=get("call-ttl", parse_positive_duration),
        callback_policy=AddressPolicy(allow_networks=networks, allow_hosts=hosts),
        signing_key=key,
        listen=get("listen", str),
        processes=get("processes", parse_positive_int),
        retry_prefix=get("retry-prefix", _prefix),
        log_lines=get("log-lines", parse_positive_int),
    )


class _Closer(service.Service):
    """Closes the HTTP connection pools last, once the worker has drained (and closed its store)."""

    def __init__(self, *pools: Any) -> None:
        self._pools = pools

    def stopService(self) -> Any:
        from twisted.internet import defer

        super().stopService()
        return defer.DeferredList([pool.closeCachedConnections() for pool in self._pools], consumeErrors=True)


def makeService(options: Mapping[str, Any]) -> service.IService:
    """The worker's service tree (or, with ``--processes`` above 1, its supervisor's)."""
    with exit_on_startup_error():
        settings = settings_from(options)
    from txfaas.multiprocess import die_with_parent, is_child
    from txfaas.reactor import global_reactor
    from txfaas.service import settle_gc

    reactor = global_reactor()
    settle_gc(reactor)
    if settings.processes > 1 and not is_child():
        return build_supervisor(reactor, settings)
    if is_child():
        die_with_parent()
    return build(reactor, settings)


def build_supervisor(reactor: Any, settings: Settings) -> service.MultiService:
    """``--processes N``: run N worker processes (the kernel and the broker spread the work), restart
    one that dies, and serve /healthz (all alive) and /metrics (the sum over all of them)."""
    from txfaas.supervisor import ChildProcesses
    from txfaas.web.server import PlainErrorsSite
    from txfaas.worker.web import supervisor_resource

    # Before the children import prometheus_client: their values go to files this process adds up
    # (this process makes no metrics of its own).
    prepare_multiprocess_metrics(settings.processes, parent_only=True)
    children = ChildProcesses(reactor, settings.processes)
    site = PlainErrorsSite(supervisor_resource(children.alive, settings.processes))
    top = service.MultiService()
    children.setServiceParent(top)
    Listener(reactor, settings.listen, site).setServiceParent(top)
    log.info("faas-worker: supervising {n} worker processes", n=settings.processes)
    return top


def build(reactor: Any, settings: Settings, *, store: Any = None, queue: Any = None) -> service.MultiService:
    """Real objects from settings: store, queue, HTTP agents, metrics, the worker and its listener.

    ``store`` and ``queue`` may be given (the single-process ``faas-local`` shares its
    in-memory ones with the gateway); otherwise they are made from the settings.
    """
    from prometheus_client import CollectorRegistry

    from txfaas.http.client import CONNECT_TIMEOUT, function_agent
    from txfaas.http.pool import quiet_pool
    from txfaas.http.ssrf import callback_agent
    from txfaas.invocation_log import InvocationLog, instance_name
    from txfaas.multiprocess import is_child
    from txfaas.store.cache import FunctionCache
    from txfaas.web.server import PlainErrorsSite
    from txfaas.worker.callback import CallbackDelivery
    from txfaas.worker.metrics import WorkerMetrics
    from txfaas.worker.service import WorkerService
    from txfaas.worker.web import worker_resource

    config = settings.worker
    own_store = store is None
    if store is None:
        store = open_store(reactor, settings.redis, prefix=settings.redis_prefix, call_ttl=settings.call_ttl)
    own_queue = queue is None
    if queue is not None:
        pass
    elif settings.amqp.memory:
        from txfaas.queue.memory import MemoryQueue

        queue = MemoryQueue(list(config.queues), clock=reactor, dead_letter_queue=config.dead_letter_queue)
    else:
        from txfaas.queue.amqp import AMQPQueue, Topology

        topology = Topology(
            prefix=settings.retry_prefix,
            delay_tiers=config.delay_tiers,
            dead_letter_queue=config.dead_letter_queue,
            callback_queue=config.callback_queue,
        )
        queue = AMQPQueue(reactor, settings.amqp, declare=config.queues, topology=topology)
    if getattr(queue, "clock", False) is None:
        queue.clock = reactor  # an in-memory queue shared by faas-local: its delays need a clock

    function_pool = quiet_pool(reactor, per_host=config.max_inflight)
    # Callbacks: connections are kept and reused per receiver (as OpenFaaS's Go client does); a
    # new connection is only made after its address was resolved and checked against the policy
    # (callback_agent), so a kept one always goes where the policy allowed.
    callback_pool = quiet_pool(
        reactor, per_host=CALLBACK_CONNECTIONS_PER_HOST, idle_timeout=CALLBACK_IDLE_TIMEOUT
    )
    callbacks = CallbackDelivery(
        reactor,
        callback_agent(reactor, callback_pool, settings.callback_policy, connect_timeout=CONNECT_TIMEOUT),
        timeout=config.callback_timeout,
        signing_key=settings.signing_key,
    )
    registry = CollectorRegistry()
    worker = WorkerService(
        reactor,
        config,
        queue,
        # Function records read through a 1 s cache (not one Redis read per call).
        FunctionCache(store, reactor),
        function_agent(reactor, function_pool),
        callbacks,
        WorkerMetrics(registry),
        invocations=InvocationLog(store, reactor, instance_name("worker"), max_lines=settings.log_lines),
    )
    site = PlainErrorsSite(worker_resource(worker.health, registry))

    top = OrderedMultiService()
    if own_store:
        store.setServiceParent(top)  # started first, stopped last
    # Stopped in turn, in reverse order: the listener first, then the worker drains, then the pools
    # and the store close.
    _Closer(function_pool, callback_pool).setServiceParent(top)
    if own_queue:  # a shared one is its owner's
        queue.setServiceParent(top)
    worker.setServiceParent(top)
    if not is_child():  # a supervised worker: its supervisor serves /healthz and /metrics
        Listener(reactor, settings.listen, site).setServiceParent(top)
    log.info(
        "faas-worker: queues {queues}, max in flight {n}, exec timeout {t:g}s",
        queues=",".join(config.queues),
        n=config.max_inflight,
        t=config.exec_timeout,
    )
    return top
