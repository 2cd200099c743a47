"""``/system/logs``: faas-provider's log stream, read from the store, followed on the clock."""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from txfaas.gateway.errors import HTTPError, no_function
from txfaas.gateway.namespaces import Namespaces
from txfaas.gateway.settings import AppSettings
from txfaas.gateway.web import Presence
from txfaas.logs import LogEntry, LogQuery
from txfaas.store import StoreUnavailable

#: Log lines read from the store at a time.
LOG_PAGE = 1000


class LogsAPI:
    """Sends a function's log lines; with ``follow=true`` new lines as they come."""

    log = Logger()

    def __init__(self, store: Any, namespaces: Namespaces, settings: AppSettings, clock: Any) -> None:
        self._store = store
        self._namespaces = namespaces
        self._settings = settings
        self._clock = clock
        #: Follow streams open now (at most ``settings.log_followers``).
        self.followers = 0

    async def logs(self, request: IRequest) -> bytes:
        """``application/x-ndjson``, one ``logs.Message`` a line.

        With ``follow=true`` new lines are sent as they come until the client leaves: Klein
        then cancels this coroutine, which ends the poll where it waits, and the follower's
        place is given back.
        """
        query = LogQuery.from_args(request.args, self._settings.default_namespace)
        await self._namespaces.known(query.namespace)
        spec = await self._store.get_function(query.name, query.namespace)
        if spec is None:
            raise HTTPError(404, no_function(query.name, query.namespace))
        if query.follow and self.followers >= self._settings.log_followers:
            raise HTTPError(
                503,
                f"too many log streams open ({self._settings.log_followers}): try again later",
                {b"Retry-After": str(self._settings.retry_after).encode()},
            )
        presence = Presence(request)
        entries, cursor = await self._history(query)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        request.setHeader(b"Cache-Control", b"no-cache")
        name, namespace = query.name, query.namespace
        request.write(b"".join(entry.message(name, namespace) for entry in entries))
        if not query.follow:
            return b""
        # As long as the client stays: no response deadline (--write-timeout) for this one.
        unbounded = getattr(getattr(request, "channel", None), "unbounded", None)
        if unbounded is not None:
            unbounded()
        self.followers += 1
        try:
            await self._follow(request, presence, query, cursor)
        finally:
            self.followers -= 1
        return b""

    async def _history(self, query: LogQuery) -> tuple[list[LogEntry], str | None]:
        """The lines asked for, and the id of the last line read (where following goes on)."""
        store, name, namespace = self._store, query.name, query.namespace
        if query.tail is not None and query.instance is None and query.since is None:
            entries = await store.last_logs(name, namespace, query.tail)
            return entries, entries[-1].id if entries else None
        kept: deque[LogEntry] = deque(maxlen=query.tail)
        cursor = None
        while True:
            page = await self._page(query, cursor)
            if page:
                cursor = page[-1].id
            kept.extend(e for e in page if query.instance is None or e.instance == query.instance)
            if len(page) < LOG_PAGE:
                return list(kept), cursor

    def _page(self, query: LogQuery, cursor: str | None) -> Any:
        return self._store.read_logs(
            query.name,
            query.namespace,
            after=cursor,
            since=query.since if cursor is None else None,
            count=LOG_PAGE,
        )

    async def _follow(
        self, request: IRequest, presence: Presence, query: LogQuery, cursor: str | None
    ) -> None:
        name, namespace, instance = query.name, query.namespace, query.instance
        failing = False
        while not presence.gone:
            await deferLater(self._clock, self._settings.log_poll)
            try:
                page = await self._page(query, cursor)
            except StoreUnavailable as e:
                if not failing:
                    self.log.warn("log stream of {function}: {error}", function=name, error=e)
                failing = True
                continue
            failing = False
            if page:
                cursor = page[-1].id
                lines = [
                    e.message(name, namespace) for e in page if instance is None or e.instance == instance
                ]
                if lines:
                    request.write(b"".join(lines))
