"""``twistd faas-gateway``: options, and the one place that builds the gateway's real objects.

Over 500 lines because of the flag table (FLAGS, 160 lines, one entry per option).
"""

from __future__ import annotations

import os
import re
from functools import partial
from typing import Any

import attrs
from cryptography.fernet import Fernet
from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from txfaas.cli import CommandOptions
from txfaas.config import (
    AMQPURL,
    ConfigError,
    Flag,
    Flags,
    RedisURL,
    amqp_url_text,
    default_state_dir,
    format_duration,
    load_or_create_credentials,
    parse_amqp_url,
    parse_bool,
    parse_duration,
    parse_networks,
    parse_positive_int,
    parse_redis_url,
    parse_size,
    parse_url_template,
    read_secret,
)
from txfaas.http.ssrf import AddressPolicy, CachingResolver
from txfaas.model import DEFAULT_NAMESPACE, ReservedQueues, ValidationError, check_namespace, check_queue_name
from txfaas.multiprocess import prepare_multiprocess_metrics
from txfaas.secrets import KeyFileError, load_or_create_key
from txfaas.service import DEFAULT_BACKLOG, parse_tcp_listen

FLAGS = Flags(
    Flag("listen", ("TXFAAS_LISTEN",), "tcp:8080", "Twisted endpoint to serve on"),
    Flag(
        "backlog",
        ("TXFAAS_BACKLOG",),
        str(DEFAULT_BACKLOG),
        "Connections the kernel queues before the gateway accepts them (capped by net.core.somaxconn); "
        "a backlog= in --listen wins",
    ),
    Flag(
        "redis",
        ("TXFAAS_REDIS",),
        "redis://127.0.0.1:6379/0",
        "Redis URL, or memory: for an in-process store",
    ),
    Flag(
        "amqp",
        ("TXFAAS_AMQP",),
        "amqp://guest:guest@127.0.0.1:5672/%2F",
        "RabbitMQ URL, or memory: for an in-process queue",
    ),
    Flag(
        "amqp-url-file",
        ("TXFAAS_AMQP_URL_FILE",),
        None,
        "File holding the RabbitMQ URL, e.g. a Docker secret (instead of --amqp, which shows it in the environment)",
    ),
    Flag("upstream-timeout", ("upstream_timeout",), "60s", "Longest wait for a function's answer, e.g. 60s"),
    Flag(
        "read-timeout",
        ("read_timeout",),
        "65s",
        "Longest time to read a whole request, from its first byte (from the connection's opening "
        "for the first one): 408 after it",
    ),
    Flag(
        "write-timeout",
        ("write_timeout",),
        "65s",
        "Longest time from a request read in full to the end of its response (the connection is "
        "cut after it); must exceed upstream-timeout",
    ),
    Flag(
        "basic-auth",
        ("basic_auth",),
        "true",
        "Guard /system/* and /metrics with basic auth; false (say it explicitly) leaves them open",
    ),
    Flag(
        "secret-mount-path",
        ("secret_mount_path",),
        "/var/openfaas/secrets",
        "Folder holding basic-auth-user and basic-auth-password; $TXFAAS_BASIC_AUTH_USER and "
        "$TXFAAS_BASIC_AUTH_PASSWORD take precedence. With neither, credentials are generated "
        "in --state-dir",
    ),
    Flag(
        "state-dir",
        ("TXFAAS_STATE_DIR",),
        None,
        "Folder for what the gateway generates: basic-auth-user and basic-auth-password (mode 0600) "
        "when no credentials are configured, and secrets.key",
        shown="$XDG_STATE_HOME/txfaas, else ~/.local/state/txfaas",
    ),
    Flag(
        "function-url-template",
        ("TXFAAS_FUNCTION_URL_TEMPLATE",),
        "http://{name}:8080",
        "Base URL of a function without its own url",
    ),
    Flag("functions", ("TXFAAS_FUNCTIONS",), None, "JSON file of functions to deploy at start"),
    Flag(
        "default-namespace",
        ("TXFAAS_DEFAULT_NAMESPACE",),
        DEFAULT_NAMESPACE,
        "Namespace of /function/{name} and of requests that name none; it always exists. Every "
        "gateway sharing a Redis prefix must use the same (functions of openfaas-fn keep their "
        "keys whatever it is, and workers need no such flag: each call carries its namespace)",
    ),
    Flag(
        "max-body",
        ("TXFAAS_MAX_BODY",),
        None,
        "Largest synchronous request body, e.g. 10MiB (413 above it)",
        shown="no limit",
    ),
    Flag("max-async-body", ("TXFAAS_MAX_ASYNC_BODY",), "10MiB", "Largest asynchronous request body"),
    Flag(
        "callback-allow",
        ("TXFAAS_CALLBACK_ALLOW",),
        None,
        "CIDRs/hosts allowed as callback targets though not public, comma-separated, e.g. 127.0.0.0/8",
    ),
    Flag("call-ttl", ("TXFAAS_CALL_TTL",), "24h", "How long call records are kept"),
    Flag(
        "confirm-timeout",
        ("TXFAAS_CONFIRM_TIMEOUT",),
        "5s",
        "Longest wait for the broker to confirm a queued call",
    ),
    Flag("redis-prefix", ("TXFAAS_REDIS_PREFIX",), "txfaas:", "Prefix of every Redis key"),
    Flag(
        "default-queue",
        ("TXFAAS_DEFAULT_QUEUE",),
        "faas-request",
        "Queue of the asynchronous calls of functions without a com.openfaas.queue annotation",
    ),
    Flag(
        "log-lines",
        ("TXFAAS_LOG_LINES",),
        "1000",
        "Lines kept of each function's log (its invocation log: one line per finished call)",
    ),
    Flag(
        "log-followers",
        ("TXFAAS_LOG_FOLLOWERS",),
        "64",
        "Most /system/logs?follow=true streams open at once (503 past it)",
    ),
    Flag(
        "secrets-key",
        ("TXFAAS_SECRETS_KEY",),
        None,
        "File holding the Fernet key that seals secrets in Redis; generated (mode 0600) if absent. "
        "Every gateway sharing the Redis needs the same file",
        shown="secrets.key in the state folder",
    ),
    Flag("pool-size", ("TXFAAS_POOL_SIZE",), "256", "Persistent connections kept per function host"),
    # The worker's internal queue names (the same flags and variables as faas-worker's): no
    # function may take them.
    Flag(
        "retry-prefix",
        ("TXFAAS_RETRY_PREFIX",),
        "txfaas",
        "The workers' --retry-prefix: queues under <prefix>. are refused as function queues",
    ),
    Flag(
        "dead-letter-queue",
        ("TXFAAS_DEAD_LETTER_QUEUE",),
        "txfaas.dead-letter",
        "The workers' dead-letter queue (refused as a function queue)",
    ),
    Flag(
        "callback-queue",
        ("TXFAAS_CALLBACK_QUEUE",),
        "txfaas.callbacks",
        "The workers' callback queue (refused as a function queue)",
    ),
    Flag(
        "workers",
        ("TXFAAS_WORKERS",),
        "1",
        "Gateway processes sharing the port (SO_REUSEPORT); needs Redis and RabbitMQ, and "
        "/metrics adds up across them",
    ),
)

log = Logger()


def _queue_name(value: str) -> str:
    return check_queue_name(value, "queue name")


def _checked(parse: Any) -> Any:
    """Validate with ``parse`` but keep the text (so defaults and given values take one path)."""

    def check(value: str) -> str:
        parse(value)
        return value

    return check


@attrs.frozen
class GatewayConfig:
    listen: str
    redis: RedisURL
    redis_text: str
    amqp: AMQPURL
    upstream_timeout: float
    read_timeout: float
    write_timeout: float
    basic_auth: tuple[str, str] | None
    function_url_template: str
    functions_file: str | None
    max_body: int | None
    max_async_body: int
    callback_policy: AddressPolicy
    call_ttl: float
    confirm_timeout: float
    redis_prefix: str
    pool_size: int
    default_queue: str = "faas-request"
    workers: int = 1
    #: Where the credentials came from: "environment", or the folder of their files.
    auth_source: str | None = None
    #: The credentials were generated by this start.
    auth_generated: bool = False
    backlog: int = DEFAULT_BACKLOG
    reserved_queues: ReservedQueues = attrs.field(factory=ReservedQueues)
    default_namespace: str = DEFAULT_NAMESPACE
    log_lines: int = 1000
    log_followers: int = 64
    secrets_key_path: str | None = None
    secrets_key: bytes | None = attrs.field(default=None, repr=False)  # never in a log line
    secrets_key_created: bool = False


class Options(CommandOptions):
    synopsis = "[options]"
    longdesc = (
        "The txfaas gateway: /function/{name} proxies to the function, /async-function/{name} "
        "queues the call on RabbitMQ, /system/* manages functions in Redis (OpenFaaS's API). "
        "Every option falls back to the environment variable named in its help."
    )
    optParameters = FLAGS.opt_parameters()

    def postOptions(self) -> None:
        try:
            self["config"] = build_config(self, os.environ)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        # Before prometheus_client is imported (by makeService).
        prepare_multiprocess_metrics(self["config"].workers)


def _namespace(value: str) -> str:
    try:
        return check_namespace(value)
    except ValidationError as e:
        raise ValueError(e.problem) from None


def build_config(opts: Any, environ: Any) -> GatewayConfig:
    get = FLAGS.reader(opts, environ)

    redis_text = get("redis", _checked(parse_redis_url))
    amqp_text = amqp_url_text(opts, environ, get)
    redis = parse_redis_url(redis_text)
    upstream = get("upstream-timeout", parse_duration)
    write = get("write-timeout", parse_duration)
    if write and upstream and write <= upstream:
        raise ConfigError(
            "--write-timeout",
            f"{format_duration(write)} must be longer than --upstream-timeout {format_duration(upstream)}, "
            "or responses still within upstream-timeout would be cut",
        )
    auth, auth_source, auth_generated = None, None, False
    if get("basic-auth", parse_bool):
        auth, auth_source, auth_generated = _credentials(opts, environ, get)
    nets, hosts = get("callback-allow", parse_networks) or ((), ())
    max_body = get("max-body", parse_size)
    workers = get("workers", parse_positive_int)
    if workers > 1:
        if redis.memory or amqp_text.startswith("memory"):
            raise ConfigError("--workers", "several processes need --redis and --amqp (not memory:)")
        try:
            parse_tcp_listen(get("listen", str))
        except ValueError as e:
            raise ConfigError("--listen", str(e)) from None
    key_path = get("secrets-key", str)
    if key_path is None and redis.memory:
        # Nothing outlives the process: neither need the key.
        key, key_created = Fernet.generate_key(), False
    else:
        key_path = key_path or os.path.join(
            get("state-dir", str) or default_state_dir(environ), "secrets.key"
        )
        try:
            key, key_created = load_or_create_key(key_path)
        except KeyFileError as e:
            raise ConfigError("--secrets-key", str(e)) from None
    return GatewayConfig(
        secrets_key_path=key_path,
        secrets_key=key,
        secrets_key_created=key_created,
        log_lines=get("log-lines", parse_positive_int),
        log_followers=get("log-followers", parse_positive_int),
        listen=get("listen", str),
        redis=redis,
        redis_text=redis_text,
        amqp=parse_amqp_url(amqp_text),
        upstream_timeout=upstream,
        read_timeout=get("read-timeout", parse_duration),
        write_timeout=write,
        basic_auth=auth,
        auth_source=auth_source,
        auth_generated=auth_generated,
        function_url_template=get("function-url-template", parse_url_template),
        functions_file=get("functions", str),
        default_namespace=get("default-namespace", _namespace),
        max_body=max_body,
        max_async_body=get("max-async-body", parse_size),
        callback_policy=AddressPolicy(tuple(nets), tuple(hosts)),
        call_ttl=get("call-ttl", parse_duration),
        confirm_timeout=get("confirm-timeout", parse_duration),
        redis_prefix=get("redis-prefix", str),
        default_queue=get("default-queue", _queue_name),
        pool_size=get("pool-size", parse_positive_int),
        workers=workers,
        backlog=get("backlog", parse_positive_int),
        reserved_queues=ReservedQueues(
            prefix=get("retry-prefix", _queue_name),
            dead_letter_queue=get("dead-letter-queue", _queue_name),
            callback_queue=get("callback-queue", _queue_name),
        ),
    )


def _credentials(opts: Any, environ: Any, get: Any) -> tuple[tuple[str, str], str, bool]:
    """Basic-auth credentials: the environment, else the secret mount, else generated in the state dir.

    A --secret-mount-path other than the default (or one that holds either file) must hold both.
    """
    user = environ.get("TXFAAS_BASIC_AUTH_USER")
    password = environ.get("TXFAAS_BASIC_AUTH_PASSWORD")
    if user and password:
        return (user, password), "environment", False
    mount = get("secret-mount-path", str)
    names = ("basic-auth-user", "basic-auth-password")
    mount_given = mount != FLAGS["secret-mount-path"].default
    if user or password or mount_given or any(os.path.exists(os.path.join(mount, n)) for n in names):
        user = user or read_secret(mount, "basic-auth-user")
        password = password or read_secret(mount, "basic-auth-password")
        if not user or not password:
            raise ConfigError("--basic-auth", f"user or password is empty (in {mount})")
        return (user, password), mount, False
    state = get("state-dir", str) or default_state_dir(environ)
    user, password, created = load_or_create_credentials(state)
    return (user, password), state, created


def gateway_url(listen: str) -> str:
    """The URL a client on this machine uses for a ``--listen`` endpoint (for the login hint)."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", listen)]
    scheme = "https" if parts[0] == "ssl" else "http"
    port = next((p for p in parts[1:] if p.isdigit()), None)
    port = port or next((p[5:] for p in parts[1:] if p.startswith("port=")), "8080")
    host = next((p[10:] for p in parts[1:] if p.startswith("interface=")), "")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def log_auth(config: GatewayConfig) -> None:
    """Say at start how /system/* is guarded: the login line, never the password."""
    if config.basic_auth is None:
        log.warn(
            "basic auth is OFF (--basic-auth false): /system/* and /metrics are open to anyone "
            "who can reach {listen}",
            listen=config.listen,
        )
        return
    user = config.basic_auth[0]
    if config.auth_source == "environment":
        log.info(
            "basic auth on for /system/* and /metrics: user {user} from $TXFAAS_BASIC_AUTH_USER",
            user=user,
        )
        return
    password_file = os.path.join(config.auth_source or "", "basic-auth-password")
    if config.auth_generated:
        log.info(
            "basic auth: generated a password for user {user} in {path} (mode 0600); "
            "it is kept for the next start",
            user=user,
            path=password_file,
        )
    log.info(
        "basic auth on for /system/* and /metrics; log in with: faas-cli login --gateway {url} "
        "--username {user} --password-stdin < {path}",
        url=gateway_url(config.listen),
        user=user,
        path=password_file,
    )


#: How long an idle keep-alive connection is kept (twisted.web's default is 12 hours).
IDLE_TIMEOUT = 300.0


def makeService(options: Options) -> service.IService:
    from txfaas.reactor import global_reactor
    from txfaas.service import settle_gc

    reactor = global_reactor()
    settle_gc(reactor)
    return build_gateway(reactor, options["config"])


def build_gateway(
    reactor: Any, config: GatewayConfig, *, store: Any = None, queue: Any = None
) -> service.IService:
    """Build the gateway service from its config (the only place real clients are made).

    ``store`` and ``queue`` may be given (``faas-local`` shares in-memory ones with a worker).
    """
    from prometheus_client import disable_created_metrics

    from txfaas.gateway.app import AppSettings, GatewayApp
    from txfaas.gateway.metrics import FlushMetrics, GatewayMetrics
    from txfaas.gateway.proxy import FunctionProxy, ProxySettings
    from txfaas.gateway.root import BasicAuth, GatewayRoot
    from txfaas.gateway.service import GatewayService
    from txfaas.http.client import function_agent
    from txfaas.http.pool import quiet_pool
    from txfaas.invocation_log import InvocationLog, instance_name
    from txfaas.multiprocess import die_with_parent, is_child
    from txfaas.secrets import SecretBox, key_too_open
    from txfaas.service import OrderedMultiService, listen, listen_reuseport
    from txfaas.store import open_store
    from txfaas.store.cache import FunctionCache
    from txfaas.supervisor import ChildProcesses

    disable_created_metrics()
    if not is_child():
        log_auth(config)
    closers = []
    own_store = store is None
    if store is None:
        store = open_store(reactor, config.redis, prefix=config.redis_prefix, call_ttl=config.call_ttl)
    own_queue = queue is None
    if queue is not None:
        pass
    elif config.amqp.memory:
        from txfaas.queue.memory import MemoryQueue

        queue = MemoryQueue([config.default_queue])
    else:
        from txfaas.queue.amqp import AMQPQueue

        queue = AMQPQueue(
            reactor, config.amqp, declare=(config.default_queue,), confirm_timeout=config.confirm_timeout
        )

    pool = quiet_pool(reactor, per_host=config.pool_size)
    client = function_agent(reactor, pool)
    closers.append(pool.closeCachedConnections)

    secret_box = SecretBox(config.secrets_key) if config.secrets_key else None
    if config.secrets_key_created and not is_child():
        log.info(
            "generated the secrets key {path} (mode 0600): back it up, and give every gateway "
            "sharing this Redis the same file",
            path=config.secrets_key_path,
        )
    elif config.secrets_key_path and key_too_open(config.secrets_key_path) and not is_child():
        log.warn(
            "the secrets key {path} can be read by others than its owner: chmod 600 it",
            path=config.secrets_key_path,
        )
    metrics = GatewayMetrics()
    functions = FunctionCache(store, reactor)
    invocations = InvocationLog(store, reactor, instance_name("gateway"), max_lines=config.log_lines)
    proxy = FunctionProxy(
        reactor,
        client,
        functions,
        ProxySettings(config.function_url_template, config.upstream_timeout, config.default_namespace),
        metrics,
        invocations=invocations,
    )
    app = GatewayApp(
        functions,
        store,
        queue,
        # Callback hosts resolved once per 5 s, not on every accepted call.
        CachingResolver(reactor.nameResolver, reactor),
        metrics,
        AppSettings(
            callback_policy=config.callback_policy,
            # A publish takes at most the confirm timeout; the margin covers the claim's own writes.
            claim_window=config.confirm_timeout + 5.0,
            reserved_queues=config.reserved_queues,
            default_namespace=config.default_namespace,
            default_queue=config.default_queue,
            log_followers=config.log_followers,
        ),
        clock=reactor,
        secret_box=secret_box,
    )
    auth = BasicAuth(*config.basic_auth) if config.basic_auth else None
    root = GatewayRoot(
        proxy,
        app,
        auth,
        max_body=config.max_body or None,  # 0, like no value, means no limit
        max_async_body=config.max_async_body,
    )
    site = root.site(
        reactor,
        read_timeout=config.read_timeout,
        response_timeout=config.write_timeout,  # from the request read to its response finished
        idle_timeout=IDLE_TIMEOUT,
    )

    async def close() -> None:
        for closer in closers:
            await closer()

    top = service.MultiService()
    if config.workers > 1 and not is_child():
        ChildProcesses(reactor, config.workers - 1).setServiceParent(top)
    elif is_child():
        die_with_parent()
    FlushMetrics(metrics, reactor).setServiceParent(top)
    # The store and the queue start before the gateway and stop once the gateway has drained
    # (shared ones: their owner's tree).
    ordered = OrderedMultiService()
    if own_store:
        store.setServiceParent(ordered)
    if own_queue:
        queue.setServiceParent(ordered)
    ordered.setServiceParent(top)
    GatewayService(
        reactor,
        site,
        config.listen,
        functions,
        queue,
        functions_file=config.functions_file,
        redis_description=config.redis_text,
        secret_box=secret_box,
        secrets_key_path=config.secrets_key_path,
        invocations=invocations,
        close=close,
        listen=partial(listen_reuseport if config.workers > 1 else listen, backlog=config.backlog),
        reserved_queues=config.reserved_queues,
        refused_queues=app.refused_queues,
        default_namespace=config.default_namespace,
    ).setServiceParent(ordered)
    return top
