"""Where functions and call records live: an interface, Redis and in-memory implementations.

The store knows nothing of HTTP or of the processes that use it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from txfaas.config import RedisURL
from txfaas.logs import LogEntry
from txfaas.model import DEFAULT_NAMESPACE, CallRecord, CallResult, DeadLetter, FunctionSpec, Namespace

#: A line to append to a function's log: (name, namespace, timestamp, instance, text), the
#: last two UTF-8 bytes.
LogLine = tuple[str, str, float, bytes, bytes]


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreUnavailable(StoreError):
    """The backing service did not answer (in time).  Callers answer 503, never 404."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class UnknownNamespace(StoreError):
    """A function was to be created in a namespace that does not exist."""


class NamespaceNotEmpty(StoreError):
    """A namespace to delete still holds functions."""


class FunctionStore(Protocol):
    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store answers now."""

    async def list_functions(self, namespace: str | None = None) -> list[FunctionSpec]:
        """Every namespace's functions, or only ``namespace``'s."""

    async def get_function(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> FunctionSpec | None: ...

    async def create_function(self, spec: FunctionSpec, *, check_namespace: bool = False) -> None:
        """Raise :class:`AlreadyExists` if a function of that name exists in its namespace; with
        ``check_namespace``, :class:`UnknownNamespace` unless its namespace was created (in the
        same atomic step: a namespace deleted meanwhile gets no function)."""

    async def update_function(self, spec: FunctionSpec) -> None:
        """Replace the function (keeping ``created_at`` and ``replicas``); :class:`NotFound` if missing."""

    async def delete_function(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        """Raise :class:`NotFound` if missing."""

    async def scale_function(self, name: str, replicas: int, namespace: str = DEFAULT_NAMESPACE) -> None: ...

    async def add_invocations(self, counts: dict[str, int]) -> None:
        """Add to the functions' invocation counters, keyed by ``name.namespace``."""

    async def invocation_counts(self, refs: list[str]) -> dict[str, int]:
        """The counters of these ``name.namespace`` refs."""


class NamespaceStore(Protocol):
    """The namespaces created through the API (the built-in ones are the gateway's to add)."""

    async def list_namespaces(self) -> list[Namespace]: ...

    async def get_namespace(self, name: str) -> Namespace | None: ...

    async def create_namespace(self, namespace: Namespace) -> None:
        """Raise :class:`AlreadyExists` if it exists."""

    async def put_namespace(self, namespace: Namespace) -> None:
        """Create or replace it."""

    async def delete_namespace(self, name: str) -> None:
        """Raise :class:`NotFound` if missing, :class:`NamespaceNotEmpty` if it holds functions."""


class CallStore(Protocol):
    async def ping(self) -> None: ...

    async def create_call(self, record: CallRecord) -> CallRecord | None:
        """Store a new record; if one with that call id exists, return it and store nothing."""

    async def get_call(self, call_id: str) -> CallRecord | None: ...

    async def put_call(self, record: CallRecord) -> None:
        """Overwrite the record (its TTL restarts)."""

    async def claim_call(
        self,
        record: CallRecord,
        window: float,
        *,
        replace: Collection[str] = (),
        replays_below: int | None = None,
    ) -> tuple[CallRecord | None, CallRecord | None]:
        """Claim a call id for a publish, atomically: store ``record`` as ``accepting`` until
        ``window`` seconds from now (on the store's clock).

        Taken when there is no record, when the stored one is a lapsed claim (its gateway died
        before the broker's confirm: nothing may be queued), or when its status is in
        ``replace``; with ``replays_below``, only over a record with fewer replays.  Returns
        ``(claim, None)``, the claim as stored, or ``(None, found)``, the record that refused it.
        """

    async def settle_claim(self, claim: CallRecord, record: CallRecord | None) -> CallRecord | None:
        """Replace our own claim (the stored record is still ``claim``: same deadline) with
        ``record``, or delete it when ``record`` is None.  Returns None when done, else the
        record found (a worker started the call, or another gateway took a lapsed claim)."""

    async def put_result(self, call_id: str, result: CallResult) -> None: ...

    async def get_result(self, call_id: str) -> CallResult | None: ...

    async def transition_call(
        self,
        record: CallRecord,
        from_statuses: Collection[str],
        *,
        create: bool = False,
        attempts_at_most: int | None = None,
        result: CallResult | None = None,
    ) -> CallRecord | None:
        """Write ``record`` only if the stored record's status is one of ``from_statuses``, atomically.

        With ``attempts_at_most``, the stored record's ``attempts`` must not be above it either
        (a newer attempt has started).  Returns None when written, else the record found (which
        refused it).  With ``create`` a missing record is written too; without, a missing one is
        :class:`NotFound`.  A ``result`` is kept with the record, in the same write (and only
        if the record is written)."""


class DeadLetterStore(Protocol):
    """The dead letters, kept until re-queued or removed (no TTL)."""

    async def put_dead_letter(self, letter: DeadLetter) -> None:
        """Keep ``letter`` (replacing one with the same call id)."""

    async def get_dead_letter(self, call_id: str) -> DeadLetter | None: ...

    async def list_dead_letters(
        self, function: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[DeadLetter]:
        """Oldest first; only ``function``'s when given (its :func:`~txfaas.model.store_key`)."""

    async def count_dead_letters(self, function: str | None = None) -> int: ...

    async def remove_dead_letter(self, call_id: str) -> bool:
        """Forget it; False if there was none."""


class SecretStore(Protocol):
    """Secrets by namespace and name.  Values are opaque sealed tokens: the store never sees
    a plaintext (sealing is :class:`txfaas.secrets.SecretBox`'s)."""

    async def list_secrets(self, namespace: str) -> list[str]:
        """The names in ``namespace``, sorted."""

    async def get_secret(self, namespace: str, name: str) -> bytes | None: ...

    async def create_secret(self, namespace: str, name: str, sealed: bytes) -> None:
        """Raise :class:`AlreadyExists` if it exists."""

    async def update_secret(self, namespace: str, name: str, sealed: bytes) -> None:
        """Raise :class:`NotFound` if it does not exist (atomically: never creates one)."""

    async def delete_secret(self, namespace: str, name: str) -> None:
        """Raise :class:`NotFound` if missing."""

    async def missing_secrets(self, namespace: str, names: Collection[str]) -> list[str]:
        """Those of ``names`` that do not exist in ``namespace``, in the order given."""

    async def secrets_key_check(self, token: bytes | None) -> bytes | None:
        """The key check token kept beside the secrets; ``token`` is kept first if there is none
        (``None``: only read it)."""


class LogStore(Protocol):
    """Each function's log: a capped sequence of lines, oldest first, each with an ordering id."""

    async def append_logs(self, lines: Sequence[LogLine], max_lines: int) -> None:
        """Append every line to its function's log, each log kept to about ``max_lines``."""

    async def read_logs(
        self, name: str, namespace: str, *, after: str | None = None, since: float | None = None, count: int
    ) -> list[LogEntry]:
        """Up to ``count`` lines, oldest first: those after the id ``after``; else from the time
        ``since``; else from the first."""

    async def last_logs(self, name: str, namespace: str, count: int) -> list[LogEntry]:
        """The newest ``count`` lines, oldest first."""

    async def delete_logs(self, name: str, namespace: str) -> None: ...


class AsyncCallStore(CallStore, DeadLetterStore, Protocol):
    """Call records and dead letters: what the gateway's asynchronous routes use."""


def open_store(reactor: Any, url: RedisURL, *, prefix: str, call_ttl: float) -> Any:
    """The store a ``--redis`` URL names: an in-process ``MemoryStore`` for ``memory:``, else a
    ``RedisStore``. Either is a service: add it to the process's service tree, which starts it
    (a Redis store then connects in the background) and stops it (it closes)."""
    if url.memory:
        from txfaas.store.memory import MemoryStore

        return MemoryStore()
    from txfaas.store.redis import RedisStore

    return RedisStore.from_url(url, reactor, prefix=prefix, call_ttl=call_ttl)
