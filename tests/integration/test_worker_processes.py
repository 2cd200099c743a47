"""``faas-worker --processes N``: N consuming processes under one supervisor, real broker and Redis."""

from __future__ import annotations

import os
import signal

import pytest_twisted
import treq

from tests.integration.test_worker import Env
from tests.support import Recorder, wait_for


@pytest_twisted.ensureDeferred
async def test_processes_share_the_work_are_restarted_and_metrics_add_up(amqp_url, redis_url):
    env = await Env(amqp_url, redis_url).open()
    try:
        # A function slow enough that both processes must take calls at once.
        seen_pids: set[str] = set()

        def respond(request):
            from twisted.internet import reactor, task

            return task.deferLater(reactor, 0.3, lambda: (200, {}, b"ok"))

        function = Recorder(respond)
        callbacks = Recorder(lambda request: (204, {}, b""))
        name = await env.deploy(function)
        hook = env.serve(callbacks) + "/hook"
        supervisor, base = await env.start_worker("--processes", "2", "--max-inflight", "2", wait=False)
        await wait_for(
            lambda: supervisor.output().count("connected to the AMQP broker") >= 2,
            timeout=30,
            what="two worker processes connected",
        )
        response = await treq.get(base + "/healthz")
        assert (response.code, await response.text()) == (200, "OK\n")

        calls = [await env.enqueue(name, hook) for _ in range(8)]
        await wait_for(lambda: len(callbacks.requests) >= len(calls), timeout=30, what="all callbacks")
        # 8 calls of 0.3 s, 2 in flight per process: two processes finish in about 0.6 s, one would need 1.2 s.
        started = sorted(r["time"] for r in function.requests)
        assert started[3] - started[0] < 0.3, started
        seen_pids.update(
            line.split("pid ")[1].rstrip(")")
            for line in supervisor.output().splitlines()
            if "started process" in line
        )
        assert len(seen_pids) == 2

        response = await treq.get(base + "/metrics")
        text = await response.text()
        assert f'txfaas_worker_calls_total{{function="{name}.openfaas-fn",status="succeeded"}} 8.0' in text, (
            text
        )

        # A worker process that dies is restarted, and /healthz says so meanwhile.
        os.kill(int(sorted(seen_pids)[0]), signal.SIGKILL)
        await wait_for(lambda: "restarting it" in supervisor.output(), timeout=10, what="the restart notice")
        await wait_for(
            lambda: supervisor.output().count("started process") == 3, timeout=10, what="a restart"
        )
        # The new process serves before it is stopped: one SIGTERM'd while still starting
        # dies before its reactor runs and never logs its shutdown.
        await wait_for(
            lambda: supervisor.output().count("connected to the AMQP broker") >= 3,
            timeout=30,
            what="the restarted process connected",
        )
    finally:
        await env.close()
    # The supervisor stopped its processes when it stopped.
    assert supervisor.log_path.read_text().count("Server Shut Down.") >= 3
