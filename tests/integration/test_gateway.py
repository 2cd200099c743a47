"""``twistd faas-gateway`` as a real process, against the real Redis and real upstream HTTP servers."""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
import treq

from tests.support import (
    GATEWAY_AUTH,
    Recorder,
    TwistdProcess,
    delete_redis_prefix,
    free_port,
    gateway_env,
    listen_http,
    never_answer,
    run_twistd_sync,
    unique,
    wait_for,
)

#: The key prefixes of this test's gateways, deleted from Redis when the test ends.
_PREFIXES: list[str] = []


def _prefix() -> str:
    prefix = unique("gwtest") + ":"
    _PREFIXES.append(prefix)
    return prefix


@pytest_twisted.async_yield_fixture(autouse=True)
async def _delete_gateway_keys():
    yield
    while _PREFIXES:
        await delete_redis_prefix("redis://127.0.0.1:6379/0", _PREFIXES.pop())


async def start_gateway(redis_url: str, *extra: str, env: dict | None = None) -> tuple[TwistdProcess, str]:
    port = free_port()
    proc = TwistdProcess(
        "faas-gateway",
        [
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--redis",
            redis_url,
            "--redis-prefix",
            _prefix(),
            "--amqp",
            "memory:",
            *extra,
        ],
        env=gateway_env() if env is None else env,
    )
    base = f"http://127.0.0.1:{port}"
    await proc.wait_http(base + "/healthz", status=200)
    return proc, base


async def deploy(base: str, name: str, url: str, auth=GATEWAY_AUTH, **fields) -> int:
    body = json.dumps({"service": name, "image": "none", "url": url, **fields}).encode()
    response = await treq.post(base + "/system/functions", data=body, auth=auth)
    await response.content()
    return response.code


@pytest.fixture
def upstream():
    recorder = Recorder(lambda request: (200, {b"X-Fn": b"yes"}, b"fn-body:" + request.uri))
    port = listen_http(recorder)
    yield recorder, f"http://127.0.0.1:{port.getHost().port}"
    port.stopListening()


def test_help_lists_every_flag():
    result = run_twistd_sync("faas-gateway", ["--help"])
    assert result.returncode == 0
    for flag in [
        "--listen",
        "--redis",
        "--amqp",
        "--upstream-timeout",
        "--read-timeout",
        "--write-timeout",
        "--basic-auth",
        "--secret-mount-path",
        "--function-url-template",
        "--functions",
        "--max-body",
        "--max-async-body",
        "--callback-allow",
    ]:
        assert flag in result.stdout, flag


@pytest_twisted.ensureDeferred
async def test_sync_call_end_to_end(redis_url, upstream):
    recorder, url = upstream
    proc, base = await start_gateway(redis_url)
    try:
        assert await deploy(base, "echo", url) == 202
        response = await treq.post(
            base + "/function/echo/sub/path?x=1&y=2", data=b"payload", headers={"X-Call-Id": ["abc-1"]}
        )
        body = await response.content()
        assert response.code == 200
        assert body == b"fn-body:/sub/path?x=1&y=2"
        assert response.headers.getRawHeaders("X-Fn") == ["yes"]
        assert response.headers.getRawHeaders("X-Call-Id") == ["abc-1"]
        assert response.headers.getRawHeaders("X-Duration-Seconds")
        seen = recorder.requests[-1]
        assert seen["method"] == "POST"
        assert seen["body"] == b"payload"
        assert seen["headers"]["x-call-id"] == ["abc-1"]
        assert seen["headers"]["x-forwarded-for"] == ["127.0.0.1"]

        response = await treq.get(base + "/function/nope")
        assert (response.code, await response.text()) == (
            404,
            "function 'nope' not found in namespace 'openfaas-fn'\n",
        )

        # The record lives in Redis: a second gateway on the same prefix sees it.
        response = await treq.get(base + "/system/functions", auth=GATEWAY_AUTH)
        [fn] = json.loads(await response.content())
        assert fn["name"] == "echo"
        assert fn["url"] == url
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_unreachable_function_is_502_and_slow_one_504_with_upstream_aborted(redis_url):
    hanging = Recorder(never_answer)
    port = listen_http(hanging)
    proc, base = await start_gateway(redis_url, "--upstream-timeout", "1s", "--write-timeout", "5s")
    try:
        await deploy(base, "dead", f"http://127.0.0.1:{free_port()}")
        await deploy(base, "slow", f"http://127.0.0.1:{port.getHost().port}")
        response = await treq.get(base + "/function/dead")
        assert response.code == 502
        assert "'dead.openfaas-fn' unreachable" in await response.text()

        response = await treq.get(base + "/function/slow")
        assert response.code == 504
        assert await response.text() == "function 'slow.openfaas-fn' did not answer within 1s\n"
        # The gateway really closed its connection to the function.
        await wait_for(lambda: hanging.disconnected, timeout=5, what="upstream disconnect")
    finally:
        await proc.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_functions_file_and_basic_auth(redis_url, upstream, tmp_path):
    _recorder, url = upstream
    (tmp_path / "basic-auth-user").write_text("admin")
    (tmp_path / "basic-auth-password").write_text("pw")
    functions = tmp_path / "functions.json"
    functions.write_text(json.dumps([{"service": "preloaded", "image": "x", "url": url}]))
    proc, base = await start_gateway(
        redis_url,
        "--functions",
        str(functions),
        "--basic-auth",
        "true",
        "--secret-mount-path",
        str(tmp_path),
        env={},
    )
    try:
        response = await treq.get(base + "/system/functions")
        assert response.code == 401
        response = await treq.get(base + "/system/functions", auth=("admin", "wrong"))
        assert response.code == 401
        response = await treq.get(base + "/system/functions", auth=("admin", "pw"))
        assert response.code == 200
        assert [f["name"] for f in json.loads(await response.content())] == ["preloaded"]
        response = await treq.get(base + "/function/preloaded")
        assert response.code == 200  # function routes stay open
        response = await treq.get(base + "/metrics", auth=("admin", "pw"))
        assert "gateway_function_invocation_total" in await response.text()
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_body_limit_413_before_reading(redis_url, upstream):
    recorder, url = upstream
    proc, base = await start_gateway(redis_url, "--max-body", "1KiB")
    try:
        await deploy(base, "echo", url)
        response = await treq.post(base + "/function/echo", data=b"a" * 2048)
        assert response.code == 413
        response = await treq.post(base + "/function/echo", data=b"a" * 1000)
        assert response.code == 200
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_a_fresh_gateway_guards_system_with_a_generated_password(redis_url):
    """No flag, no credentials: /system/* and /metrics answer 401; the password is in a 0600 file
    whose path and faas-cli login line are logged (never the password), and a restart reuses it."""
    proc, base = await start_gateway(redis_url, env={})
    try:
        for path in ("/system/functions", "/system/info", "/metrics"):
            response = await treq.get(base + path)
            assert response.code == 401, path
            assert "<html" not in (await response.text()).lower()
        password_file = proc.state_dir / "basic-auth-password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        password = password_file.read_text()
        assert len(password) >= 32
        auth = ((proc.state_dir / "basic-auth-user").read_text(), password)
        response = await treq.get(base + "/system/functions", auth=auth)
        assert response.code == 200
        port = base.rsplit(":", 1)[1]
        output = proc.output()
        assert f"generated a password for user admin in {password_file} (mode 0600)" in output
        assert (
            f"faas-cli login --gateway http://127.0.0.1:{port} --username admin --password-stdin "
            f"< {password_file}" in output
        )
        assert password not in output
    finally:
        await proc.stop()

    again, base = await start_gateway(redis_url, env={"TXFAAS_STATE_DIR": str(proc.state_dir)})
    try:
        response = await treq.get(base + "/system/functions", auth=auth)
        assert response.code == 200
        assert "generated" not in again.output()
        assert "faas-cli login" in again.output()
    finally:
        await again.stop()


@pytest_twisted.ensureDeferred
async def test_basic_auth_false_opens_system_and_warns(redis_url):
    proc, base = await start_gateway(redis_url, "--basic-auth", "false", env={})
    try:
        response = await treq.get(base + "/system/functions")
        assert response.code == 200
        assert "basic auth is OFF (--basic-auth false)" in proc.output()
        assert not (proc.state_dir / "basic-auth-password").exists()
    finally:
        await proc.stop()


def _startup_error(args: list[str]) -> tuple[int, str]:
    result = run_twistd_sync("faas-gateway", args, timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_unreachable_redis_at_start_is_one_line_and_nonzero():
    code, output = _startup_error(
        [
            "--redis",
            f"redis://127.0.0.1:{free_port()}/0",
            "--amqp",
            "memory:",
            "--listen",
            f"tcp:{free_port()}",
        ]
    )
    assert code != 0
    assert "error: --redis redis://127.0.0.1:" in output
    assert "Traceback" not in output


def test_port_in_use_is_one_line_and_nonzero(redis_url):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, output = _startup_error(
            ["--redis", redis_url, "--amqp", "memory:", "--listen", f"tcp:{port}:interface=127.0.0.1"]
        )
    assert code != 0
    assert f"error: --listen tcp:{port}:interface=127.0.0.1: cannot listen" in output
    assert "Traceback" not in output


def test_bad_value_is_one_line_and_nonzero():
    code, output = _startup_error(["--upstream-timeout", "forever"])
    assert code != 0
    assert "--upstream-timeout: not a duration" in output
    assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_health_reports_redis_trouble(redis_url):
    proc, base = await start_gateway(redis_url)
    try:
        response = await treq.get(base + "/healthz")
        assert (response.code, await response.text()) == (200, "OK\n")
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_workers_share_the_port_and_metrics_add_up(redis_url, upstream):
    recorder, url = upstream
    port = free_port()
    prefix = _prefix()
    proc = TwistdProcess(
        "faas-gateway",
        ["--listen", f"tcp:{port}:interface=127.0.0.1", "--redis", redis_url, "--redis-prefix", prefix,
         "--workers", "2"],
        env=gateway_env(),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        await proc.wait_http(base + "/healthz", status=200)
        await wait_for(
            lambda: proc.output().count("gateway listening on") == 2,
            timeout=20,
            what="both processes listening",
        )
        await deploy(base, "echo", url)
        for _ in range(40):
            response = await treq.get(base + "/function/echo", persistent=False)
            assert response.code == 200
            await response.content()

        # /metrics of either process counts all 40 calls: its own at once, the other's once that
        # process applied them (every second).
        async def all_counted() -> bool:
            response = await treq.get(base + "/metrics", persistent=False, auth=GATEWAY_AUTH)
            text = await response.text()
            return (
                'gateway_function_invocation_total{code="200",function_name="echo.openfaas-fn"} 40.0' in text
            )

        await wait_for(all_counted, timeout=3, interval=0.2, what="40 calls in /metrics")
    finally:
        await proc.stop()
    assert proc.popen.returncode is not None
    # The child got SIGTERM from its parent and stopped too.
    await wait_for(
        lambda: proc.log_path.read_text().count("Server Shut Down.") == 2,
        timeout=10,
        what="both processes to stop",
    )


@pytest_twisted.ensureDeferred
async def test_async_body_limit_413_before_reading(redis_url, upstream):
    _recorder, url = upstream
    proc, base = await start_gateway(redis_url, "--max-async-body", "1KiB")
    try:
        await deploy(base, "echo", url)
        response = await treq.post(base + "/async-function/echo", data=b"a" * 2048)
        assert response.code == 413
        assert "over the limit of 1024 bytes" in await response.text()
        response = await treq.post(base + "/async-function/echo", data=b"a" * 1000)
        assert response.code == 202
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_worker_processes_die_with_a_killed_parent(redis_url):
    """--workers: the processes a parent started end when it is SIGKILLed (none is left holding the port)."""
    import os
    import signal

    port = free_port()
    proc = TwistdProcess(
        "faas-gateway",
        ["--listen", f"tcp:{port}:interface=127.0.0.1", "--redis", redis_url, "--redis-prefix",
         _prefix(), "--workers", "2"],
        env=gateway_env(),
    )  # fmt: skip
    await wait_for(
        lambda: proc.output().count("gateway listening on") == 2, timeout=20, what="both processes"
    )
    child = int(proc.output().split("started process 1 (pid ")[1].split(")")[0])
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait_exit()

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{child}/stat") as f:  # a zombie awaiting its reaper is gone too
            return f.read().split(") ")[1].startswith("Z")

    await wait_for(gone, timeout=15, what="the child to end with its parent")
    await proc.stop()


@pytest_twisted.ensureDeferred
async def test_no_route_answers_html(redis_url, upstream):
    """A real gateway, every path and method of the unit walk, with and without credentials."""
    from tests.unit.test_no_html import METHODS, PATHS, looks_like_html

    _recorder, url = upstream
    proc, base = await start_gateway(redis_url)
    try:
        await deploy(base, "echo", url)
        for auth in (GATEWAY_AUTH, None):
            for path in PATHS:
                for method in METHODS:
                    response = await treq.request(
                        method, base + path, auth=auth, data=b"{}", allow_redirects=False
                    )
                    body = await response.content()
                    where = f"{method} {path} -> {response.code}: {body[:120]!r}"
                    assert not looks_like_html(body), where
                    assert response.code < 500 or response.code == 501, where
    finally:
        await proc.stop()


PLUGINS = ("faas-gateway", "faas-worker", "faas-watchdog", "faas-local")


@pytest.mark.parametrize("plugin", PLUGINS)
def test_version_prints_txfaas_version(plugin):
    from txfaas import __version__

    result = run_twistd_sync(plugin, ["--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"txfaas {__version__} (Twisted "), result.stdout


@pytest.mark.parametrize(
    "plugin, args, problem",
    [
        ("faas-gateway", ["--max-body", "lots"], "--max-body: not a size"),
        ("faas-worker", ["--nope"], "option --nope not recognized"),
        ("faas-watchdog", ["--no-such-flag"], "option --no-such-flag not recognized"),
        ("faas-local", ["--basic-auth", "perhaps"], "--basic-auth: not true or false"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it(plugin, args, problem):
    result = run_twistd_sync(plugin, args)
    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip()
    assert output.splitlines() == [f"twistd {plugin}: {problem}" + output.split(problem, 1)[1]], output
    assert output.endswith(f"; see twistd {plugin} --help")
