"""``/system/functions``, ``/system/function/{name}`` and ``/system/scale-function/{name}``."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from txfaas.gateway.answers import json, text
from txfaas.gateway.errors import HTTPError, no_function, no_namespace
from txfaas.gateway.metrics import GatewayMetrics
from txfaas.gateway.namespaces import Namespaces
from txfaas.gateway.settings import AppSettings
from txfaas.gateway.web import read_json
from txfaas.model import (
    QUEUE_ANNOTATION,
    FunctionSpec,
    ValidationError,
    check_name,
    check_namespace,
    function_ref,
    parse_scale_request,
)
from txfaas.queue import CallQueue, QueueRefused, QueueUnavailable
from txfaas.store import AlreadyExists, NotFound, StoreUnavailable, UnknownNamespace
from txfaas.store.cache import FunctionCache


def queue_of(spec: FunctionSpec, settings: AppSettings) -> str:
    """The queue of a function's async calls: its annotation's, else the gateway's default."""
    return spec.queue if QUEUE_ANNOTATION in spec.annotations else settings.default_queue


class FunctionsAPI:
    """Deploy, update, remove, list, read and scale functions (faas-provider's CRUD)."""

    log = Logger()

    def __init__(
        self,
        functions: FunctionCache,
        namespaces: Namespaces,
        queue: CallQueue | None,
        metrics: GatewayMetrics,
        settings: AppSettings,
    ) -> None:
        self._functions = functions
        self._store: Any = functions.store
        self._namespaces = namespaces
        self._queue = queue
        self._metrics = metrics
        self._settings = settings
        #: Queue name -> why it cannot be used (the broker refused it, or it is reserved): a
        #: function's record from before the rule.  Its async calls are 503; nothing else is.
        self.refused_queues: dict[str, str] = {}

    async def list(self, request: IRequest) -> bytes:
        """The functions of ``?namespace=`` (the default namespace without it), as OpenFaaS lists them."""
        namespace = await self._namespaces.known(self._namespaces.of(request))
        specs = await self._store.list_functions(namespace)
        counts = await self._store.invocation_counts([s.ref for s in specs])
        for spec in specs:
            self._metrics.service_count.labels(spec.ref).set(spec.replicas)
        return json(request, 200, [s.status_json(counts.get(s.ref, 0)) for s in specs])

    async def deploy(self, request: IRequest) -> bytes:
        spec = await self._checked_spec(request)
        try:
            builtin = spec.namespace in self._namespaces.builtin
            await self._store.create_function(spec, check_namespace=not builtin)
        except AlreadyExists:
            raise HTTPError(
                409,
                f"function {spec.service!r} already exists in namespace {spec.namespace!r}: use PUT to update it",
            ) from None
        except UnknownNamespace:  # deleted since we looked
            raise HTTPError(400, no_namespace(spec.namespace)) from None
        self._functions.forget(spec.ref)
        self.log.info("deployed function {function}", function=spec.ref)
        return text(request, 202, f"function {spec.service!r} deployed in namespace {spec.namespace!r}")

    async def update(self, request: IRequest) -> bytes:
        spec = await self._checked_spec(request)
        try:
            await self._store.update_function(spec)
        except NotFound:
            raise HTTPError(404, no_function(spec.service, spec.namespace)) from None
        self._functions.forget(spec.ref)
        self.log.info("updated function {function}", function=spec.ref)
        return text(request, 202, f"function {spec.service!r} updated in namespace {spec.namespace!r}")

    async def remove(self, request: IRequest) -> bytes:
        """``{"functionName": name, "namespace": ns}`` (faas-provider's DeleteFunctionRequest)."""
        data = read_json(request)
        if not isinstance(data, dict) or "functionName" not in data:
            raise ValidationError("functionName", "missing")
        name = check_name(data["functionName"], "functionName")
        namespace = data.get("namespace")
        if namespace is None or namespace == "":  # not any false value: {} or 0 is a mistake
            namespace = self._settings.default_namespace
        if not isinstance(namespace, str):
            raise ValidationError("namespace", "must be a string")
        check_namespace(namespace)
        try:
            await self._store.delete_function(name, namespace)
        except NotFound:
            raise HTTPError(404, no_function(name, namespace)) from None
        ref = function_ref(name, namespace)
        self._functions.forget(ref)
        try:
            await self._store.delete_logs(name, namespace)
        except StoreUnavailable as e:
            self.log.warn("function {function} removed, but not its log: {error}", function=ref, error=e)
        self.log.info("removed function {function}", function=ref)
        return text(request, 202, f"function {name!r} removed from namespace {namespace!r}")

    async def status(self, request: IRequest, name: str) -> bytes:
        check_name(name, "name")
        namespace = self._namespaces.of(request)
        spec = await self._store.get_function(name, namespace)
        if spec is None:
            raise HTTPError(404, no_function(name, namespace))
        counts = await self._store.invocation_counts([spec.ref])
        return json(request, 200, spec.status_json(counts.get(spec.ref, 0)))

    async def scale(self, request: IRequest, name: str) -> bytes:
        """``{"serviceName", "namespace", "replicas"}`` (faas-provider's ScaleServiceRequest)."""
        check_name(name, "name")
        namespace, replicas = parse_scale_request(read_json(request), name, self._settings.default_namespace)
        try:
            await self._store.scale_function(name, replicas, namespace)
        except NotFound:
            raise HTTPError(404, no_function(name, namespace)) from None
        ref = function_ref(name, namespace)
        self._functions.forget(ref)
        self._metrics.service_count.labels(ref).set(replicas)
        return text(request, 202, f"function {name!r} in namespace {namespace!r} scaled to {replicas}")

    async def _checked_spec(self, request: IRequest) -> FunctionSpec:
        """The body's function, its namespace, secrets and queue checked (the queue declared)."""
        spec = FunctionSpec.from_json(read_json(request), default_namespace=self._settings.default_namespace)
        if spec.env_process and spec.url is None:
            # faas-cli deploy --fprocess: nothing here runs processes yet, so the call would 502.
            raise HTTPError(
                400,
                f"envProcess {spec.env_process!r}: txfaas does not run function processes yet, so "
                f"{spec.service!r} would have no endpoint; give its address as annotation txfaas.url",
            )
        await self._namespaces.known(spec.namespace)
        await self._check_secrets(spec)
        await self._declare_queue(spec)
        return spec

    async def _check_secrets(self, spec: FunctionSpec) -> None:
        """A function may only name secrets that exist in its namespace (400 otherwise, as OpenFaaS)."""
        if not spec.secrets:
            return
        namespace = spec.namespace
        missing = await self._store.missing_secrets(namespace, spec.secrets)
        if missing:
            names = ", ".join(repr(name) for name in missing)
            raise HTTPError(
                400,
                f"secrets: {names} not found in namespace {namespace!r} "
                "(create with: faas-cli secret create NAME)",
            )

    async def _declare_queue(self, spec: FunctionSpec) -> None:
        """Check a function's named queue and declare it: a reserved name, or one the broker
        refuses, is a 400; a broker that is down does not block the deploy (the queue is
        remembered and declared as soon as the broker is back)."""
        self._settings.reserved_queues.check(spec.queue)
        queue = queue_of(spec, self._settings)
        if self._queue is None or queue == self._settings.default_queue:
            return
        try:
            await self._queue.declare(queue)
        except QueueRefused as e:
            raise ValidationError(f"annotations.{QUEUE_ANNOTATION}", f"the broker refused it: {e}") from None
        except QueueUnavailable as e:
            self.log.warn(
                "queue {queue} of {function} not declared yet (it will be on reconnection): {error}",
                queue=queue,
                function=spec.ref,
                error=e,
            )
            return
        self.refused_queues.pop(spec.queue, None)
