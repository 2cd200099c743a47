"""The README's run command: it starts the whole system, and the curl commands it prints work.

Runs ``scripts/run`` as a user would (durable mode when RabbitMQ and Redis answer, and
``--local`` for the in-memory mode), runs each printed ``curl`` command, checks the
answers, then presses Ctrl-C (SIGINT) and checks that everything it started is gone.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import time

import pytest

from tests.support import ROOT, _fresh_state_dir, free_port, missing


@pytest.fixture(autouse=True)
def curl() -> None:
    """The printed commands are curl commands (under CI=true, a missing curl fails the test)."""
    if shutil.which("curl") is None:
        missing("curl is not installed")


class Quickstart:
    def __init__(self, *args: str) -> None:
        self.state_dir = _fresh_state_dir()  # not the user's
        self.proc = subprocess.Popen(
            [str(ROOT / "scripts" / "run"), "--port", str(free_port()), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, "TXFAAS_STATE_DIR": self.state_dir},
        )
        self.output = ""

    def read_until(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None:
                self.output += self.proc.stdout.read().decode(errors="replace")
                raise AssertionError(f"scripts/run exited with {self.proc.returncode}:\n{self.output}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                self.output += chunk.decode(errors="replace")
        return self.output

    def commands(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("curl ")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C in its terminal
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError("scripts/run did not stop on Ctrl-C within 30s") from None


def run(command: str) -> str:
    return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30, check=True).stdout


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def check_quickstart(qs: Quickstart) -> None:
    qs.read_until("Ctrl-C stops everything.", timeout=180)
    commands = qs.commands()
    assert len(commands) == 7, commands
    sync_echo, sync_wc, async_call, status, result, slow, functions = commands

    assert run(sync_echo) == "hello txfaas"
    assert json.loads(run(sync_wc))["words"] == 3

    answer = run(async_call)
    assert answer.startswith("HTTP/1.1 202")
    call_id = re.search(r"X-Call-Id: (\S+)", answer).group(1)
    assert call_id in status

    # The worker records the outcome before it calls back: once the callback is printed,
    # the status and the result are there.
    qs.read_until(f"[callback] call {call_id} of wordcount.openfaas-fn: status 200", timeout=30)
    record = json.loads(run(status))
    assert record["status"] == "succeeded", record
    assert json.loads(run(result))["words"] == 2

    assert run(slow).startswith("HTTP/1.1 504")
    names = sorted(f["name"] for f in json.loads(run(functions)))
    assert names == ["echo", "slow", "wordcount"]

    # Basic auth is on: the printed commands carry it, the login line names the generated file.
    password_file = os.path.join(qs.state_dir, "basic-auth-password")
    assert f'-u "admin:$(cat {password_file})"' in functions
    assert (
        run(functions.replace(f' -u "admin:$(cat {password_file})"', "") + " -o /dev/null -w %{http_code}")
        == "401"
    )
    gateway = functions.split()[-1].rsplit("/system", 1)[0]
    assert (
        f"faas-cli login --gateway {gateway} --username admin --password-stdin < {password_file}" in qs.output
    )


@pytest.mark.parametrize("mode", ["durable", "local"])
def test_readme_run_command_works_as_printed(mode, request):
    if mode == "durable":
        # The durable mode needs the real services (fixtures fail under CI=true when they are missing).
        request.getfixturevalue("redis_url")
        request.getfixturevalue("amqp_url")
    qs = Quickstart(*(["--local"] if mode == "local" else []))
    try:
        check_quickstart(qs)
        if mode == "durable":
            assert "calls are durable" in qs.output
        else:
            assert "NOTHING IS DURABLE" in qs.output
    finally:
        qs.stop()
    assert qs.proc.returncode == 0, qs.output
    # scripts/run waits for what it started before it exits.
    assert not group_alive(qs.proc.pid), "processes of scripts/run survived Ctrl-C"


def _quickstart_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "scripts" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _queue_exists(name: str, exchange: bool = False) -> bool:
    import pika

    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    try:
        channel = connection.channel()
        try:
            if exchange:
                channel.exchange_declare(name, passive=True)
            else:
                channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 404, e
            return False
        return True
    finally:
        if connection.is_open:
            connection.close()


def _commands_of_group(pgid: int) -> list[str]:
    commands = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) != pgid:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    commands.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
    return commands


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_run_uses_names_of_its_own_and_removes_them_when_it_stops(stop, redis_url, amqp_url):
    """On a shared broker and Redis, scripts/run takes no production call and leaves nothing behind."""
    quickstart = _quickstart_module()
    qs = Quickstart()
    try:
        check_quickstart(qs)  # functions deployed, an async call queued, run, recorded, called back
        base = re.search(r"Redis keys (txfaas-run-[0-9a-f]{6}):\*", qs.output).group(1)
        names = quickstart.RunNames(base)
        # Its own names while it runs, never production's.
        commands = _commands_of_group(qs.proc.pid)
        [worker] = [c for c in commands if "faas-worker" in c]
        assert f"--queue {base} " in worker and f"--redis-prefix {base}: " in worker
        assert f"--dead-letter-queue {base}.dead-letter" in worker
        [gateway] = [c for c in commands if "faas-gateway" in c]
        assert f"--default-queue {base} " in gateway and f"--redis-prefix {base}: " in gateway
        redis = quickstart.Redis()
        try:
            assert any(k.startswith(f"{base}:") for k in redis.keys(f"{base}:"))
        finally:
            redis.close()
        assert _queue_exists(base) and _queue_exists(f"{base}.callbacks")
    finally:
        if stop == "sigterm" and qs.proc.poll() is None:
            os.kill(qs.proc.pid, signal.SIGTERM)
            qs.proc.wait(60)
        qs.stop()
    assert qs.proc.returncode == 0
    output = qs.output + qs.proc.stdout.read().decode(errors="replace")
    assert "removed " in output and f"({base}*)" in output, output[-2000:]
    redis = quickstart.Redis()
    try:
        assert redis.keys(f"{base}:") == []
    finally:
        redis.close()
    assert [q for q in names.queues if _queue_exists(q)] == []
    assert not _queue_exists(names.topology.retry_exchange, exchange=True)
    assert not group_alive(qs.proc.pid)


def test_setup_env_shows_its_progress():
    """The first run's install (a minute or more) says what pip is doing, one line a step."""
    marker = ROOT / ".venv" / ".txfaas-installed"
    if not marker.exists() or marker.read_text().strip() == "editable":
        pytest.skip("no wheel install of setup-env to redo here")
    saved = marker.read_text()
    marker.write_text("stale\n")  # as after a change of the source: setup-env installs again
    try:
        result = subprocess.run(
            [str(ROOT / "scripts" / "setup-env")], capture_output=True, text=True, timeout=900, cwd=ROOT
        )
    finally:
        if marker.read_text() == "stale\n":
            marker.write_text(saved)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("setup: installing txfaas and its dependencies"), lines
    steps = [line for line in lines if line.startswith("setup:   ")]
    assert any("Successfully installed" in line and "txfaas" in line for line in steps), lines
    assert all(len(line) <= 120 for line in steps)
    assert lines[-1] == "setup: done"
