"""The Redis store, through txredisapi.

Every command is bounded by a timeout on the injected clock (a lazy pool
pointed at a dead server would otherwise wait forever) and every failure to
reach Redis becomes :class:`StoreUnavailable`, so callers answer 503.

Keys (``prefix`` defaults to ``txfaas:``):

- ``{prefix}functions``: hash, :func:`~txfaas.model.store_key` -> JSON record (the default
  namespace's functions under their bare name, as before namespaces; others' ``name.namespace``)
- ``{prefix}invocations``: hash, the same keys -> invocation count
- ``{prefix}namespaces``: hash, namespace created through the API -> JSON ``{name, labels, annotations}``
- ``{prefix}call:{id}``: JSON call record, with the status TTL
- ``{prefix}result:{id}``: JSON function response, with the status TTL
- ``{prefix}dead:{id}``: JSON dead letter (the whole message, body in base64), no TTL
- ``{prefix}dead-letters``: sorted set of dead-lettered call ids, scored by the time
- ``{prefix}dead-letters:fn:{key}``: the same, per function (its store key)
- ``{prefix}secrets:{namespace}``: hash, secret name -> sealed token (Fernet; never a plaintext)
- ``{prefix}secrets-key-check``: a token sealed with the key the secrets were sealed with
- ``{prefix}logs:{namespace}:{name}``: stream, a function's log (``ts`` in Unix us, ``instance``,
  ``text``), capped with ``MAXLEN ~``

Status transitions (``transition_call``), claims (``claim_call``, ``settle_claim``) and
dead-letter writes are Lua scripts, so each is atomic: a cancel and a worker starting the
call cannot both win, nor two gateways taking one lapsed claim.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from typing import Any

import attrs
import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txfaas.config import RedisURL
from txfaas.logs import LogEntry, parse_entry
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
from txfaas.timers import Deadlines


def _dumps(data: Any) -> bytes:
    return orjson.dumps(data)


# KEYS[1] call key, KEYS[2] result key; ARGV[1] new JSON, ARGV[2] TTL, ARGV[3] "1" to create
# when missing, ARGV[4] the most attempts it may replace ("" = any), ARGV[5] the result's JSON to
# keep with it ("" = none), ARGV[6..] the statuses it may replace.
# -> {1} written, {0} missing, {0, current} refused.
_TRANSITION = b"""
local function write()
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  if ARGV[5] ~= '' then
    redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[2])
  end
  return {1}
end
local raw = redis.call('GET', KEYS[1])
if not raw then
  if ARGV[3] == '1' then
    return write()
  end
  return {0}
end
local current = cjson.decode(raw)
if ARGV[4] ~= '' and tonumber(current['attempts'] or 0) > tonumber(ARGV[4]) then
  return {0, raw}
end
local status = current['status']
for i = 6, #ARGV do
  if ARGV[i] == status then
    return write()
  end
end
return {0, raw}
"""

# KEYS[1] call key; ARGV[1] the claim's JSON (with "acceptingUntil":null), ARGV[2] the window in
# seconds, ARGV[3] TTL, ARGV[4] the replays the replaced record must be below ("" = any), ARGV[5..]
# the statuses it may replace besides a lapsed claim.  The deadline is on Redis's own clock, so
# gateways with skewed clocks agree on it.  -> {1, deadline} claimed, {0, current} refused.
_CLAIM = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local raw = redis.call('GET', KEYS[1])
if raw then
  local current = cjson.decode(raw)
  local status = current['status']
  local free = false
  if status == 'accepting' then
    local deadline = current['acceptingUntil']
    free = type(deadline) ~= 'number' or deadline <= now
  else
    for i = 5, #ARGV do
      if ARGV[i] == status then
        free = true
      end
    end
  end
  local replays = current['replays']
  if type(replays) ~= 'number' then
    replays = 0
  end
  if free and ARGV[4] ~= '' and replays >= tonumber(ARGV[4]) then
    free = false
  end
  if not free then
    return {0, raw}
  end
end
local deadline = string.format('%.6f', now + tonumber(ARGV[2]))
local claim = string.gsub(ARGV[1], '"acceptingUntil":null', '"acceptingUntil":' .. deadline, 1)
redis.call('SET', KEYS[1], claim, 'EX', ARGV[3])
return {1, deadline}
"""

# KEYS[1] call key; ARGV[1] the claim's deadline, ARGV[2] the JSON to put in its place ("" to
# delete it), ARGV[3] TTL.  A missing record counts as ours.  -> {1} done, {0, current} refused.
_SETTLE = b"""
local raw = redis.call('GET', KEYS[1])
if raw then
  local current = cjson.decode(raw)
  local deadline = current['acceptingUntil']
  if current['status'] ~= 'accepting' or type(deadline) ~= 'number' or deadline ~= tonumber(ARGV[1]) then
    return {0, raw}
  end
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return {1}
"""

# KEYS: letter key, all index, function index; ARGV: JSON, score, call id.
_PUT_DEAD = b"""
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return 1
"""

# KEYS: letter key, all index; ARGV: call id, function index prefix, the default namespace.
# (A letter kept before namespaces has none: the default namespace's, indexed by bare name.)
_REMOVE_DEAD = b"""
local raw = redis.call('GET', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if not raw then
  return 0
end
local letter = cjson.decode(raw)
local fn = letter['function']
local ns = letter['namespace']
if type(ns) == 'string' and ns ~= '' and ns ~= ARGV[3] then
  fn = fn .. '.' .. ns
end
redis.call('ZREM', ARGV[2] .. fn, ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""


# KEYS: functions, namespaces; ARGV: store key, JSON, namespace that must exist ('' = none).
# -> 1 created, 0 exists already, -1 no such namespace.
_CREATE_FUNCTION = b"""
if ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
  return -1
end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS: namespaces, functions; ARGV: namespace.  -> 1 deleted, 0 missing, -1 holds functions.
_DELETE_NAMESPACE = b"""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local suffix = '.' .. ARGV[1]
for _, key in ipairs(redis.call('HKEYS', KEYS[2])) do
  if string.sub(key, -#suffix) == suffix then
    return -1
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] a namespace's secrets; ARGV: name, sealed token.  -> 1 replaced, 0 missing.
_UPDATE_SECRET = b"""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


# ARGV[1] the cap, ARGV[2] how many instance names follow, then the names; then one argument
# a line: "<its stream's index in KEYS> <its instance's index> <Unix time in us> <text>".
_APPEND_LOGS = b"""
local cap = ARGV[1]
local first = 3 + tonumber(ARGV[2])
for i = first, #ARGV do
  local line = ARGV[i]
  local a = string.find(line, ' ', 1, true)
  local b = string.find(line, ' ', a + 1, true)
  local c = string.find(line, ' ', b + 1, true)
  redis.call('XADD', KEYS[tonumber(string.sub(line, 1, a - 1))], 'MAXLEN', '~', cap, '*',
             'ts', string.sub(line, b + 1, c - 1),
             'instance', ARGV[2 + tonumber(string.sub(line, a + 1, b - 1))],
             'text', string.sub(line, c + 1))
end
return 1
"""
#: Lines per script run: Redis runs a script alone, so a big batch is split.
LOG_BATCH = 500


@functools.cache
def commands_protocol() -> Any:
    """txredisapi's ``RedisProtocol`` with its replies read at once and a cheaper command
    encoder, made on first use (importing txredisapi imports the global reactor).

    Replies.  After each bulk reply (``$<n>``: a GET, an HGET, a script's answer) that is
    followed by more bytes in the same read, txredisapi's ``LineReceiver.setLineMode``
    pauses the transport and hands the rest to ``callLater(0, ...)``: the next reply is read
    on the next pass of the reactor loop, whatever else that pass has to do.  With many
    commands in flight (the worker starting 1,000 calls: 1,000 GET replies in a few reads),
    replies were taken in at one per pass -- 2,800 passes of the loop, 0.4 s in which the
    worker sent none of those calls to its function (measured in the 1,000-call burst).
    Here ``setLineMode`` only keeps the rest, and ``dataReceived`` reads it in a loop (not
    by recursion: a read may hold thousands of replies), so every reply a read holds is
    delivered before the reactor moves on, as Twisted's own ``LineReceiver`` does.

    Commands.  txredisapi builds each command argument by argument through
    ``_encode_value`` (a chain of ``isinstance`` tests, its length encoded the same way)
    into a ``bytearray``: 65 such calls for one call's four commands, 6 % of the worker's
    CPU.  This writes the same bytes (a RESP array of bulk strings) in one ``join``, and
    sends only what is not ``bytes`` already through txredisapi's own ``_encode_value``.
    """
    import txredisapi

    class RedisProtocol(txredisapi.RedisProtocol):
        _rest: Any = None  # what followed a bulk reply in the read being parsed

        def setLineMode(self, extra: bytes = b"") -> None:
            self.line_mode = 1
            if extra:
                self._rest = extra

        def dataReceived(self, data: bytes, unpause: bool = False) -> None:
            super().dataReceived(data, unpause)
            while self._rest is not None:
                rest, self._rest = self._rest, None
                super().dataReceived(rest)

        def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
            parts = [b"*%d\r\n" % len(args)]
            encode = self._encode_value
            for arg in args:
                if arg.__class__ is not bytes:
                    arg = encode(arg)
                parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
            return b"".join(parts)

    return RedisProtocol


class RedisStore:
    """Functions and call records in Redis.  Implements ``FunctionStore`` and ``CallStore``."""

    log = Logger()

    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        *,
        prefix: str = "txfaas:",
        timeout: float = 5.0,
        call_ttl: float = 24 * 3600,
    ) -> None:
        """``redis`` is a txredisapi connection (or pool) made with ``convertNumbers=False``."""
        self._handler = redis
        # The pool's connected protocols (txredisapi's PeekableQueue keeps them in ``pending``).
        factory = getattr(redis, "_factory", None)
        queue = getattr(factory, "connectionQueue", None)
        pending = getattr(queue, "pending", None)
        self._connected: list[Any] = pending if isinstance(pending, list) else []
        self._clock = clock
        self._prefix = prefix
        self._timeout = timeout
        self._call_ttl = max(1, int(call_ttl))
        self._set_ttl = (b"EX", b"%d" % self._call_ttl)
        self._functions = f"{prefix}functions"
        self._invocations = f"{prefix}invocations"
        self._namespaces = f"{prefix}namespaces"
        # One timer for every pending command's deadline instead of one each.
        self._deadlines = Deadlines(clock)

    @classmethod
    def connect(
        cls,
        url: RedisURL,
        clock: IReactorTime,
        *,
        poolsize: int = 4,
        **kwargs: Any,
    ) -> RedisStore:
        """Open a lazy, reconnecting txredisapi pool (imported here: it imports the global reactor)."""
        import txredisapi

        timeout = kwargs.get("timeout", 5.0)
        # Database 0 is every connection's own: no SELECT on connect.  (txredisapi's SELECT, when
        # the connection drops during it, fails a Deferred of its own that nobody handles.)
        dbid = url.db or None
        if url.unix_socket:
            pool = txredisapi.lazyUnixConnectionPool(
                url.unix_socket,
                dbid=dbid,
                poolsize=poolsize,
                password=url.password,
                replyTimeout=timeout,
                convertNumbers=False,
            )
        else:
            pool = txredisapi.lazyConnectionPool(
                url.host,
                url.port,
                dbid=dbid,
                poolsize=poolsize,
                password=url.password,
                connectTimeout=timeout,
                replyTimeout=timeout,
                convertNumbers=False,
            )
        # Before the reactor's next turn: every connection of the pool is built after it.
        pool._factory.protocol = commands_protocol()
        return cls(pool, clock, **kwargs)

    @property
    def _redis(self) -> Any:
        """Where the next command goes: a connected protocol of the pool when there is one.

        txredisapi's pool handler costs a command a closure, a generator run by
        ``inlineCallbacks`` and two more Deferreds just to pick a connection; every command
        this store sends is a non-blocking one, which the handler would also send on any
        connected protocol of the pool (``peek``).  With none connected, the handler is used:
        it waits for a connection and drops dead ones.
        """
        for protocol in self._connected:
            if protocol.connected:
                return protocol
        return self._handler

    def close(self) -> defer.Deferred:
        self._deadlines.stop()
        return defer.maybeDeferred(self._handler.disconnect)

    async def _run(self, what: str, d: defer.Deferred) -> Any:
        import txredisapi

        deadline = self._clock.seconds() + self._timeout
        self._deadlines.watch(d, deadline)
        try:
            return await d
        except defer.CancelledError:
            if self._clock.seconds() < deadline:
                raise  # our caller gave up (cancelled): not Redis's fault
            raise StoreUnavailable(f"redis did not answer {what} within {self._timeout:g}s") from None
        except txredisapi.ConnectionError as e:
            raise StoreUnavailable(f"redis unreachable ({what}): {e}") from None
        except ConnectionError as e:
            raise StoreUnavailable(f"redis unreachable ({what}): {e}") from None

    async def ping(self) -> None:
        await self._run("PING", self._redis.ping())

    # --- functions ---------------------------------------------------------------------------

    async def list_functions(self, namespace: str | None = None) -> list[FunctionSpec]:
        raw = await self._run("HGETALL", self._redis.hgetall(self._functions))
        specs = [FunctionSpec.from_record(orjson.loads(raw[key]), key) for key in sorted(raw)]
        return specs if namespace is None else [s for s in specs if s.namespace == namespace]

    async def get_function(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> FunctionSpec | None:
        key = store_key(name, namespace)
        raw = await self._run("HGET", self._redis.hget(self._functions, key))
        return None if raw is None else FunctionSpec.from_record(orjson.loads(raw), key)

    async def create_function(self, spec: FunctionSpec, *, check_namespace: bool = False) -> None:
        added = await self._run(
            "EVAL create function",
            self._redis.eval(
                _CREATE_FUNCTION,
                [self._functions, self._namespaces],
                [spec.key, _dumps(spec.to_record()), spec.namespace if check_namespace else ""],
            ),
        )
        if int(added) == -1:
            raise UnknownNamespace(spec.namespace)
        if not int(added):
            raise AlreadyExists(spec.service)

    async def update_function(self, spec: FunctionSpec) -> None:
        old = await self.get_function(spec.service, spec.namespace)
        if old is None:
            raise NotFound(spec.service)
        new = attrs.evolve(spec, created_at=old.created_at, replicas=old.replicas)
        await self._run("HSET", self._redis.hset(self._functions, spec.key, _dumps(new.to_record())))

    async def delete_function(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        key = store_key(name, namespace)
        removed = await self._run("HDEL", self._redis.hdel(self._functions, key))
        if not removed:
            raise NotFound(name)
        await self._run("HDEL", self._redis.hdel(self._invocations, key))

    async def scale_function(self, name: str, replicas: int, namespace: str = DEFAULT_NAMESPACE) -> None:
        old = await self.get_function(name, namespace)
        if old is None:
            raise NotFound(name)
        new = attrs.evolve(old, replicas=replicas)
        await self._run("HSET", self._redis.hset(self._functions, old.key, _dumps(new.to_record())))

    async def add_invocations(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        await self._run(
            "HINCRBY",
            defer.gatherResults(
                [self._redis.hincrby(self._invocations, ref_key(ref), n) for ref, n in counts.items()],
                consumeErrors=True,
            ).addErrback(lambda f: f.value.subFailure),
        )

    async def invocation_counts(self, refs: list[str]) -> dict[str, int]:
        if not refs:
            return {}
        keys = [ref_key(ref) for ref in refs]
        values = await self._run("HMGET", self._redis.hmget(self._invocations, keys))
        return {ref: int(v or 0) for ref, v in zip(refs, values, strict=True)}

    # --- namespaces ----------------------------------------------------------------------------

    @staticmethod
    def _namespace(name: str, raw: bytes | str) -> Namespace:
        data = orjson.loads(raw)
        return Namespace(name, dict(data.get("labels") or {}), dict(data.get("annotations") or {}))

    async def list_namespaces(self) -> list[Namespace]:
        raw = await self._run("HGETALL", self._redis.hgetall(self._namespaces))
        return [self._namespace(name, raw[name]) for name in sorted(raw)]

    async def get_namespace(self, name: str) -> Namespace | None:
        raw = await self._run("HGET", self._redis.hget(self._namespaces, name))
        return None if raw is None else self._namespace(name, raw)

    async def create_namespace(self, namespace: Namespace) -> None:
        added = await self._run(
            "HSETNX", self._redis.hsetnx(self._namespaces, namespace.name, _dumps(namespace.to_json()))
        )
        if not int(added):
            raise AlreadyExists(namespace.name)

    async def put_namespace(self, namespace: Namespace) -> None:
        await self._run(
            "HSET", self._redis.hset(self._namespaces, namespace.name, _dumps(namespace.to_json()))
        )

    async def delete_namespace(self, name: str) -> None:
        result = int(
            await self._run(
                "EVAL delete namespace",
                self._redis.eval(_DELETE_NAMESPACE, [self._namespaces, self._functions], [name]),
            )
        )
        if result == 0:
            raise NotFound(name)
        if result == -1:
            raise NamespaceNotEmpty(name)

    # --- calls -------------------------------------------------------------------------------

    def _set(self, key: str, value: bytes, *flags: bytes) -> defer.Deferred:
        """``SET key value EX <call TTL> [flags]``, every argument bytes already: what txredisapi's
        ``set`` sends, without its argument list and its per-argument encoding (14k of an
        accepted call's 620k instructions)."""
        return self._redis.execute_command(b"SET", key.encode(), value, *self._set_ttl, *flags)

    def _call_key(self, call_id: str) -> str:
        return f"{self._prefix}call:{call_id}"

    def _result_key(self, call_id: str) -> str:
        return f"{self._prefix}result:{call_id}"

    async def create_call(self, record: CallRecord) -> CallRecord | None:
        key = self._call_key(record.call_id)
        created = await self._run(
            "SET NX",
            self._set(key, _dumps(record.to_json()), b"NX"),
        )
        if created:
            return None
        existing = await self.get_call(record.call_id)
        # Expired between the two commands: it is ours now.
        return existing if existing is not None else await self.create_call(record)

    async def get_call(self, call_id: str) -> CallRecord | None:
        raw = await self._run("GET", self._redis.get(self._call_key(call_id)))
        return None if raw is None else CallRecord.from_json(orjson.loads(raw))

    async def put_call(self, record: CallRecord) -> None:
        await self._run(
            "SET",
            self._set(self._call_key(record.call_id), _dumps(record.to_json())),
        )

    async def claim_call(
        self,
        record: CallRecord,
        window: float,
        *,
        replace: Collection[str] = (),
        replays_below: int | None = None,
    ) -> tuple[CallRecord | None, CallRecord | None]:
        claim = attrs.evolve(record, status=CallStatus.ACCEPTING, accepting_until=None)
        reply = await self._run(
            "EVAL claim",
            self._redis.eval(
                _CLAIM,
                [self._call_key(record.call_id)],
                [
                    _dumps(claim.to_json()),
                    repr(float(window)),
                    self._call_ttl,
                    "" if replays_below is None else str(replays_below),
                    *replace,
                ],
            ),
        )
        if int(reply[0]) == 1:
            return attrs.evolve(claim, accepting_until=float(reply[1])), None
        return None, CallRecord.from_json(orjson.loads(reply[1]))

    async def settle_claim(self, claim: CallRecord, record: CallRecord | None) -> CallRecord | None:
        reply = await self._run(
            "EVAL settle claim",
            self._redis.eval(
                _SETTLE,
                [self._call_key(claim.call_id)],
                [
                    repr(claim.accepting_until),
                    b"" if record is None else _dumps(record.to_json()),
                    self._call_ttl,
                ],
            ),
        )
        if int(reply[0]) == 1:
            return None
        return CallRecord.from_json(orjson.loads(reply[1]))

    async def put_result(self, call_id: str, result: CallResult) -> None:
        await self._run(
            "SET",
            self._set(self._result_key(call_id), _dumps(result.to_json())),
        )

    async def get_result(self, call_id: str) -> CallResult | None:
        raw = await self._run("GET", self._redis.get(self._result_key(call_id)))
        return None if raw is None else CallResult.from_json(orjson.loads(raw))

    async def transition_call(
        self,
        record: CallRecord,
        from_statuses: Collection[str],
        *,
        create: bool = False,
        attempts_at_most: int | None = None,
        result: CallResult | None = None,
    ) -> CallRecord | None:
        reply = await self._run(
            "EVAL transition",
            self._redis.eval(
                _TRANSITION,
                [self._call_key(record.call_id), self._result_key(record.call_id)],
                [
                    _dumps(record.to_json()),
                    self._call_ttl,
                    "1" if create else "0",
                    "" if attempts_at_most is None else str(attempts_at_most),
                    b"" if result is None else _dumps(result.to_json()),
                    *from_statuses,
                ],
            ),
        )
        if int(reply[0]) == 1:
            return None
        if len(reply) < 2:
            raise NotFound(record.call_id)
        return CallRecord.from_json(orjson.loads(reply[1]))

    # --- dead letters --------------------------------------------------------------------------

    def _dead_key(self, call_id: str) -> str:
        return f"{self._prefix}dead:{call_id}"

    def _dead_index(self, function: str | None = None) -> str:
        base = f"{self._prefix}dead-letters"
        return base if function is None else f"{base}:fn:{function}"

    async def put_dead_letter(self, letter: DeadLetter) -> None:
        await self._run(
            "EVAL put dead letter",
            self._redis.eval(
                _PUT_DEAD,
                [self._dead_key(letter.call_id), self._dead_index(), self._dead_index(letter.key)],
                [_dumps(letter.to_json()), repr(float(letter.mark.at)), letter.call_id],
            ),
        )

    async def get_dead_letter(self, call_id: str) -> DeadLetter | None:
        raw = await self._run("GET", self._redis.get(self._dead_key(call_id)))
        return None if raw is None else DeadLetter.from_json(orjson.loads(raw))

    async def list_dead_letters(
        self, function: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[DeadLetter]:
        if limit <= 0:
            return []
        ids = await self._run(
            "ZRANGE", self._redis.zrange(self._dead_index(function), offset, offset + limit - 1)
        )
        if not ids:
            return []
        raws = await self._run("MGET", self._redis.mget([self._dead_key(i) for i in ids]))
        return [DeadLetter.from_json(orjson.loads(raw)) for raw in raws if raw is not None]

    async def count_dead_letters(self, function: str | None = None) -> int:
        return int(await self._run("ZCARD", self._redis.zcard(self._dead_index(function))))

    async def remove_dead_letter(self, call_id: str) -> bool:
        removed = await self._run(
            "EVAL remove dead letter",
            self._redis.eval(
                _REMOVE_DEAD,
                [self._dead_key(call_id), self._dead_index()],
                [call_id, self._dead_index(""), DEFAULT_NAMESPACE],
            ),
        )
        return bool(int(removed))

    # --- secrets -------------------------------------------------------------------------------

    def _secrets_key(self, namespace: str) -> str:
        return f"{self._prefix}secrets:{namespace}"

    async def list_secrets(self, namespace: str) -> list[str]:
        names = await self._run("HKEYS", self._redis.hkeys(self._secrets_key(namespace)))
        return sorted(n.decode() if isinstance(n, bytes) else n for n in names)

    async def get_secret(self, namespace: str, name: str) -> bytes | None:
        raw = await self._run("HGET", self._redis.hget(self._secrets_key(namespace), name))
        return None if raw is None else raw.encode() if isinstance(raw, str) else raw

    async def create_secret(self, namespace: str, name: str, sealed: bytes) -> None:
        added = await self._run("HSETNX", self._redis.hsetnx(self._secrets_key(namespace), name, sealed))
        if not added:
            raise AlreadyExists(name)

    async def update_secret(self, namespace: str, name: str, sealed: bytes) -> None:
        replaced = await self._run(
            "EVAL update secret",
            self._redis.eval(_UPDATE_SECRET, [self._secrets_key(namespace)], [name, sealed]),
        )
        if not int(replaced):
            raise NotFound(name)

    async def delete_secret(self, namespace: str, name: str) -> None:
        removed = await self._run("HDEL", self._redis.hdel(self._secrets_key(namespace), name))
        if not removed:
            raise NotFound(name)

    async def missing_secrets(self, namespace: str, names: Collection[str]) -> list[str]:
        names = list(names)
        if not names:
            return []
        values = await self._run("HMGET", self._redis.hmget(self._secrets_key(namespace), names))
        return [name for name, value in zip(names, values, strict=True) if value is None]

    async def secrets_key_check(self, token: bytes | None) -> bytes | None:
        key = f"{self._prefix}secrets-key-check"
        if token is not None:
            await self._run("SET NX", self._redis.execute_command(b"SET", key.encode(), token, b"NX"))
        raw = await self._run("GET", self._redis.get(key))
        return raw.encode() if isinstance(raw, str) else raw

    # --- function logs -----------------------------------------------------------------------

    def _log_key(self, name: str, namespace: str) -> bytes:
        return f"{self._prefix}logs:{namespace}:{name}".encode()

    async def append_logs(self, lines: Sequence[LogLine], max_lines: int) -> None:
        """One script per ``LOG_BATCH`` lines, all sent at once (one round trip); a line is one
        argument (packed here, unpacked by the script: the gateway's CPU is the scarce one)."""
        sent = []
        cap = b"%d" % max_lines
        for start in range(0, len(lines), LOG_BATCH):
            streams: dict[tuple[str, str], int] = {}
            instances: dict[bytes, int] = {}
            packed = []
            for name, namespace, timestamp, instance, text in lines[start : start + LOG_BATCH]:
                key = streams.get((name, namespace))
                if key is None:
                    key = streams[name, namespace] = len(streams) + 1
                who = instances.get(instance)
                if who is None:
                    who = instances[instance] = len(instances) + 1
                packed.append(b"%d %d %d %s" % (key, who, int(timestamp * 1_000_000), text))
            keys = [self._log_key(name, namespace) for name, namespace in streams]
            sent.append(
                self._redis.execute_command(
                    b"EVAL",
                    _APPEND_LOGS,
                    b"%d" % len(keys),
                    *keys,
                    cap,
                    b"%d" % len(instances),
                    *instances,
                    *packed,
                )
            )
        await self._run(
            "EVAL append logs",
            defer.gatherResults(sent, consumeErrors=True).addErrback(lambda f: f.value.subFailure),
        )

    async def read_logs(
        self, name: str, namespace: str, *, after: str | None = None, since: float | None = None, count: int
    ) -> list[LogEntry]:
        if after is not None:
            start = b"(" + after.encode()
        elif since is not None:
            start = b"%d" % max(0, int(since * 1000))
        else:
            start = b"-"
        reply = await self._run(
            "XRANGE",
            self._redis.execute_command(
                b"XRANGE", self._log_key(name, namespace), start, b"+", b"COUNT", b"%d" % count
            ),
        )
        return [parse_entry(entry_id, fields) for entry_id, fields in reply or []]

    async def last_logs(self, name: str, namespace: str, count: int) -> list[LogEntry]:
        if count <= 0:
            return []
        reply = await self._run(
            "XREVRANGE",
            self._redis.execute_command(
                b"XREVRANGE", self._log_key(name, namespace), b"+", b"-", b"COUNT", b"%d" % count
            ),
        )
        return [parse_entry(entry_id, fields) for entry_id, fields in reversed(reply or [])]

    async def delete_logs(self, name: str, namespace: str) -> None:
        await self._run("DEL", self._redis.delete(self._log_key(name, namespace).decode()))
