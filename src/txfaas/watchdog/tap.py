"""``twistd faas-watchdog``: options, and the one place that builds the watchdog's real objects.

Configured like OpenFaaS's watchdog: every flag falls back to the OpenFaaS
environment variable named in its help (``fprocess``, ``mode``,
``read_timeout``, ...).  Durations read ``10``, ``10s``, ``1m30s`` or
``500ms``; ``0`` means no limit.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.application import service
from twisted.python import usage

from txfaas.cli import CommandOptions
from txfaas.config import (
    ConfigError,
    Flag,
    Flags,
    format_duration,
    format_size,
    parse_count,
    parse_duration,
    parse_http_url,
    parse_size,
)
from txfaas.watchdog.common import HTTP, MODES, WatchdogConfig
from txfaas.watchdog.process import group_launcher

DEFAULTS = WatchdogConfig(fprocess=())


def _mode(value: str) -> str:
    mode = value.strip().lower()
    if mode not in MODES:
        raise ValueError(f"unknown mode {value!r}: use {' or '.join(MODES)}")
    return mode


def _command(value: str) -> tuple[str, ...]:
    try:
        argv = tuple(shlex.split(value))
    except ValueError as e:
        raise ValueError(f"cannot split {value!r}: {e}") from None
    if not argv:
        raise ValueError("empty command")
    return argv


def _listen(value: str) -> str:
    """``8080`` (the OpenFaaS ``port`` variable) means ``tcp:8080``; otherwise a Twisted endpoint."""
    text = str(value).strip()
    if text.isdigit():
        port = int(text)
        if not 0 < port < 65536:
            raise ValueError(f"not a TCP port: {text}")
        return f"tcp:{port}"
    if not text or ":" not in text:
        raise ValueError(f"not an endpoint description: {text!r} (e.g. tcp:8080)")
    return text


def _upstream(value: str) -> str:
    url = parse_http_url(value)
    if urlsplit(url).scheme != "http":
        raise ValueError(f"the function's server must speak plain http: {value!r}")
    return url


def _content_type(value: str) -> str:
    text = value.strip()
    if not text or any(c in text for c in "\r\n\x00") or not text.isascii():
        raise ValueError(f"not a content type: {value!r}")
    return text


_D = DEFAULTS
FLAGS = Flags(
    Flag(
        "fprocess", ("fprocess", "function_process"), None, "The function's command, split like a shell would"
    ),
    Flag("mode", ("mode",), _D.mode, "fork: a process per request; http: one process, proxied"),
    Flag(
        "upstream-url",
        ("upstream_url", "http_upstream_url"),
        None,
        "http mode: where the command serves HTTP, e.g. http://127.0.0.1:5000",
    ),
    Flag(
        "listen",
        ("port",),
        _D.listen,
        "Twisted endpoint to serve on; $port may be a bare port number (tcp:<port>)",
    ),
    Flag(
        "read-timeout",
        ("read_timeout",),
        format_duration(_D.read_timeout),
        "Longest time to read a whole request, from its first byte (408 after it)",
    ),
    Flag(
        "write-timeout",
        ("write_timeout",),
        format_duration(_D.write_timeout),
        "Longest time to hand the response over to the client (one that does not read it is "
        "disconnected); also how long running requests may finish when stopping",
    ),
    Flag(
        "exec-timeout",
        ("exec_timeout", "hard_timeout"),
        format_duration(_D.exec_timeout),
        "Longest run of the function: the process group is killed (fork) or the request aborted "
        "(http), 504; a request's X-Timeout may shorten it",
    ),
    Flag(
        "idle-timeout",
        ("idle_timeout",),
        format_duration(_D.idle_timeout),
        "How long an idle keep-alive connection stays open",
    ),
    Flag(
        "healthcheck-interval",
        ("healthcheck_interval",),
        format_duration(_D.healthcheck_interval),
        "http mode: how often the function's server is probed once up",
    ),
    Flag(
        "max-inflight",
        ("max_inflight",),
        str(_D.max_inflight),
        "Most concurrent calls, 429 beyond",
        shown="0: no limit",
    ),
    Flag(
        "content-type",
        ("content_type",),
        None,
        "fork mode: Content-Type of responses",
        shown="the request's, else application/octet-stream",
    ),
    Flag(
        "max-request",
        ("max_request",),
        format_size(_D.max_request),
        "Largest request body, 413 above; 0: no limit",
    ),
    Flag(
        "max-response",
        ("max_response",),
        format_size(_D.max_response),
        "Largest function output, 500 (fork) or 502 (http) above; 0: no limit",
    ),
)


class Options(CommandOptions):
    synopsis = "[options]"
    longdesc = (
        "Runs any program as an OpenFaaS-style function over HTTP. fork mode starts the command for "
        "every request (body on stdin, stdout is the response, Http_* variables in its environment); "
        "http mode starts it once and proxies to it on --upstream-url. GET /_/health answers 200 when "
        "ready, 503 while starting or draining. Every option falls back to the OpenFaaS environment "
        "variable named in its help; durations read 10, 10s, 1m30s or 500ms, and 0 means no limit."
    )
    optParameters = FLAGS.opt_parameters()

    def postOptions(self) -> None:
        try:
            self["config"] = build_config(self, os.environ)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def build_config(
    opts: Mapping[str, Any], environ: Mapping[str, str], setsid: str | bool | None = True
) -> WatchdogConfig:
    """Flags, else the OpenFaaS variables, else the defaults; raises :class:`ConfigError`."""
    get = FLAGS.reader(opts, environ)
    fprocess = get("fprocess", _command)
    if fprocess is None:
        raise ConfigError("--fprocess", "the function's command is required (or set $fprocess)")
    path = environ.get("PATH", os.defpath)
    if shutil.which(fprocess[0], path=path) is None:
        raise ConfigError("--fprocess", f"command not found: {fprocess[0]}")
    mode = get("mode", _mode)
    upstream = get("upstream-url", _upstream)
    if mode == HTTP and upstream is None:
        raise ConfigError("--upstream-url", "http mode needs the function's URL (or set $upstream_url)")
    if setsid is True:
        setsid = shutil.which("setsid")
    return WatchdogConfig(
        fprocess=fprocess,
        mode=mode,
        upstream_url=upstream,
        listen=get("listen", _listen),
        read_timeout=get("read-timeout", parse_duration),
        write_timeout=get("write-timeout", parse_duration),
        exec_timeout=get("exec-timeout", parse_duration),
        idle_timeout=get("idle-timeout", parse_duration),
        healthcheck_interval=get("healthcheck-interval", parse_duration),
        max_inflight=get("max-inflight", parse_count),
        content_type=get("content-type", _content_type),
        max_request=get("max-request", parse_size),
        max_response=get("max-response", parse_size),
        environ=dict(environ),
        launcher=group_launcher(setsid or None, sys.executable),
    )


def makeService(options: Options) -> service.IService:
    from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol
    from twisted.web.client import Agent, HTTPConnectionPool

    from txfaas.reactor import global_reactor
    from txfaas.service import exit_on_startup_error, server_endpoint, settle_gc
    from txfaas.watchdog.fork import ForkRunner
    from txfaas.watchdog.http import HTTPRunner, UpstreamEndpoint
    from txfaas.watchdog.process import OrphanReaper, become_subreaper, native_group_spawn
    from txfaas.watchdog.server import Watchdog

    reactor = global_reactor()
    config: WatchdogConfig = options["config"]
    settle_gc(reactor)
    with exit_on_startup_error():
        endpoint = server_endpoint(reactor, config.listen)
    become_subreaper()
    spawn = native_group_spawn(reactor)
    if spawn is not None:
        config = attrs.evolve(config, launcher=())  # no setsid exec needed
    reaper = OrphanReaper(reactor)
    runner: Any
    if config.mode == HTTP:
        assert config.upstream_url is not None
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = max(config.max_inflight, 64)
        # Close idle connections before the function's server does (Node: 5s, gunicorn: 2s): a POST
        # sent on a connection the server is closing cannot be retried safely. Reconnecting on
        # loopback is cheap, and under load connections never sit idle that long.
        pool.cachedConnectionTimeout = 1
        parts = urlsplit(config.upstream_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        agent = Agent.usingEndpointFactory(
            reactor, UpstreamEndpoint(HostnameEndpoint(reactor, host, port, timeout=5)), pool=pool
        )

        def probe() -> Any:
            d = connectProtocol(HostnameEndpoint(reactor, host, port, timeout=2), Protocol())
            return d.addCallback(lambda proto: proto.transport.loseConnection())

        runner = HTTPRunner(
            reactor,
            reactor,
            agent,
            config,
            reaper,
            probe,
            close_pool=pool.closeCachedConnections,
            spawn=spawn,
        )
    else:
        runner = ForkRunner(reactor, config, reaper, spawn=spawn)
    return Watchdog(config, reactor, runner, endpoint)
