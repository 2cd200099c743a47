"""``faas-worker`` options: flags, environment fall-backs, the consumer-timeout rule, the built services."""

from __future__ import annotations

import pytest
from twisted.application.service import IServiceCollection
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from txfaas.config import ConfigError
from txfaas.worker import tap
from txfaas.worker.service import WorkerService


def parse(*argv: str, environ: dict[str, str] | None = None) -> tap.Settings:
    options = tap.Options()
    options.parseOptions(list(argv))
    return tap.settings_from(options, environ or {})


def test_defaults():
    """With no flags and no environment: the documented defaults."""
    s = parse()
    w = s.worker
    assert w.queues == ("faas-request",)
    assert w.max_inflight == 100
    assert w.exec_timeout == 30.0
    assert w.callback_timeout == 10.0
    assert w.consumer_timeout == 1800.0
    assert w.drain_timeout == 30.0
    assert w.max_result_size == 1024 * 1024
    assert (w.callback_concurrency, w.callback_host_concurrency) == (200, 100)
    assert w.max_answer_memory == 64 * 1024 * 1024
    assert w.gateway_url is None
    assert w.function_url_template == "http://{name}:8080"
    assert (s.amqp.host, s.amqp.port) == ("127.0.0.1", 5672)
    assert (s.redis.host, s.redis.port, s.redis_prefix) == ("127.0.0.1", 6379, "txfaas:")
    assert s.call_ttl == 24 * 3600
    assert s.listen == "tcp:8081"
    assert s.signing_key is None
    assert s.callback_policy.allow_networks == () and s.callback_policy.allow_hosts == ()


def test_flags():
    """Every flag is parsed with the shared parsers (durations, sizes, URLs, networks)."""
    s = parse(
        "--amqp=amqp://u:p@mq:5673/v",
        "--redis=redis://r:6380/2",
        "--redis-prefix=t1:",
        "--queue=a",
        "--queue=b",
        "--queue=a",
        "--max-inflight=7",
        "--exec-timeout=1m30s",
        "--function-url-template=http://{name}.{namespace}:8080",
        "--gateway-url=http://gw:8080/",
        "--callback-allow=127.0.0.0/8,hooks.local",
        "--callback-secret=whsec_a2V5",
        "--callback-timeout=500ms",
        "--consumer-timeout=1h",
        "--drain-timeout=5s",
        "--max-result-size=2KiB",
        "--call-ttl=1h",
        "--listen=tcp:9999",
    )
    w = s.worker
    assert w.queues == ("a", "b")
    assert (w.max_inflight, w.exec_timeout, w.callback_timeout) == (7, 90.0, 0.5)
    assert (w.consumer_timeout, w.drain_timeout, w.max_result_size) == (3600.0, 5.0, 2048)
    assert w.gateway_url == "http://gw:8080"
    assert w.function_url_template == "http://{name}.{namespace}:8080"
    assert (s.amqp.host, s.amqp.port, s.amqp.vhost, s.amqp.username) == ("mq", 5673, "v", "u")
    assert (s.redis.host, s.redis.port, s.redis.db, s.redis_prefix) == ("r", 6380, 2, "t1:")
    assert s.signing_key == b"key"
    assert [str(n) for n in s.callback_policy.allow_networks] == ["127.0.0.0/8"]
    assert s.callback_policy.allow_hosts == ("hooks.local",)
    assert (s.call_ttl, s.listen) == (3600.0, "tcp:9999")


def test_environment_fallbacks_and_flags_win():
    """Each setting falls back to its environment variable; a flag beats the environment."""
    env = {
        "TXFAAS_AMQP": "amqp://mq-env/",
        "TXFAAS_REDIS": "redis://redis-env",
        "TXFAAS_QUEUES": "q1, q2",
        "max_inflight": "3",
        "TXFAAS_EXEC_TIMEOUT": "12",
        "TXFAAS_CALLBACK_SECRET": "text secret",
        "TXFAAS_CALLBACK_ALLOW": "10.0.0.0/8",
        "TXFAAS_WORKER_LISTEN": "tcp:7000",
    }
    s = parse(environ=env)
    assert (s.amqp.host, s.redis.host) == ("mq-env", "redis-env")
    assert s.worker.queues == ("q1", "q2")
    assert (s.worker.max_inflight, s.worker.exec_timeout) == (3, 12.0)
    assert s.signing_key == b"text secret"
    assert s.listen == "tcp:7000"
    s = parse("--queue=flag", "--max-inflight=9", "--exec-timeout=5s", environ=env)
    assert (s.worker.queues, s.worker.max_inflight, s.worker.exec_timeout) == (("flag",), 9, 5.0)


def test_amqp_url_file(tmp_path):
    """``--amqp-url-file`` / $TXFAAS_AMQP_URL_FILE: the broker's URL from a Docker secret, never shown."""
    path = tmp_path / "amqp-url"
    path.write_text("amqp://txfaas:s3cret-pass@rabbitmq:5672/%2F\n")
    s = parse(f"--amqp-url-file={path}")
    assert (s.amqp.host, s.amqp.username, s.amqp.password) == ("rabbitmq", "txfaas", "s3cret-pass")
    assert parse(environ={"TXFAAS_AMQP_URL_FILE": str(path)}).amqp.password == "s3cret-pass"
    with pytest.raises(ConfigError, match="not both"):
        parse(f"--amqp-url-file={path}", environ={"TXFAAS_AMQP": "amqp://guest:guest@x/"})
    with pytest.raises(ConfigError, match=r"^--amqp-url-file: cannot read .*missing"):
        parse(f"--amqp-url-file={tmp_path / 'missing'}")
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        parse(f"--amqp-url-file={path}")
    path.write_text("http://u:s3cret-pass@x/")
    with pytest.raises(ConfigError, match="does not hold an amqp") as e:
        parse(f"--amqp-url-file={path}")
    assert "s3cret" not in str(e.value)


def test_callback_secret_file(tmp_path):
    """``--callback-secret-file`` reads the key from a file (trimmed); both at once is refused."""
    path = tmp_path / "cb-secret"
    path.write_text("from-file\n")
    assert parse(f"--callback-secret-file={path}").signing_key == b"from-file"
    with pytest.raises(ConfigError, match="--callback-secret-file"):
        parse(f"--callback-secret-file={path}", "--callback-secret=x")
    with pytest.raises(ConfigError, match="cannot read"):
        parse(f"--callback-secret-file={tmp_path / 'missing'}")


@pytest.mark.parametrize(
    ("argv", "environ", "flag"),
    [
        (["--max-inflight=0"], {}, "--max-inflight"),
        (["--max-inflight=many"], {}, "--max-inflight"),
        ([], {"TXFAAS_MAX_INFLIGHT": "-1"}, "--max-inflight (from $TXFAAS_MAX_INFLIGHT)"),
        (["--exec-timeout=0"], {}, "--exec-timeout"),
        (["--exec-timeout=soon"], {}, "--exec-timeout"),
        (["--callback-timeout=-1s"], {}, "--callback-timeout"),
        (["--queue=bad name"], {}, "--queue"),
        (["--amqp=http://x"], {}, "--amqp"),
        (["--redis=amqp://x"], {}, "--redis"),
        (["--gateway-url=gw:8080"], {}, "--gateway-url"),
        (["--function-url-template=http://{nom}:8080"], {}, "--function-url-template"),
        (["--callback-allow=not a net"], {}, "--callback-allow"),
        (["--callback-secret=whsec_!!"], {}, "--callback-secret"),
        (["--max-result-size=big"], {}, "--max-result-size"),
        (["--callback-concurrency=0"], {}, "--callback-concurrency"),
        (["--max-answer-memory=1KiB"], {}, "--max-answer-memory"),
        (
            [],
            {"TXFAAS_CALLBACK_HOST_CONCURRENCY": "x"},
            "--callback-host-concurrency (from $TXFAAS_CALLBACK_HOST_CONCURRENCY)",
        ),
    ],
)
def test_bad_values_name_their_flag(argv, environ, flag):
    """A bad value is a ConfigError whose one-line message starts with the flag (and variable)."""
    with pytest.raises(ConfigError) as e:
        parse(*argv, environ=environ)
    assert str(e.value).startswith(flag + ":")
    assert "\n" not in str(e.value)


def test_exec_timeout_must_leave_room_below_the_consumer_timeout():
    """exec_timeout + callback timeout + recording time >= consumer timeout is refused, saying why."""
    # 30m consumer timeout - 10s callback - 60s recording - 30s margin = 28m20s at most.
    assert parse("--exec-timeout=28m20s").worker.exec_timeout == 1700.0
    with pytest.raises(ConfigError) as e:
        parse("--exec-timeout=28m21s")
    message = str(e.value)
    assert message.startswith("--exec-timeout:")
    assert "--consumer-timeout" in message and "run twice" in message
    with pytest.raises(ConfigError):
        parse("--consumer-timeout=1m")  # the default 30s exec timeout no longer fits
    assert parse("--consumer-timeout=2h", "--exec-timeout=1h").worker.exec_timeout == 3600.0


def test_make_service_turns_a_bad_value_into_a_one_line_exit():
    """Startup errors are one line on stderr and a non-zero exit, not a traceback."""
    options = tap.Options()
    options.parseOptions(["--max-inflight=0"])
    with pytest.raises(SystemExit) as e:
        tap.makeService(options)
    assert e.value.code == "error: --max-inflight: must be at least 1, not 0"


def test_unknown_flag_is_a_usage_error():
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions(["--no-such-flag"])


def test_build_orders_services_so_the_listener_stops_first():
    """The store, the pools, the queue, the worker, then the HTTP listener: stopping runs in
    reverse, so the listener goes first, the queue closes once the worker drained, the store last."""
    settings = parse("--amqp=memory:", "--redis=memory:", "--listen=tcp:0")
    top = tap.build(MemoryReactorClock(), settings)
    children = list(IServiceCollection(top))
    assert [type(c).__name__ for c in children] == [
        "MemoryStore",
        "_Closer",
        "MemoryQueue",
        "WorkerService",
        "Listener",
    ]
    worker = children[3]
    assert isinstance(worker, WorkerService)
    assert worker.config is settings.worker


def test_stopping_the_tree_closes_the_queue_and_store_only_once_the_worker_has_drained():
    """The listener stops first; the queue closes only when the worker's stop (its drain) is
    over; the pools, then the store, last."""
    settings = parse("--amqp=memory:", "--redis=memory:", "--listen=tcp:0")
    top = tap.build(MemoryReactorClock(), settings)
    top.startService()
    stopped: list[str] = []
    drained: defer.Deferred = defer.Deferred()
    for child in IServiceCollection(top):
        name = type(child).__name__

        def stop(child=child, name=name):
            stopped.append(name)
            return drained if name == "WorkerService" else type(child).stopService(child)

        child.stopService = stop
    done = top.stopService()
    assert stopped == ["Listener", "WorkerService"]
    drained.callback(None)
    assert stopped == ["Listener", "WorkerService", "MemoryQueue", "_Closer", "MemoryStore"]
    assert done.called


def test_help_names_every_flag_and_its_environment_variable():
    text = str(tap.Options())
    for flag in [
        "--amqp", "--redis", "--redis-prefix", "--queue", "--max-inflight", "--exec-timeout",
        "--function-url-template", "--gateway-url", "--callback-allow", "--callback-secret",
        "--callback-timeout", "--consumer-timeout", "--drain-timeout", "--max-result-size",
        "--call-ttl", "--listen",
    ]:  # fmt: skip
        assert f"{flag}=" in text, flag
    assert "$TXFAAS_AMQP" in text and "$max_inflight" in text and "$TXFAAS_QUEUES" in text


def test_retry_and_dead_letter_defaults():
    """Five attempts on 408/429/500/502/503/504 waiting 1 s to 2 min; callbacks 10 attempts over at
    most 24 h; max age 6 h; delivery limit 5; the default queue and tier names."""
    w = parse().worker
    assert (w.retry.max_attempts, w.retry.min_wait, w.retry.max_wait) == (5, 1.0, 120.0)
    assert w.retry.codes == {408, 429, 500, 502, 503, 504}
    assert (w.callback_retry.max_attempts, w.callback_retry.max_age) == (10, 24 * 3600.0)
    assert (w.callback_retry.min_wait, w.callback_retry.max_wait) == (5.0, 3600.0)
    assert (w.max_age, w.delivery_limit) == (6 * 3600.0, 5)
    assert (w.callback_queue, w.dead_letter_queue) == ("txfaas.callbacks", "txfaas.dead-letter")
    assert w.delay_tiers[0] == 1.0 and w.delay_tiers[-1] == 3600.0
    assert parse().retry_prefix == "txfaas"


def test_retry_flags_and_their_environment_variables():
    s = parse(
        "--max-attempts=3",
        "--retry-codes=429 503",
        "--retry-min-wait=10ms",
        "--retry-max-wait=50ms",
        "--callback-max-attempts=2",
        "--callback-max-age=1m",
        "--max-age=30s",
        "--delivery-limit=0",
        "--delay-tiers=20ms,100ms",
        "--retry-prefix=t1",
        "--dead-letter-queue=t1.dlq",
        "--callback-queue=t1.cb",
    )
    w = s.worker
    assert (w.retry.max_attempts, w.retry.codes, w.retry.min_wait, w.retry.max_wait) == (
        3,
        {429, 503},
        0.01,
        0.05,
    )
    assert (w.callback_retry.max_attempts, w.callback_retry.max_age, w.max_age) == (2, 60.0, 30.0)
    assert (w.delivery_limit, w.delay_tiers, s.retry_prefix) == (0, (0.02, 0.1), "t1")
    assert (w.dead_letter_queue, w.callback_queue) == ("t1.dlq", "t1.cb")
    env = parse(environ={"TXFAAS_MAX_ATTEMPTS": "7", "TXFAAS_DELAY_TIERS": "1s"}).worker
    assert (env.retry.max_attempts, env.delay_tiers) == (7, (1.0,))


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--max-attempts=0"], "--max-attempts"),
        (["--retry-codes=abc"], "--retry-codes"),
        (["--retry-codes=,"], "--retry-codes"),
        (["--retry-min-wait=10s", "--retry-max-wait=1s"], "--retry-max-wait"),
        (["--delay-tiers=0"], "--delay-tiers"),
        (["--delivery-limit=-1"], "--delivery-limit"),
        (["--callback-queue=faas-request"], "--queue"),
        (["--dead-letter-queue=bad name"], "--dead-letter-queue"),
    ],
)
def test_bad_retry_settings_name_their_flag(argv, flag):
    with pytest.raises(ConfigError) as e:
        parse(*argv)
    assert str(e.value).startswith(flag + ":")
