"""The Redis store, through txredisapi (with ``hiredis``, its ``HiredisProtocol`` reads every
reply a read holds at once).

Split by job: :mod:`.base` (the pool as a service, bounded commands), :mod:`.functions`
(functions, counters, namespaces), :mod:`.calls` (call records, results, dead letters),
:mod:`.secrets`, :mod:`.logs` and :mod:`.scripts` (the Lua scripts that make compound writes
atomic). Keys are all under ``prefix`` (``txfaas:`` by default); each module names its own.
"""

from __future__ import annotations

from txfaas.store.redis.calls import CallRecords
from txfaas.store.redis.functions import FunctionRecords
from txfaas.store.redis.logs import LogRecords
from txfaas.store.redis.scripts import LOG_BATCH
from txfaas.store.redis.secrets import SecretRecords

__all__ = ["LOG_BATCH", "RedisStore"]


class RedisStore(FunctionRecords, CallRecords, SecretRecords, LogRecords):
    """Functions, namespaces, call records, dead letters, secrets and logs in Redis: implements
    every store protocol of :mod:`txfaas.store`, and ``IService`` (started, it connects;
    stopped, it closes)."""
