"""Schemathesis against a real ``twistd faas-gateway`` (real Redis and RabbitMQ), from the packaged document.

Every operation of ``/system/openapi.json`` gets valid and invalid input, with basic auth.
Each answer must be: no 5xx, the status, content type, headers and body the document
gives, invalid input refused with a 4xx, a wrong password refused, and never an HTML page.
Bounded: ``FUZZ_EXAMPLES`` examples per operation and mode, each request within seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from importlib import resources
from typing import Any

import pytest
import pytest_twisted
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from twisted.internet import defer

from tests.conftest import require_service
from tests.support import TwistdProcess, delete_queues, delete_redis_prefix, free_port, unique

FUZZ_EXAMPLES = int(os.environ.get("TXFAAS_FUZZ_EXAMPLES", "25"))
USER, PASSWORD = "fuzz-admin", unique("pw")
REDIS = "redis://127.0.0.1:6379/0"

DOCUMENT = json.loads(resources.files("txfaas.gateway").joinpath("openapi.json").read_bytes())
schema = schemathesis.openapi.from_dict(DOCUMENT)
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=FUZZ_EXAMPLES,
)
schema.config.update(basic_auth=(USER, PASSWORD))

_HTML = re.compile(rb"^\s*<(!doctype\s+html|html|head|body|title)\b", re.IGNORECASE)


def no_html(ctx: Any, response: Any, case: Any) -> None:
    """No answer of the gateway's own is an HTML page (a proxied one is the function's business)."""
    content_type = response.headers.get("content-type", [""])[0].lower()
    if case.path.startswith("/function/") and response.headers.get("x-duration-seconds"):
        return  # the function's own answer, passed through
    assert "html" not in content_type, f"an HTML answer ({content_type}) to {case.method} {case.path}"
    assert not _HTML.match(response.content or b""), f"an HTML page in the body of {case.method} {case.path}"


def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    """No 5xx, but the proxy's documented 502 and 504: a function that is unreachable or too slow
    (a generated deploy has no real endpoint) is not the gateway failing."""
    if case.path.startswith("/function/") and response.status_code in (502, 504):
        return
    not_a_server_error(ctx, response, case)


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
    no_html,
]


def _block(coroutine: Any) -> Any:
    return pytest_twisted.blockon(defer.ensureDeferred(coroutine))


@pytest.fixture(scope="module")
def gateway():
    """A real gateway on its own Redis prefix, basic auth on, its functions' calls on a queue of its own.

    The fixture function ``nodeinfo`` (the document's example name) is a real watchdog
    running ``cat``; ``example-1`` is a queued call (no worker: it stays queued).
    """
    require_service("redis")
    require_service("rabbitmq")
    prefix = unique("fuzz") + ":"
    queue = unique("fuzz-queue")
    watchdog_port, port = free_port(), free_port()
    state = tempfile.mkdtemp(prefix="fuzz-state-")
    watchdog = TwistdProcess(
        "faas-watchdog",
        ["--listen", f"tcp:{watchdog_port}:interface=127.0.0.1", "--fprocess", "cat"],
    )
    proc = TwistdProcess(
        "faas-gateway",
        [
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--redis",
            REDIS,
            "--redis-prefix",
            prefix,
            "--basic-auth",
            "true",
            # What the gateway generates (the secrets key, say) goes here, not into $HOME.
            "--state-dir",
            state,
            # Generated functions' calls: refused at once, and never for long.
            "--function-url-template",
            "http://127.0.0.1:9",
            "--upstream-timeout",
            "3s",
        ],
        env={"TXFAAS_BASIC_AUTH_USER": USER, "TXFAAS_BASIC_AUTH_PASSWORD": PASSWORD},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _block(watchdog.wait_http(f"http://127.0.0.1:{watchdog_port}/_/health", status=200))
        _block(proc.wait_http(base + "/healthz", status=200))
        deployed = requests.post(
            base + "/system/functions",
            json={
                "service": "nodeinfo",
                "image": "none",
                "url": f"http://127.0.0.1:{watchdog_port}",
                "annotations": {"com.openfaas.queue": queue},
            },
            auth=(USER, PASSWORD),
            timeout=10,
        )
        assert deployed.status_code == 202, deployed.text
        queued = requests.post(
            base + "/async-function/nodeinfo", data=b"hi", headers={"X-Call-Id": "example-1"}, timeout=10
        )
        assert queued.status_code == 202, queued.text
        yield {"base": base, "queue": queue, "process": proc}
    finally:
        _block(proc.stop())
        _block(watchdog.stop())
        _block(delete_queues(queue))
        _block(delete_redis_prefix(REDIS, prefix))
        shutil.rmtree(state, ignore_errors=True)


def _keep_calls_on_our_queue(case: Any, queue: str) -> None:
    """A function the run deploys sends its async calls to this run's queue, never to the shared
    default one (which other tests' workers read)."""
    if case.path == "/system/functions" and case.method in ("POST", "PUT") and isinstance(case.body, dict):
        annotations = case.body.get("annotations")
        if annotations is None or isinstance(annotations, dict):
            case.body["annotations"] = {**(annotations or {}), "com.openfaas.queue": queue}


def _no_endless_streams(case: Any) -> None:
    """A log stream that follows lasts until its client leaves: the run reads logs without following."""
    if case.path == "/system/logs" and isinstance(case.query, dict) and "follow" in case.query:
        case.query["follow"] = "false"


@schema.parametrize()
@settings(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_every_operation_keeps_to_the_document(case, gateway):
    _keep_calls_on_our_queue(case, gateway["queue"])
    _no_endless_streams(case)
    case.call_and_validate(base_url=gateway["base"], timeout=15, checks=CHECKS)
