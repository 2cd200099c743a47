"""The gateway's Klein app: the ``/system/*`` route table, ``/healthz``, ``/metrics``, and errors.

Each route hands its request to the object that does that job (functions, namespaces,
secrets, logs, calls); their state comes in through ``__init__``.  Exceptions become
answers in one place: :class:`~txfaas.gateway.errors.ErrorTable`, which the direct
``/async-function/`` route (:mod:`txfaas.gateway.accept`) uses too.
"""

from __future__ import annotations

import platform
from importlib import resources as package_files
from typing import Any

import werkzeug.exceptions
from cryptography.fernet import Fernet
from klein import Klein
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from txfaas import __version__
from txfaas.gateway.accept import Acceptor, AsyncCalls
from txfaas.gateway.answers import json, text
from txfaas.gateway.calls import CallsAPI
from txfaas.gateway.errors import KNOWN, ErrorTable, HTTPError
from txfaas.gateway.functions import FunctionsAPI
from txfaas.gateway.log_routes import LogsAPI
from txfaas.gateway.metrics import GatewayMetrics
from txfaas.gateway.namespaces import Namespaces, NamespacesAPI
from txfaas.gateway.secret_routes import SecretsAPI
from txfaas.gateway.settings import AppSettings
from txfaas.gateway.web import SYSTEM_BODY_LIMIT, method_of, path_of
from txfaas.queue import CallQueue, QueueUnavailable
from txfaas.secrets import SecretBox
from txfaas.store import AsyncCallStore, StoreUnavailable
from txfaas.store.cache import FunctionCache

__all__ = ["SYSTEM_BODY_LIMIT", "AppSettings", "GatewayApp", "HTTPError"]

#: This gateway's OpenAPI document (packaged beside this module), served as it is.
OPENAPI_DOCUMENT = package_files.files(__package__).joinpath("openapi.json").read_bytes()
_ALL_CRUD = ["GET", "POST", "PUT", "DELETE"]
_OTHER_METHODS = ["PATCH", "OPTIONS", "HEAD"]


class GatewayApp:
    """Everything but ``/function/`` and ``/async-function/``, routed by Klein."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        functions: FunctionCache,
        calls: AsyncCallStore,
        queue: CallQueue | None,
        resolver: Any,
        metrics: GatewayMetrics,
        settings: AppSettings | None = None,
        clock: Any = None,
        secret_box: SecretBox | None = None,
    ) -> None:
        settings = settings or AppSettings()
        store = functions.store
        self._store = store
        self._queue = queue
        self._metrics = metrics
        self._settings = settings
        # Without a key of its own (tests, an embedded app) a key that lives as long as the process.
        box = secret_box if secret_box is not None else SecretBox(Fernet.generate_key())
        self.errors = ErrorTable(settings.retry_after)
        namespaces = Namespaces(store, settings.default_namespace)
        self.functions = FunctionsAPI(functions, namespaces, queue, metrics, settings)
        #: The shared dict of queues whose async calls are 503 (filled by the service at start).
        self.refused_queues = self.functions.refused_queues
        self.namespaces = NamespacesAPI(namespaces)
        self.secrets = SecretsAPI(store, namespaces, box)
        self.logs = LogsAPI(store, namespaces, settings, clock)
        self.calls = CallsAPI(calls, queue, namespaces, settings, clock)
        acceptor = Acceptor(functions, calls, queue, resolver, settings, clock, self.refused_queues)
        self._async_calls = AsyncCalls(acceptor, functions, metrics, self.errors, settings.default_namespace)

    def resource(self) -> IResource:
        return self.app.resource()

    def accept_resource(self) -> IResource:
        """``/async-function/{name}[/{path}]``: a plain resource, not a Klein route (the hot path)."""
        return self._async_calls

    # --- errors: the table's, then Klein's own -----------------------------------------------

    @app.handle_errors(*KNOWN)
    def _known(self, request: IRequest, failure: Failure) -> bytes:
        return self.errors.answer(request, failure.value)

    @app.handle_errors(defer.CancelledError)
    def _cancelled(self, request: IRequest, failure: Failure) -> bytes:
        return b""  # the client went away

    @app.handle_errors(werkzeug.exceptions.NotFound)
    def _no_route(self, request: IRequest, failure: Failure) -> bytes:
        return text(request, 404, f"no route {method_of(request)} {path_of(request)}")

    @app.handle_errors(werkzeug.exceptions.MethodNotAllowed)
    def _wrong_method(self, request: IRequest, failure: Failure) -> bytes:
        allowed = ", ".join(sorted(failure.value.valid_methods or ()))
        request.setHeader(b"Allow", allowed.encode())
        return text(
            request, 405, f"method {method_of(request)} not allowed on {path_of(request)}: use {allowed}"
        )

    @app.handle_errors(werkzeug.exceptions.HTTPException)
    def _routing(self, request: IRequest, failure: Failure) -> bytes:
        """Werkzeug's other answers (a redirect to the slash-ended path, ...), without its HTML."""
        error = failure.value
        for name, value in error.get_response({}).headers.items():
            if name.lower() not in ("content-type", "content-length"):
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        return text(request, error.code or 500, f"{error.name}: {path_of(request)}")

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("{method} {uri} failed", failure, method=method_of(request), uri=request.uri)
        return text(request, 500, "internal error")

    # --- OpenFaaS routes txfaas does not implement -------------------------------------------

    @app.route("/system/alert")
    def alert(self, request: IRequest) -> bytes:
        return text(request, 501, "not implemented: alert-driven autoscaling (AlertManager's /system/alert)")

    @app.route("/")
    @app.route("/ui/", branch=True)
    def ui(self, request: IRequest) -> bytes:
        return text(
            request, 501, "not implemented: the OpenFaaS web UI (/ui/); use faas-cli or the /system API"
        )

    # --- health, metrics, about --------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self, request: IRequest) -> bytes:
        problems = []
        try:
            await self._store.ping()
        except StoreUnavailable as e:
            problems.append(f"redis: {e}")
        if self._queue is not None:
            try:
                await self._queue.ping()
            except QueueUnavailable as e:
                problems.append(f"rabbitmq: {e}")
        if problems:
            return text(request, 503, "unhealthy: " + "; ".join(problems))
        return text(request, 200, "OK")

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self._metrics.render()

    @app.route("/system/info", methods=["GET"])
    def info(self, request: IRequest) -> bytes:
        s = self._settings
        release = __version__
        provider = {
            "provider": s.provider,
            "orchestration": s.orchestration,
            "version": {"sha": "", "release": release},
        }
        version = {"commit_message": "", "sha": "", "release": release}
        return json(request, 200, {"provider": provider, "version": version, "arch": _arch()})

    @app.route("/system/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        return OPENAPI_DOCUMENT

    # --- functions ---------------------------------------------------------------------------

    @app.route("/system/functions", methods=["GET"])
    def list_functions(self, request: IRequest) -> Any:
        return self.functions.list(request)

    @app.route("/system/functions", methods=["POST"])
    def deploy(self, request: IRequest) -> Any:
        return self.functions.deploy(request)

    @app.route("/system/functions", methods=["PUT"])
    def update(self, request: IRequest) -> Any:
        return self.functions.update(request)

    @app.route("/system/functions", methods=["DELETE"])
    def remove(self, request: IRequest) -> Any:
        return self.functions.remove(request)

    @app.route("/system/functions", methods=_OTHER_METHODS)
    def functions_other(self, request: IRequest) -> bytes:
        return _not_allowed(request, "/system/functions", _ALL_CRUD)

    @app.route("/system/function/<name>", methods=["GET"])
    def function_status(self, request: IRequest, name: str) -> Any:
        return self.functions.status(request, name)

    @app.route("/system/scale-function/<name>", methods=["POST"])
    def scale(self, request: IRequest, name: str) -> Any:
        return self.functions.scale(request, name)

    # --- namespaces --------------------------------------------------------------------------

    @app.route("/system/namespaces", methods=["GET"])
    def list_namespaces(self, request: IRequest) -> Any:
        return self.namespaces.list(request)

    @app.route("/system/namespace/", methods=["POST"])
    def create_namespace(self, request: IRequest) -> Any:
        return self.namespaces.create(request, None)

    @app.route("/system/namespace/<name>", methods=["POST"])
    def create_named_namespace(self, request: IRequest, name: str) -> Any:
        return self.namespaces.create(request, name)

    @app.route("/system/namespace/<name>", methods=["GET"])
    def get_namespace(self, request: IRequest, name: str) -> Any:
        return self.namespaces.get(request, name)

    @app.route("/system/namespace/<name>", methods=["PUT"])
    def update_namespace(self, request: IRequest, name: str) -> Any:
        return self.namespaces.update(request, name)

    @app.route("/system/namespace/<name>", methods=["DELETE"])
    def delete_namespace(self, request: IRequest, name: str) -> Any:
        return self.namespaces.delete(request, name)

    # --- secrets and logs --------------------------------------------------------------------

    @app.route("/system/secrets", methods=["GET"])
    def list_secrets(self, request: IRequest) -> Any:
        return self.secrets.list(request)

    @app.route("/system/secrets", methods=["POST"])
    def create_secret(self, request: IRequest) -> Any:
        return self.secrets.create(request)

    @app.route("/system/secrets", methods=["PUT"])
    def update_secret(self, request: IRequest) -> Any:
        return self.secrets.update(request)

    @app.route("/system/secrets", methods=["DELETE"])
    def remove_secret(self, request: IRequest) -> Any:
        return self.secrets.remove(request)

    @app.route("/system/secrets", methods=_OTHER_METHODS)
    def secrets_other(self, request: IRequest) -> bytes:
        return _not_allowed(request, "/system/secrets", _ALL_CRUD)

    @app.route("/system/logs", methods=["GET"])
    def read_logs(self, request: IRequest) -> Any:
        return self.logs.logs(request)

    @app.route("/system/logs", methods=["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    def logs_other(self, request: IRequest) -> bytes:
        return _not_allowed(request, "/system/logs", ["GET"])

    # --- calls and dead letters --------------------------------------------------------------

    @app.route("/system/calls/<call_id>", methods=["GET"])
    def call_status(self, request: IRequest, call_id: str) -> Any:
        return self.calls.status(request, call_id)

    @app.route("/system/calls/<call_id>", methods=["DELETE"])
    def cancel_call(self, request: IRequest, call_id: str) -> Any:
        return self.calls.cancel(request, call_id)

    @app.route("/system/calls/<call_id>/result", methods=["GET"])
    def call_result(self, request: IRequest, call_id: str) -> Any:
        return self.calls.result(request, call_id)

    @app.route("/system/calls/<call_id>/retry", methods=["POST"])
    def retry_call(self, request: IRequest, call_id: str) -> Any:
        return self.calls.retry(request, call_id)

    @app.route("/system/dead-letters", methods=["GET"])
    def dead_letters(self, request: IRequest) -> Any:
        return self.calls.dead_letters(request)

    @app.route("/system/dead-letters/<call_id>", methods=["GET"])
    def dead_letter(self, request: IRequest, call_id: str) -> Any:
        return self.calls.dead_letter(request, call_id)

    @app.route("/system/dead-letters/<call_id>", methods=["DELETE"])
    def discard_dead_letter(self, request: IRequest, call_id: str) -> Any:
        return self.calls.discard_dead_letter(request, call_id)


def _not_allowed(request: IRequest, path: str, methods: list[str]) -> bytes:
    """405 for a method a path has no route for, with the methods it has."""
    request.setHeader(b"Allow", ", ".join(methods).encode())
    if len(methods) == 1:
        use = methods[0]
    else:
        use = ", ".join(methods[:-1]) + " or " + methods[-1]
    return text(request, 405, f"method not allowed on {path}: use {use}")


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
