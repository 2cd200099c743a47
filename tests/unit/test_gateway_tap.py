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
def clean_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TXFAAS_STATE_DIR", str(tmp_path / "state"))
    for name in [
        "upstream_timeout",
        "read_timeout",
        "write_timeout",
        "basic_auth",
        "secret_mount_path",
        "TXFAAS_LISTEN",
        "TXFAAS_REDIS",
        "TXFAAS_AMQP",
        "TXFAAS_AMQP_URL_FILE",
        "TXFAAS_MAX_BODY",
        "TXFAAS_BASIC_AUTH_USER",
        "TXFAAS_BASIC_AUTH_PASSWORD",
        "TXFAAS_BACKLOG",
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
    assert config.basic_auth is not None  # secure by default


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


def test_amqp_url_file(tmp_path, monkeypatch):
    """The broker's URL from a file (a Docker secret), flag or $TXFAAS_AMQP_URL_FILE; errors never show it."""
    path = tmp_path / "amqp-url"
    path.write_text("amqp://txfaas:s3cret-pass@rabbitmq:5672/%2F\n")
    config = parse([f"--amqp-url-file={path}"])
    assert (config.amqp.host, config.amqp.username, config.amqp.password) == (
        "rabbitmq",
        "txfaas",
        "s3cret-pass",
    )
    monkeypatch.setenv("TXFAAS_AMQP_URL_FILE", str(path))
    assert parse([]).amqp.password == "s3cret-pass"
    with pytest.raises(usage.UsageError, match="not both"):
        parse(["--amqp=amqp://guest:guest@x/"])
    monkeypatch.delenv("TXFAAS_AMQP_URL_FILE")
    with pytest.raises(usage.UsageError, match=r"^--amqp-url-file: cannot read .*missing: No such file"):
        parse([f"--amqp-url-file={tmp_path / 'missing'}"])
    path.write_text(" \n")
    with pytest.raises(usage.UsageError, match=r"^--amqp-url-file: .*amqp-url is empty$"):
        parse([f"--amqp-url-file={path}"])
    path.write_text("redis://:s3cret-pass@x/")
    with pytest.raises(usage.UsageError, match="does not hold an amqp") as e:
        parse([f"--amqp-url-file={path}"])
    assert "s3cret" not in str(e.value)


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
    parse([])  # the first start generates credentials and the secrets key; both below find them
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


def test_basic_auth_is_on_by_default_with_generated_credentials(tmp_path):
    """No flag, no variable, no secret files: a strong password is generated, files mode 0600."""
    config = parse([])
    state = tmp_path / "state"
    user, password = config.basic_auth
    assert user == "admin"
    assert len(password) >= 32
    assert (state / "basic-auth-user").read_text() == "admin"
    assert (state / "basic-auth-password").read_text() == password
    assert (state / "basic-auth-password").stat().st_mode & 0o777 == 0o600
    assert (state / "basic-auth-user").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert (config.auth_source, config.auth_generated) == (str(state), True)
    assert sorted(p.name for p in state.iterdir()) == [
        "basic-auth-password",
        "basic-auth-user",
        "secrets.key",
    ]


def test_generated_credentials_are_reused_on_the_next_start():
    first = parse([])
    again = parse([])
    assert again.basic_auth == first.basic_auth
    assert again.auth_generated is False


def test_generated_passwords_differ_between_state_dirs(tmp_path, monkeypatch):
    first = parse([])
    monkeypatch.setenv("TXFAAS_STATE_DIR", str(tmp_path / "other"))
    assert parse([]).basic_auth[1] != first.basic_auth[1]


def test_state_dir_flag_and_its_default(tmp_path, monkeypatch):
    config = parse(["--state-dir", str(tmp_path / "flag")])
    assert (tmp_path / "flag" / "basic-auth-password").read_text() == config.basic_auth[1]
    from txfaas.config import default_state_dir

    assert default_state_dir({"XDG_STATE_HOME": "/x/state", "HOME": "/h"}) == "/x/state/txfaas"
    assert default_state_dir({"HOME": "/h"}) == "/h/.local/state/txfaas"


def test_an_unwritable_state_dir_is_one_line_naming_the_flag(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(usage.UsageError, match=r"^--state-dir: cannot create .*file/sub"):
        parse(["--state-dir", str(blocker / "sub")])


def test_an_empty_generated_file_is_refused_not_used(tmp_path):
    state = tmp_path / "state"
    parse([])
    (state / "basic-auth-password").write_text("")
    with pytest.raises(usage.UsageError, match=r"^--state-dir: .*basic-auth-password is empty"):
        parse([])


def test_secret_files_win_over_generated_ones(tmp_path):
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "basic-auth-user").write_text("ops")
    (mount / "basic-auth-password").write_text("s3cret")
    config = parse(["--secret-mount-path", str(mount)])
    assert config.basic_auth == ("ops", "s3cret")
    assert config.auth_source == str(mount)
    assert not (tmp_path / "state" / "basic-auth-password").exists()  # (the secrets key is there)


def test_basic_auth_false_must_be_said_and_turns_it_off(tmp_path):
    config = parse(["--basic-auth", "false"])
    assert config.basic_auth is None
    assert not (tmp_path / "state" / "basic-auth-password").exists()  # (the secrets key is there)


def _logged(monkeypatch, config) -> str:
    from twisted.logger import Logger, formatEvent

    events: list[dict] = []
    monkeypatch.setattr(tap, "log", Logger(observer=events.append))
    tap.log_auth(config)
    return "\n".join(f"{e['log_level'].name}: {formatEvent(e)}" for e in events)


def test_a_warning_is_logged_at_every_start_with_auth_off(monkeypatch):
    text = _logged(monkeypatch, parse(["--basic-auth", "false", "--listen", "tcp:9000"]))
    assert text.startswith("warn: basic auth is OFF")
    assert "/system/*" in text


def test_the_login_line_is_logged_never_the_password(monkeypatch, tmp_path):
    config = parse(["--listen", "tcp:9000:interface=0.0.0.0"])
    text = _logged(monkeypatch, config)
    path = tmp_path / "state" / "basic-auth-password"
    assert f"generated a password for user admin in {path} (mode 0600)" in text
    assert (
        f"faas-cli login --gateway http://127.0.0.1:9000 --username admin --password-stdin < {path}" in text
    )
    assert config.basic_auth[1] not in text
    again = _logged(monkeypatch, parse(["--listen", "tcp:9000"]))
    assert "generated" not in again and "faas-cli login" in again


@pytest.mark.parametrize(
    "listen, url",
    [
        ("tcp:8080", "http://127.0.0.1:8080"),
        ("tcp:port=81:interface=10.0.0.5", "http://10.0.0.5:81"),
        ("tcp6:8080:interface=\\:\\:1", "http://[::1]:8080"),
        ("ssl:8443:privateKey=k.pem", "https://127.0.0.1:8443"),
    ],
)
def test_gateway_url_for_the_login_line(listen, url):
    assert tap.gateway_url(listen) == url


def test_backlog_defaults_to_1024_and_is_a_flag(monkeypatch):
    assert parse([]).backlog == 1024
    assert parse(["--backlog", "4096"]).backlog == 4096
    monkeypatch.setenv("TXFAAS_BACKLOG", "200")
    assert parse([]).backlog == 200
    with pytest.raises(usage.UsageError, match="--backlog"):
        parse(["--backlog", "0"])


def test_default_queue_flag():
    assert parse([]).default_queue == "faas-request"
    assert parse(["--default-queue", "txfaas-run-1"]).default_queue == "txfaas-run-1"
    with pytest.raises(usage.UsageError, match=r"^--default-queue: .*invalid queue name 'a b'"):
        parse(["--default-queue", "a b"])


def test_secrets_key_is_generated_in_the_state_folder_and_kept(tmp_path):
    first = parse([])
    path = tmp_path / "state" / "secrets.key"
    assert first.secrets_key_path == str(path)
    assert first.secrets_key_created is True
    assert path.read_bytes().strip() == first.secrets_key
    assert path.stat().st_mode & 0o777 == 0o600
    again = parse([])
    assert (again.secrets_key, again.secrets_key_created) == (first.secrets_key, False)
    assert first.secrets_key.decode() not in repr(first)  # never in a log line


def test_secrets_key_flag_names_the_file_and_a_corrupt_one_is_one_line(tmp_path):
    path = tmp_path / "mine.key"
    assert parse(["--secrets-key", str(path)]).secrets_key_path == str(path)
    path.write_text("garbage")
    with pytest.raises(
        usage.UsageError, match=r"^--secrets-key: the secrets key .*mine.key is not a Fernet key"
    ):
        parse(["--secrets-key", str(path)])


def test_memory_store_needs_no_key_file(tmp_path):
    config = parse(["--redis", "memory:"])
    assert config.secrets_key is not None
    assert config.secrets_key_path is None
    assert not (tmp_path / "state" / "secrets.key").exists()
