"""faas-gateway's options: flags, environment fall-backs, and one-line errors."""

from __future__ import annotations

import pytest
from twisted.python import usage

from txfaas.gateway import tap


def parse(args: list[str], env: dict[str, str] | None = None, monkeypatch=None) -> tap.GatewayConfig:
    options = tap.Options()
    options.parseOptions(args)
    return options["config"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in [
        "upstream_timeout",
        "read_timeout",
        "write_timeout",
        "basic_auth",
        "secret_mount_path",
        "TXFAAS_LISTEN",
        "TXFAAS_REDIS",
        "TXFAAS_AMQP",
        "TXFAAS_MAX_BODY",
        "TXFAAS_BASIC_AUTH_USER",
        "TXFAAS_BASIC_AUTH_PASSWORD",
    ]:
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    config = parse([])
    assert config.listen == "tcp:8080"
    assert (config.redis.host, config.redis.port, config.redis.db) == ("127.0.0.1", 6379, 0)
    assert config.amqp.vhost == "/"
    assert config.upstream_timeout == 60.0
    assert config.write_timeout > config.upstream_timeout
    assert config.function_url_template == "http://{name}:8080"
    assert config.max_body is None
    assert config.max_async_body == 10 * 1024 * 1024
    assert config.basic_auth is None


def test_durations_in_every_openfaas_form():
    config = parse(["--upstream-timeout", "1m30s", "--read-timeout", "100", "--write-timeout", "95000ms"])
    assert (config.upstream_timeout, config.read_timeout, config.write_timeout) == (90.0, 100.0, 95.0)


def test_environment_is_the_fallback_and_flags_win(monkeypatch):
    monkeypatch.setenv("upstream_timeout", "5s")
    monkeypatch.setenv("TXFAAS_LISTEN", "tcp:9999")
    config = parse([])
    assert config.upstream_timeout == 5.0
    assert config.listen == "tcp:9999"
    assert parse(["--listen", "tcp:1234"]).listen == "tcp:1234"


def test_bad_duration_is_one_line_naming_the_setting(monkeypatch):
    with pytest.raises(usage.UsageError, match=r"^--upstream-timeout: not a duration"):
        parse(["--upstream-timeout", "soon"])
    monkeypatch.setenv("read_timeout", "-3s")
    with pytest.raises(usage.UsageError, match=r"\$read_timeout.*negative"):
        parse([])


def test_write_timeout_must_exceed_upstream_timeout():
    with pytest.raises(usage.UsageError, match="--write-timeout"):
        parse(["--upstream-timeout", "60s", "--write-timeout", "30s"])


def test_memory_store_and_queue_selectable():
    config = parse(["--redis", "memory:", "--amqp", "memory:"])
    assert config.redis.memory and config.amqp.memory


def test_bad_urls_are_refused():
    with pytest.raises(usage.UsageError, match="--redis"):
        parse(["--redis", "http://x"])
    with pytest.raises(usage.UsageError, match="--amqp"):
        parse(["--amqp", "redis://x"])
    with pytest.raises(usage.UsageError, match="--function-url-template"):
        parse(["--function-url-template", "http://{nme}:8080"])


def test_basic_auth_from_openfaas_secret_files(tmp_path):
    (tmp_path / "basic-auth-user").write_text("admin\n")
    (tmp_path / "basic-auth-password").write_text("pw\n")
    config = parse(["--basic-auth", "true", "--secret-mount-path", str(tmp_path)])
    assert config.basic_auth == ("admin", "pw")


def test_basic_auth_from_environment(monkeypatch):
    monkeypatch.setenv("basic_auth", "true")
    monkeypatch.setenv("TXFAAS_BASIC_AUTH_USER", "u")
    monkeypatch.setenv("TXFAAS_BASIC_AUTH_PASSWORD", "p")
    assert parse([]).basic_auth == ("u", "p")


def test_basic_auth_without_secrets_is_an_error(tmp_path):
    with pytest.raises(usage.UsageError, match=r"--secret-mount-path.*basic-auth-user"):
        parse(["--basic-auth", "true", "--secret-mount-path", str(tmp_path)])


def test_sizes_and_callback_allow():
    config = parse(
        ["--max-body", "1MiB", "--max-async-body", "512KiB", "--callback-allow", "127.0.0.0/8,hooks.local"]
    )
    assert config.max_body == 1024 * 1024
    assert config.max_async_body == 512 * 1024
    assert config.callback_policy.refusal("127.0.0.1") is None
    assert config.callback_policy.host_allowed("hooks.local")


def test_the_defaults_shown_in_help_are_the_defaults_used():
    """One table makes --help and the lookups: giving every shown default explicitly changes nothing."""
    explicit = [f"--{flag.name}={flag.default}" for flag in tap.FLAGS if flag.default is not None]
    assert len(explicit) > 10
    assert parse(explicit) == parse([])
    help_text = " ".join(str(tap.Options()).split())
    assert "[$read_timeout; default 65s]" in help_text
    assert "[$TXFAAS_MAX_BODY; default no limit]" in help_text


def test_pool_size_and_workers_must_be_whole_numbers_of_at_least_one():
    with pytest.raises(usage.UsageError, match=r"^--pool-size: must be at least 1"):
        parse(["--pool-size", "0"])
    with pytest.raises(usage.UsageError, match=r"^--workers: not a whole number"):
        parse(["--workers", "two"])
    with pytest.raises(usage.UsageError, match=r"^--basic-auth: not true or false"):
        parse(["--basic-auth", "perhaps"])
