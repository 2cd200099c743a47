"""A short-lived cache of function records, with batched invocation counters.

Every synchronous call (gateway) and every queued call (worker) needs the
function's record; reading Redis for each one would add a round trip per call.  Records are cached for ``ttl`` seconds
(1 s by default): a function deployed or removed through *this* gateway is seen
at once (the cache entry is dropped), through another gateway within ``ttl``.
Unknown names are never cached, so a new function is callable as soon as it is
deployed.  Invocation counts are summed in memory and written every ``flush``
seconds.  Everything here is keyed by the function's ``name.namespace``
(:func:`~txfaas.model.function_ref`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from txfaas.model import DEFAULT_NAMESPACE, FunctionSpec, function_ref
from txfaas.store import FunctionStore


class FunctionCache:
    """Cached ``get_function`` in front of a store; every other store method passes through."""

    log = Logger()

    def __init__(self, store: FunctionStore, clock: Any, ttl: float = 1.0, flush: float = 1.0) -> None:
        self.store = store
        self._clock = clock
        self._ttl = ttl
        self._flush_interval = flush
        self._entries: dict[str, tuple[float, FunctionSpec]] = {}
        self._waiting: dict[str, list[defer.Deferred]] = {}
        self._counts: dict[str, int] = {}
        self._loop: task.LoopingCall | None = None

    def cached(self, ref: str) -> FunctionSpec | None:
        """The function ``name.namespace``'s record if it is cached and fresh (no I/O), else None."""
        entry = self._entries.get(ref)
        if entry is not None and entry[0] > self._clock.seconds():
            return entry[1]
        return None

    async def get(self, ref: str) -> FunctionSpec | None:
        """The function ``name.namespace``'s record (from the store if not cached)."""
        entry = self._entries.get(ref)
        if entry is not None and entry[0] > self._clock.seconds():
            return entry[1]
        # One store read per name at a time, however many requests wait for it.
        waiter: defer.Deferred[FunctionSpec | None] = defer.Deferred()
        waiters = self._waiting.get(ref)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self._waiting[ref] = [waiter]
            defer.Deferred.fromCoroutine(self._load(ref)).addBoth(self._loaded, ref)
        return await waiter

    async def _load(self, ref: str) -> FunctionSpec | None:
        name, _, namespace = ref.partition(".")
        spec = await self.store.get_function(name, namespace or DEFAULT_NAMESPACE)
        if spec is not None:
            self._entries[ref] = (self._clock.seconds() + self._ttl, spec)
        else:
            self._entries.pop(ref, None)
        return spec

    def _loaded(self, result: Any, name: str) -> None:
        for waiter in self._waiting.pop(name, []):
            if waiter.called:  # cancelled: its client went away
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def get_function(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> FunctionSpec | None:
        """The store's ``get_function``, cached (so a FunctionCache can stand in for the store)."""
        return await self.get(function_ref(name, namespace))

    def __getattr__(self, name: str) -> Any:
        # Everything else (call records, listing, writes) goes to the store itself.
        return getattr(self.store, name)

    def forget(self, ref: str) -> None:
        self._entries.pop(ref, None)

    def count_invocation(self, ref: str) -> None:
        self._counts[ref] = self._counts.get(ref, 0) + 1

    def start(self) -> None:
        self._loop = task.LoopingCall(self._flush)
        self._loop.clock = self._clock
        self._loop.start(self._flush_interval, now=False).addErrback(
            lambda f: self.log.failure("invocation counter loop stopped", f)
        )

    async def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        await self._flush()

    def _flush(self) -> defer.Deferred:
        counts, self._counts = self._counts, {}
        if not counts:
            return defer.succeed(None)

        def failed(failure: Any) -> None:
            # Keep the counts for the next flush rather than lose them.
            for name, n in counts.items():
                self._counts[name] = self._counts.get(name, 0) + n
            self.log.warn("could not record invocation counts: {error}", error=failure.getErrorMessage())

        d = defer.Deferred.fromCoroutine(self.store.add_invocations(counts))
        d.addErrback(failed)
        return d
