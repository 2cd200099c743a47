"""In-process store: for unit tests and the single-process mode (nothing is durable)."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any

import attrs
from twisted.application.service import Service

from txfaas.logs import LogEntry, stream_id
from txfaas.model import (
    DEFAULT_NAMESPACE,
    CallRecord,
    CallResult,
    CallStatus,
    DeadLetter,
    FunctionSpec,
    Namespace,
    ref_key,
    store_key,
)
from txfaas.store import (
    AlreadyExists,
    LogLine,
    NamespaceNotEmpty,
    NotFound,
    StoreUnavailable,
    UnknownNamespace,
)


class MemoryStore(Service):
    """Implements ``FunctionStore``, ``NamespaceStore``, ``CallStore``, ``DeadLetterStore``,
    ``SecretStore`` and ``LogStore``; a service with nothing to start or stop, so a process
    tree holds it as it would a Redis store.

    Set ``available = False`` to make every call raise :class:`StoreUnavailable`,
    as an unreachable Redis would.  TTLs are not enforced.  Claims lapse on ``clock``
    (wall time without one).
    """

    def __init__(self, clock: Any = None) -> None:
        self.clock = clock
        self.functions: dict[str, FunctionSpec] = {}  # by store_key
        self.namespaces: dict[str, Namespace] = {}
        self.invocations: dict[str, int] = {}  # by store_key
        self.calls: dict[str, CallRecord] = {}
        self.results: dict[str, CallResult] = {}
        self.dead_letters: dict[str, DeadLetter] = {}
        self.secrets: dict[tuple[str, str], bytes] = {}  # (namespace, name) -> sealed token
        self.secrets_check: bytes | None = None
        self.logs: dict[tuple[str, str], list[LogEntry]] = {}  # (namespace, name) -> lines
        self._last_log_id = (0, 0)
        self.available = True

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("memory store marked unavailable")

    async def ping(self) -> None:
        self._check()

    async def list_functions(self, namespace: str | None = None) -> list[FunctionSpec]:
        self._check()
        specs = [self.functions[key] for key in sorted(self.functions)]
        return specs if namespace is None else [s for s in specs if s.namespace == namespace]

    async def get_function(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> FunctionSpec | None:
        self._check()
        return self.functions.get(store_key(name, namespace))

    async def create_function(self, spec: FunctionSpec, *, check_namespace: bool = False) -> None:
        self._check()
        if check_namespace and spec.namespace not in self.namespaces:
            raise UnknownNamespace(spec.namespace)
        if spec.key in self.functions:
            raise AlreadyExists(spec.service)
        self.functions[spec.key] = spec

    async def update_function(self, spec: FunctionSpec) -> None:
        self._check()
        old = self.functions.get(spec.key)
        if old is None:
            raise NotFound(spec.service)
        self.functions[spec.key] = attrs.evolve(spec, created_at=old.created_at, replicas=old.replicas)

    async def delete_function(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        self._check()
        if self.functions.pop(store_key(name, namespace), None) is None:
            raise NotFound(name)
        self.invocations.pop(store_key(name, namespace), None)

    async def scale_function(self, name: str, replicas: int, namespace: str = DEFAULT_NAMESPACE) -> None:
        self._check()
        key = store_key(name, namespace)
        spec = self.functions.get(key)
        if spec is None:
            raise NotFound(name)
        self.functions[key] = attrs.evolve(spec, replicas=replicas)

    async def add_invocations(self, counts: dict[str, int]) -> None:
        self._check()
        for ref, n in counts.items():
            key = ref_key(ref)
            self.invocations[key] = self.invocations.get(key, 0) + n

    async def invocation_counts(self, refs: list[str]) -> dict[str, int]:
        self._check()
        return {ref: self.invocations.get(ref_key(ref), 0) for ref in refs}

    async def list_namespaces(self) -> list[Namespace]:
        self._check()
        return [self.namespaces[name] for name in sorted(self.namespaces)]

    async def get_namespace(self, name: str) -> Namespace | None:
        self._check()
        return self.namespaces.get(name)

    async def create_namespace(self, namespace: Namespace) -> None:
        self._check()
        if namespace.name in self.namespaces:
            raise AlreadyExists(namespace.name)
        self.namespaces[namespace.name] = namespace

    async def put_namespace(self, namespace: Namespace) -> None:
        self._check()
        self.namespaces[namespace.name] = namespace

    async def delete_namespace(self, name: str) -> None:
        self._check()
        if name not in self.namespaces:
            raise NotFound(name)
        if any(spec.namespace == name for spec in self.functions.values()):
            raise NamespaceNotEmpty(name)
        del self.namespaces[name]

    async def create_call(self, record: CallRecord) -> CallRecord | None:
        self._check()
        existing = self.calls.get(record.call_id)
        if existing is not None:
            return existing
        self.calls[record.call_id] = record
        return None

    async def get_call(self, call_id: str) -> CallRecord | None:
        self._check()
        return self.calls.get(call_id)

    async def put_call(self, record: CallRecord) -> None:
        self._check()
        self.calls[record.call_id] = record

    async def claim_call(
        self,
        record: CallRecord,
        window: float,
        *,
        replace: Collection[str] = (),
        replays_below: int | None = None,
    ) -> tuple[CallRecord | None, CallRecord | None]:
        self._check()
        now = self.clock.seconds() if self.clock is not None else time.time()
        current = self.calls.get(record.call_id)
        if current is not None:
            if current.status == CallStatus.ACCEPTING:
                free = (current.accepting_until or 0.0) <= now
            else:
                free = current.status in replace
            if not free or (replays_below is not None and current.replays >= replays_below):
                return None, current
        claim = attrs.evolve(record, status=CallStatus.ACCEPTING, accepting_until=now + window)
        self.calls[record.call_id] = claim
        return claim, None

    async def settle_claim(self, claim: CallRecord, record: CallRecord | None) -> CallRecord | None:
        self._check()
        current = self.calls.get(claim.call_id)
        if current is not None and (
            current.status != CallStatus.ACCEPTING or current.accepting_until != claim.accepting_until
        ):
            return current
        if record is None:
            self.calls.pop(claim.call_id, None)
        else:
            self.calls[claim.call_id] = record
        return None

    async def put_result(self, call_id: str, result: CallResult) -> None:
        self._check()
        self.results[call_id] = result

    async def get_result(self, call_id: str) -> CallResult | None:
        self._check()
        return self.results.get(call_id)

    async def transition_call(
        self,
        record: CallRecord,
        from_statuses: Collection[str],
        *,
        create: bool = False,
        attempts_at_most: int | None = None,
        result: CallResult | None = None,
    ) -> CallRecord | None:
        self._check()
        current = self.calls.get(record.call_id)
        if current is None:
            if not create:
                raise NotFound(record.call_id)
        elif current.status not in from_statuses or (
            attempts_at_most is not None and current.attempts > attempts_at_most
        ):
            return current
        self.calls[record.call_id] = record
        if result is not None:
            self.results[record.call_id] = result
        return None

    async def put_dead_letter(self, letter: DeadLetter) -> None:
        self._check()
        self.dead_letters[letter.call_id] = letter

    async def get_dead_letter(self, call_id: str) -> DeadLetter | None:
        self._check()
        return self.dead_letters.get(call_id)

    def _dead(self, function: str | None) -> list[DeadLetter]:
        letters = [d for d in self.dead_letters.values() if function is None or d.key == function]
        return sorted(letters, key=lambda d: (d.mark.at, d.call_id))

    async def list_dead_letters(
        self, function: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[DeadLetter]:
        self._check()
        return self._dead(function)[offset : offset + limit]

    async def count_dead_letters(self, function: str | None = None) -> int:
        self._check()
        return len(self._dead(function))

    async def remove_dead_letter(self, call_id: str) -> bool:
        self._check()
        return self.dead_letters.pop(call_id, None) is not None

    async def list_secrets(self, namespace: str) -> list[str]:
        self._check()
        return sorted(name for ns, name in self.secrets if ns == namespace)

    async def get_secret(self, namespace: str, name: str) -> bytes | None:
        self._check()
        return self.secrets.get((namespace, name))

    async def create_secret(self, namespace: str, name: str, sealed: bytes) -> None:
        self._check()
        if (namespace, name) in self.secrets:
            raise AlreadyExists(name)
        self.secrets[namespace, name] = sealed

    async def update_secret(self, namespace: str, name: str, sealed: bytes) -> None:
        self._check()
        if (namespace, name) not in self.secrets:
            raise NotFound(name)
        self.secrets[namespace, name] = sealed

    async def delete_secret(self, namespace: str, name: str) -> None:
        self._check()
        if self.secrets.pop((namespace, name), None) is None:
            raise NotFound(name)

    async def missing_secrets(self, namespace: str, names: Collection[str]) -> list[str]:
        self._check()
        return [name for name in names if (namespace, name) not in self.secrets]

    async def secrets_key_check(self, token: bytes | None) -> bytes | None:
        self._check()
        if self.secrets_check is None and token is not None:
            self.secrets_check = token
        return self.secrets_check

    async def append_logs(self, lines: Sequence[LogLine], max_lines: int) -> None:
        self._check()
        for name, namespace, timestamp, instance, text in lines:
            # Ids as Redis makes them: <ms>-<seq>, increasing.
            ms = int(timestamp * 1000)
            last_ms, last_seq = self._last_log_id
            self._last_log_id = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
            entry = LogEntry("{}-{}".format(*self._last_log_id), timestamp, instance.decode(), text.decode())
            log = self.logs.setdefault((namespace, name), [])
            log.append(entry)
            if len(log) > max_lines + max_lines // 8:  # trimmed by the eighth, as MAXLEN ~ does by node
                del log[: len(log) - max_lines]

    async def read_logs(
        self, name: str, namespace: str, *, after: str | None = None, since: float | None = None, count: int
    ) -> list[LogEntry]:
        self._check()
        log = self.logs.get((namespace, name), [])
        if after is not None:
            start = stream_id(after)
            found = [e for e in log if stream_id(e.id) > start]
        elif since is not None:
            found = [e for e in log if stream_id(e.id) >= (int(since * 1000), 0)]
        else:
            found = list(log)
        return found[:count]

    async def last_logs(self, name: str, namespace: str, count: int) -> list[LogEntry]:
        self._check()
        return self.logs.get((namespace, name), [])[-count:] if count > 0 else []

    async def delete_logs(self, name: str, namespace: str) -> None:
        self._check()
        self.logs.pop((namespace, name), None)
