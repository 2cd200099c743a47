"""The gateway as a Twisted service: start-up order, readiness, and clean shutdown.

Start-up: the queue starts connecting (in the background: a broker that is down
means 503 on async posts, not a gateway that refuses to start); Redis must answer
(else one line and exit 1), and hold secrets sealed with this key, if any; functions from ``--functions`` are loaded; named
queues are declared; only then does the HTTP listener open.  Shutdown closes the
listener first, then flushes counters and the invocation log, and closes the clients.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from txfaas.invocation_log import InvocationLog
from txfaas.model import (
    DEFAULT_NAMESPACE,
    DEFAULT_QUEUE,
    FunctionSpec,
    Namespace,
    ReservedQueues,
    ValidationError,
)
from txfaas.queue import CallQueue, QueueRefused, QueueUnavailable
from txfaas.secrets import SecretBox
from txfaas.service import StartupError, listen, run_startup
from txfaas.store import AlreadyExists, StoreUnavailable
from txfaas.store.cache import FunctionCache


def load_functions_file(
    path: str, reserved: ReservedQueues | None = None, default_namespace: str = DEFAULT_NAMESPACE
) -> list[FunctionSpec]:
    """A JSON list of FunctionDeployment objects (or ``{"functions": [...]}``)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise StartupError(f"--functions {path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise StartupError(f"--functions {path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        data = data.get("functions")
    if not isinstance(data, list):
        raise StartupError(f"--functions {path}: expected a JSON list of functions")
    specs = []
    for i, item in enumerate(data):
        try:
            spec = FunctionSpec.from_json(item, default_namespace=default_namespace)
            (reserved or ReservedQueues()).check(spec.queue)
            specs.append(spec)
        except ValidationError as e:
            raise StartupError(f"--functions {path}: function #{i + 1}: {e}") from None
    return specs


class GatewayService(service.Service):
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        site: Any,
        listen_on: str,
        functions: FunctionCache,
        queue: CallQueue | None,
        *,
        functions_file: str | None = None,
        redis_description: str = "redis",
        secret_box: SecretBox | None = None,
        secrets_key_path: str | None = None,
        invocations: InvocationLog | None = None,
        close: Callable[[], Any] | None = None,
        listen: Callable[..., Any] = listen,
        reserved_queues: ReservedQueues | None = None,
        refused_queues: dict[str, str] | None = None,
        default_namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self.reserved_queues = reserved_queues or ReservedQueues()
        #: Filled at start (the app's ``refused_queues``: it answers 503 for them).
        self.refused_queues = refused_queues if refused_queues is not None else {}
        self.reactor = reactor
        self.default_namespace = default_namespace
        self.site = site
        self.listen_on = listen_on
        self.functions = functions
        self.queue = queue
        self.functions_file = functions_file
        self.redis_description = redis_description
        self.secret_box = secret_box
        self.secrets_key_path = secrets_key_path
        self.invocations = invocations
        self._close = close
        self._listen = listen
        #: fires once the gateway listens (or never, if start-up failed)
        self.started: defer.Deferred[None] = defer.Deferred()
        self._port: Any = None
        self._queue_started = False

    def startService(self) -> None:
        super().startService()
        run_startup(self.reactor, self._start).addCallback(self.started.callback)

    async def _start(self) -> None:
        store: Any = self.functions.store  # the whole store: functions, namespaces, secrets
        if self.queue is not None:
            await self.queue.start()
            self._queue_started = True
        try:
            await store.ping()
        except StoreUnavailable as e:
            raise StartupError(f"--redis {self.redis_description}: {e}") from None
        if self.secret_box is not None:
            kept = await store.secrets_key_check(None)
            if kept is not None and not self.secret_box.opens(kept):
                raise StartupError(
                    f"--secrets-key {self.secrets_key_path}: not the key that sealed the secrets in "
                    f"{self.redis_description}; start with that key file"
                )
        if self.functions_file:
            for spec in load_functions_file(
                self.functions_file, self.reserved_queues, self.default_namespace
            ):
                if spec.namespace not in {DEFAULT_NAMESPACE, self.default_namespace}:
                    try:  # the file's namespaces are created as needed
                        await store.create_namespace(Namespace(spec.namespace))
                    except AlreadyExists:
                        pass
                try:
                    await self.functions.store.create_function(spec)
                except AlreadyExists:
                    await self.functions.store.update_function(spec)
                self.log.info(
                    "loaded function {function} from {path}", function=spec.ref, path=self.functions_file
                )
        if self.queue is not None:
            specs = await self.functions.store.list_functions()
            for name in sorted({spec.queue for spec in specs} - {DEFAULT_QUEUE}):
                await self._declare(name, [spec.service for spec in specs if spec.queue == name])
        self.functions.start()
        self._port = await self._listen(self.reactor, self.listen_on, self.site)
        self.log.info("gateway listening on {address}", address=self._port.getHost())

    async def _declare(self, name: str, functions: list[str]) -> None:
        """Declare one function queue.  One that is reserved (a record from before the rule) or
        that the broker refuses is not fatal: its functions' async calls get 503 with the
        reason, every other function works."""
        reason = self.reserved_queues.refusal(name)
        if reason is None:
            assert self.queue is not None
            try:
                await self.queue.declare(name)
                return
            except QueueRefused as e:
                reason = str(e)
            except QueueUnavailable as e:
                self.log.warn(
                    "queue {queue} not declared yet (it will be on reconnection): {error}",
                    queue=name,
                    error=e,
                )
                return
        self.refused_queues[name] = reason
        self.log.error(
            "asynchronous calls to {functions} refused (503): {reason}; redeploy with another queue",
            functions=", ".join(functions),
            reason=reason,
        )

    async def _stop(self) -> None:
        if self._port is not None:
            await self._port.stopListening()
        await self.functions.stop()
        if self.invocations is not None:
            await self.invocations.stop()
        if self.queue is not None and self._queue_started:
            await self.queue.close()
        if self._close is not None:
            await defer.maybeDeferred(self._close)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        d = defer.Deferred.fromCoroutine(self._stop())
        d.addErrback(lambda f: self.log.failure("error while stopping the gateway", f))
        return d
