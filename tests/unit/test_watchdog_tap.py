"""``faas-watchdog``'s options: flags, OpenFaaS environment variables, defaults and errors."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
from twisted.python import usage

from txfaas.config import ConfigError
from txfaas.watchdog import process, tap
from txfaas.watchdog.common import WatchdogConfig
from txfaas.watchdog.fork import ForkRunner
from txfaas.watchdog.http import HTTPRunner
from txfaas.watchdog.process import PYTHON_SETSID_SHIM
from txfaas.watchdog.server import Watchdog

ENV = {"PATH": os.environ["PATH"]}


def build(opts: dict[str, Any] | None = None, **env: str) -> WatchdogConfig:
    return tap.build_config(opts or {}, {**ENV, **env}, setsid="/usr/bin/setsid")


def test_defaults_follow_openfaas():
    config = build(fprocess="cat")
    assert config.fprocess == ("cat",)
    assert (config.mode, config.listen) == ("fork", "tcp:8080")
    assert (config.read_timeout, config.write_timeout, config.exec_timeout) == (30.0, 30.0, 10.0)
    assert (config.max_inflight, config.content_type, config.healthcheck_interval) == (0, None, 5.0)
    assert config.max_request == config.max_response == 16 * 1024 * 1024


def test_every_setting_reads_its_openfaas_variable():
    config = build(
        fprocess="python3 -u 'my fn.py'",
        mode="http",
        upstream_url="http://127.0.0.1:5000",
        port="8081",
        read_timeout="5",
        write_timeout="1m30s",
        exec_timeout="500ms",
        idle_timeout="10s",
        healthcheck_interval="2s",
        max_inflight="7",
        content_type="application/json",
        max_request="1MiB",
        max_response="2MiB",
    )
    assert config.fprocess == ("python3", "-u", "my fn.py")
    assert (config.mode, config.upstream_url, config.listen) == ("http", "http://127.0.0.1:5000", "tcp:8081")
    assert (config.read_timeout, config.write_timeout, config.exec_timeout) == (5.0, 90.0, 0.5)
    assert (config.idle_timeout, config.healthcheck_interval, config.max_inflight) == (10.0, 2.0, 7)
    assert config.content_type == "application/json"
    assert (config.max_request, config.max_response) == (1024 * 1024, 2 * 1024 * 1024)


def test_openfaas_aliases_are_understood():
    config = build(
        function_process="cat", hard_timeout="3s", mode="http", http_upstream_url="http://localhost:1"
    )
    assert (config.fprocess, config.exec_timeout, config.upstream_url) == (
        ("cat",),
        3.0,
        "http://localhost:1",
    )


def test_a_flag_wins_over_its_variable():
    config = build(
        {"exec-timeout": "2s", "listen": "tcp:9000:interface=127.0.0.1"}, fprocess="cat", exec_timeout="9s"
    )
    assert (config.exec_timeout, config.listen) == (2.0, "tcp:9000:interface=127.0.0.1")


def test_zero_means_no_limit_and_is_accepted():
    config = build(fprocess="cat", exec_timeout="0", read_timeout="0s", max_inflight="0", max_response="0")
    assert (config.exec_timeout, config.read_timeout, config.max_inflight, config.max_response) == (
        0,
        0,
        0,
        0,
    )


@pytest.mark.parametrize(
    ("opts", "env", "setting"),
    [
        ({}, {}, "--fprocess"),
        ({}, {"fprocess": "no-such-program-anywhere"}, "--fprocess"),
        ({}, {"fprocess": "'unclosed"}, "--fprocess"),
        ({"mode": "afterburn"}, {"fprocess": "cat"}, "--mode"),
        ({"mode": "http"}, {"fprocess": "cat"}, "--upstream-url"),
        ({}, {"fprocess": "cat", "upstream_url": "https://x:1"}, "--upstream-url (from $upstream_url)"),
        ({}, {"fprocess": "cat", "read_timeout": "soon"}, "--read-timeout (from $read_timeout)"),
        ({"write-timeout": "-1s"}, {"fprocess": "cat"}, "--write-timeout"),
        ({}, {"fprocess": "cat", "max_inflight": "many"}, "--max-inflight (from $max_inflight)"),
        ({}, {"fprocess": "cat", "port": "70000"}, "--listen (from $port)"),
        ({}, {"fprocess": "cat", "content_type": "a\r\nb"}, "--content-type"),
        ({}, {"fprocess": "cat", "max_request": "huge"}, "--max-request"),
    ],
)
def test_invalid_settings_raise_an_error_naming_them(opts, env, setting):
    with pytest.raises(ConfigError) as caught:
        build(opts, **env)
    assert str(caught.value).startswith(setting)
    assert "\n" not in str(caught.value)


def test_options_turn_config_errors_into_usage_errors(monkeypatch):
    monkeypatch.setenv("fprocess", "cat")
    monkeypatch.setenv("exec_timeout", "never")
    with pytest.raises(usage.UsageError, match=r"^--exec-timeout \(from \$exec_timeout\)"):
        tap.Options().parseOptions([])


def test_the_function_environment_is_captured_once_and_frozen():
    env = {"fprocess": "cat", "SECRET_NAME": "x"}
    config = build(**env)
    env["SECRET_NAME"] = "changed"
    assert config.environ["SECRET_NAME"] == "x"
    with pytest.raises(TypeError):
        config.environ["NEW"] = "y"  # type: ignore[index]


def test_the_launcher_is_setsid_or_the_python_shim():
    assert tap.build_config({}, {**ENV, "fprocess": "cat"}, setsid="/bin/setsid").launcher == (
        "/bin/setsid",
        "--",
    )
    shim = tap.build_config({}, {**ENV, "fprocess": "cat"}, setsid=None).launcher
    assert shim == (sys.executable, "-c", PYTHON_SETSID_SHIM)


@pytest.mark.parametrize(
    ("env", "runner"),
    [({}, ForkRunner), ({"mode": "http", "upstream_url": "http://127.0.0.1:1"}, HTTPRunner)],
)
def test_make_service_builds_a_watchdog_around_the_modes_runner(monkeypatch, env, runner):
    options = tap.Options()
    options["config"] = build({"listen": "tcp:0:interface=127.0.0.1"}, fprocess="cat", **env)
    monkeypatch.setattr(process, "become_subreaper", lambda: True)  # not this test process
    monkeypatch.setattr(process, "native_group_spawn", lambda reactor: None)
    service = tap.makeService(options)
    assert isinstance(service, Watchdog)
    assert isinstance(service._runner, runner)


def test_the_defaults_shown_in_help_are_the_defaults_used():
    """One table makes --help and the lookups: every shown default, given explicitly, changes nothing."""
    explicit = {flag.name: flag.default for flag in tap.FLAGS if flag.default is not None}
    assert build(explicit, fprocess="cat") == build(fprocess="cat")
    help_text = " ".join(str(tap.Options()).split())
    assert "[$max_request; default 16MiB]" in help_text


def test_a_listen_description_twisted_cannot_read_is_one_line_at_make_service(monkeypatch):
    options = tap.Options()
    options["config"] = build({"listen": "nonsense:8080"}, fprocess="cat")
    monkeypatch.setattr(process, "become_subreaper", lambda: True)
    with pytest.raises(SystemExit) as caught:
        tap.makeService(options)
    assert str(caught.value.code).startswith("error: --listen nonsense:8080: not a valid endpoint")
