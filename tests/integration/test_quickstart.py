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
import tempfile
import time

import pytest

from tests.support import ROOT, free_port

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


class Quickstart:
    def __init__(self, *args: str) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="txfaas-state-")  # not the user's
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
