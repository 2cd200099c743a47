"""RedisStore against the real Redis: every store method, string fidelity, TTLs, and an unreachable server.

Each test uses its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import time

import attrs
import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from tests.store_contract import CONTRACT, accel_fixture  # noqa: F401 (the accel fixture)
from tests.support import free_port, unique
from txfaas.config import RedisURL, parse_redis_url
from txfaas.model import Call, CallRecord, CallResult, CallStatus, DeadLetter, DeadMark, FunctionSpec
from txfaas.store import AlreadyExists, NotFound, StoreUnavailable
from txfaas.store.redis import RedisStore

CALL_TTL = 300


@pytest_twisted.async_yield_fixture
async def raw(redis_url):
    """A plain txredisapi connection for looking behind the store's back (and cleaning up)."""
    import txredisapi

    url = parse_redis_url(redis_url)
    connection = await txredisapi.Connection(url.host, url.port, dbid=url.db, convertNumbers=False)
    yield connection
    await connection.disconnect()


@pytest_twisted.async_yield_fixture
async def prefix(raw):
    value = f"{unique('txfaas-test')}:"
    yield value
    keys = await raw.keys(f"{value}*")
    if keys:
        await raw.delete(keys)


@pytest_twisted.async_yield_fixture
async def store(redis_url, prefix, accel):
    s = RedisStore.connect(parse_redis_url(redis_url), reactor, prefix=prefix, call_ttl=CALL_TTL, timeout=5.0)
    yield s
    await s.close()


def spec(name: str = "fn", **kwargs) -> FunctionSpec:
    return FunctionSpec(service=name, image=kwargs.pop("image", f"example/{name}:1"), **kwargs)


# --- functions ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ping_answers(store):
    assert await store.ping() is None


@pytest_twisted.ensureDeferred
async def test_create_get_and_list_functions_sorted_by_name(store):
    await store.create_function(spec("beta", created_at=10.5))
    await store.create_function(spec("alpha", labels={"team": "a"}))
    assert await store.get_function("beta") == spec("beta", created_at=10.5)
    assert [s.service for s in await store.list_functions()] == ["alpha", "beta"]
    assert await store.get_function("gamma") is None


@pytest_twisted.ensureDeferred
async def test_list_functions_of_an_empty_store_is_empty(store):
    assert await store.list_functions() == []


@pytest_twisted.ensureDeferred
async def test_create_existing_function_raises_already_exists_and_keeps_the_first(store):
    await store.create_function(spec(image="first"))
    with pytest.raises(AlreadyExists):
        await store.create_function(spec(image="second"))
    assert (await store.get_function("fn")).image == "first"


@pytest_twisted.ensureDeferred
async def test_numeric_looking_strings_come_back_as_strings(store):
    """The pool is made with convertNumbers=False: "007", "1.10" and numeric names stay strings."""
    await store.create_function(
        spec("007", image="example/fn:1.10", env_vars={"CODE": "007", "RATIO": "1.10"})
    )
    await store.create_function(spec("1", image="10"))
    await store.create_function(spec("abc"))
    got = await store.get_function("007")
    assert got.image == "example/fn:1.10"
    assert got.env_vars == {"CODE": "007", "RATIO": "1.10"}
    listed = await store.list_functions()
    assert [(s.service, s.image) for s in listed] == [
        ("007", "example/fn:1.10"),
        ("1", "10"),
        ("abc", "example/abc:1"),
    ]
    await store.add_invocations({"007": 5})
    assert await store.invocation_counts(["007", "1"]) == {"007": 5, "1": 0}


@pytest_twisted.ensureDeferred
async def test_update_function_replaces_spec_but_keeps_created_at_and_replicas(store):
    await store.create_function(spec(image="v1", created_at=100.25))
    await store.scale_function("fn", 3)
    await store.update_function(spec(image="v2", created_at=999.0, replicas=1, env_vars={"A": "1"}))
    got = await store.get_function("fn")
    assert (got.image, got.env_vars, got.created_at, got.replicas) == ("v2", {"A": "1"}, 100.25, 3)


@pytest_twisted.ensureDeferred
async def test_update_missing_function_raises_not_found(store):
    with pytest.raises(NotFound):
        await store.update_function(spec())
    assert await store.get_function("fn") is None


@pytest_twisted.ensureDeferred
async def test_delete_function_removes_it_and_its_invocation_count(store):
    await store.create_function(spec())
    await store.add_invocations({"fn": 4})
    await store.delete_function("fn")
    assert await store.get_function("fn") is None
    assert await store.invocation_counts(["fn"]) == {"fn": 0}
    with pytest.raises(NotFound):
        await store.delete_function("fn")


@pytest_twisted.ensureDeferred
async def test_scale_function_sets_replicas_and_missing_raises_not_found(store):
    await store.create_function(spec())
    await store.scale_function("fn", 0)
    assert (await store.get_function("fn")).replicas == 0
    with pytest.raises(NotFound):
        await store.scale_function("other", 2)


@pytest_twisted.ensureDeferred
async def test_invocations_add_up_per_function(store):
    await store.add_invocations({"a": 2, "b": 1})
    await store.add_invocations({"a": 3})
    await store.add_invocations({})
    assert await store.invocation_counts(["a", "b", "c"]) == {"a": 5, "b": 1, "c": 0}
    assert await store.invocation_counts([]) == {}


@pytest_twisted.ensureDeferred
async def test_keys_live_under_the_prefix(store, prefix, raw):
    await store.create_function(spec())
    await store.add_invocations({"fn": 1})
    await store.create_call(CallRecord("c1", "fn"))
    await store.put_result("c1", CallResult(200))
    assert sorted(await raw.keys(f"{prefix}*")) == sorted(
        [f"{prefix}functions", f"{prefix}invocations", f"{prefix}call:c1", f"{prefix}result:c1"]
    )


# --- calls --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_call_stores_a_new_record_with_a_ttl(store, prefix, raw):
    record = CallRecord("c1", "fn", accepted_at=time.time(), callback_url="https://h.example/", queue="q")
    assert await store.create_call(record) is None
    assert await store.get_call("c1") == record
    ttl = await raw.ttl(f"{prefix}call:c1")
    assert 0 < ttl <= CALL_TTL
    assert await store.get_call("missing") is None


@pytest_twisted.ensureDeferred
async def test_create_call_is_idempotent_returning_the_first_record(store):
    first = CallRecord("c1", "fn", accepted_at=1.0)
    assert await store.create_call(first) is None
    assert await store.create_call(CallRecord("c1", "other", accepted_at=2.0)) == first
    assert await store.get_call("c1") == first


@pytest_twisted.ensureDeferred
async def test_put_call_overwrites_and_restarts_the_ttl(store, prefix, raw):
    await store.create_call(CallRecord("c1", "fn"))
    await raw.expire(f"{prefix}call:c1", 5)
    done = CallRecord("c1", "fn", status=CallStatus.SUCCEEDED, status_code=200, attempts=1, duration=0.25)
    await store.put_call(done)
    assert await store.get_call("c1") == done
    assert await raw.ttl(f"{prefix}call:c1") > 5


@pytest_twisted.ensureDeferred
async def test_put_result_keeps_binary_body_and_headers_with_a_ttl(store, prefix, raw):
    result = CallResult(
        201, [("Content-Type", "application/octet-stream"), ("X-Bin", "\xff\x00")], bytes(range(256))
    )
    await store.put_result("c1", result)
    assert await store.get_result("c1") == result
    assert 0 < await raw.ttl(f"{prefix}result:c1") <= CALL_TTL
    assert await store.get_result("c2") is None


# --- an unreachable Redis -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda s: s.ping(), id="ping"),
        pytest.param(lambda s: s.get_function("fn"), id="get_function"),
        pytest.param(lambda s: s.list_functions(), id="list_functions"),
        pytest.param(lambda s: s.delete_function("fn"), id="delete_function"),
        pytest.param(lambda s: s.update_function(spec()), id="update_function"),
        pytest.param(lambda s: s.add_invocations({"fn": 1}), id="add_invocations"),
        pytest.param(lambda s: s.create_call(CallRecord("c1", "fn")), id="create_call"),
        pytest.param(lambda s: s.get_result("c1"), id="get_result"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unreachable_redis_raises_store_unavailable_within_the_timeout(operation):
    timeout = 0.5
    dead = RedisStore.connect(RedisURL(port=free_port()), reactor, prefix="unused:", timeout=timeout)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            await operation(dead)
        elapsed = time.monotonic() - started
    finally:
        await dead.close()
    assert elapsed < timeout + 1.0, f"took {elapsed:.2f}s with a {timeout}s timeout"


@pytest_twisted.ensureDeferred
async def test_spec_round_trips_every_field_through_redis(store):
    full = attrs.evolve(
        spec(
            "full",
            namespace="ns",
            env_process="cat",
            env_vars={"exec_timeout": "10s"},
            labels={"l": "1"},
            annotations={"com.openfaas.queue": "slow", "txfaas.url": "http://full.example:8080"},
            constraints=["c"],
            secrets=["s"],
            limits={"memory": "128Mi"},
            requests={"cpu": "100m"},
            read_only_root_filesystem=True,
            url="http://full.example:8080",
            created_at=1700000000.5,
        ),
        replicas=2,
    )
    await store.create_function(full)
    assert await store.get_function("full", "ns") == full


@pytest_twisted.ensureDeferred
async def test_a_result_given_with_a_transition_is_kept_only_if_the_record_is_written(store, prefix, raw):
    running = CallRecord(call_id="c1", function="fn", status=CallStatus.RUNNING, attempts=2)
    await store.put_call(running)
    done = attrs.evolve(running, status=CallStatus.SUCCEEDED, status_code=200)
    answer = CallResult(200, [("Content-Type", "text/plain")], b"\x00two")
    # An older attempt's outcome is refused, and so is its answer.
    stale = attrs.evolve(done, attempts=1)
    found = await store.transition_call(
        stale, {CallStatus.RUNNING}, attempts_at_most=1, result=CallResult(500)
    )
    assert found == running
    assert await store.get_result("c1") is None
    assert await store.transition_call(done, {CallStatus.RUNNING}, attempts_at_most=2, result=answer) is None
    assert (await store.get_call("c1")).status == CallStatus.SUCCEEDED
    assert await store.get_result("c1") == answer
    assert 0 < await raw.ttl(f"{prefix}result:c1") <= CALL_TTL


@pytest_twisted.ensureDeferred
async def test_commands_go_straight_to_a_connected_protocol_and_survive_its_loss(store, accel):
    """With accelerations on, the store skips txredisapi's pool handler while a pool connection
    is up; a lost connection is never used again, and commands go on (through the handler, or a
    connection that is back).  With them off, every command goes through the handler."""
    import txredisapi

    await store.ping()
    if not accel:
        assert store._redis is store._handler and store._connected == []
        return
    assert isinstance(store._redis, txredisapi.HiredisProtocol)
    assert type(store._redis).__name__ == "FastHiredisProtocol"  # the one-join encoder
    lost = list(store._connected)
    for protocol in lost:
        protocol.transport.abortConnection()
    for _ in range(200):
        if not any(p.connected for p in lost):
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert store._redis not in lost  # the handler, or a connection made since
    record = CallRecord(call_id=unique("call"), function="fn", status=CallStatus.QUEUED)
    assert await store.create_call(record) is None
    assert (await store.get_call(record.call_id)).status == CallStatus.QUEUED
    for _ in range(500):
        if store._redis is not store._handler:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert isinstance(store._redis, txredisapi.HiredisProtocol) and store._redis not in lost  # reconnected


@pytest_twisted.ensureDeferred
async def test_a_store_is_a_service_that_connects_when_started_and_closes_when_stopped(redis_url, prefix):
    store = RedisStore.from_url(parse_redis_url(redis_url), reactor, prefix=prefix, timeout=1.0)
    with pytest.raises(StoreUnavailable):
        await store.ping()  # not started: nothing to send it on
    store.startService()
    assert store.running
    await store.ping()
    await store.stopService()
    assert not store.running
    with pytest.raises(StoreUnavailable):
        await store.ping()
    await store.close()  # closing again is harmless


@pytest_twisted.ensureDeferred
async def test_thousands_of_commands_in_flight_each_get_their_own_reply(store, raw, prefix):
    """Many bulk replies arrive in one read (the store's protocol reads them all at once, not one
    per pass of the reactor): every caller still gets its own, and they all come back within a
    few passes of the loop, not one pass per reply."""
    n = 3000
    records = [
        CallRecord(call_id=f"many-{i}", function="fn", status=CallStatus.QUEUED, error="x" * (i % 97))
        for i in range(n)
    ]
    for record in records:
        await raw.set(f"{prefix}call:{record.call_id}", orjson.dumps(record.to_json()))
    await store.ping()
    passes = 0

    def count() -> None:
        nonlocal passes
        passes += 1
        if not done.called:
            reactor.callLater(0, count)

    done = defer.gatherResults([defer.ensureDeferred(store.get_call(r.call_id)) for r in records])
    reactor.callLater(0, count)
    got = await done
    assert got == records
    assert passes < n // 4  # txredisapi's pure-Python protocol: at least one pass per reply


# --- claims ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_claim_is_stored_accepting_with_a_deadline_on_the_redis_clock(store, prefix, raw):
    before = time.time()
    claim, found = await store.claim_call(CallRecord("c1", "fn"), 10.0)
    assert found is None
    assert claim.status == CallStatus.ACCEPTING
    assert before + 9 < claim.accepting_until < time.time() + 11
    assert await store.get_call("c1") == claim
    assert 0 < await raw.ttl(f"{prefix}call:c1") <= CALL_TTL
    claim2, found = await store.claim_call(CallRecord("c1", "fn"), 10.0)
    assert (claim2, found) == (None, claim)  # not lapsed: refused


@pytest_twisted.ensureDeferred
async def test_a_lapsed_claim_is_taken_by_exactly_one_of_many_at_once(store):
    await store.claim_call(CallRecord("c1", "fn"), 0.05)
    await deferLater(reactor, 0.1, lambda: None)
    results = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(store.claim_call(CallRecord("c1", "fn"), 10.0)) for _ in range(20)]
    )
    winners = [claim for claim, _ in results if claim is not None]
    assert len(winners) == 1
    assert await store.get_call("c1") == winners[0]


@pytest_twisted.ensureDeferred
async def test_a_claim_replaces_only_the_statuses_named_and_fewer_replays(store):
    dead = CallRecord("c1", "fn", status=CallStatus.DEAD_LETTERED, replays=1)
    await store.put_call(dead)
    assert await store.claim_call(CallRecord("c1", "fn", replays=2), 10.0) == (None, dead)
    refused = await store.claim_call(
        CallRecord("c1", "fn", replays=1), 10.0, replace={CallStatus.DEAD_LETTERED}, replays_below=1
    )
    assert refused == (None, dead)
    claim, _ = await store.claim_call(
        CallRecord("c1", "fn", replays=2), 10.0, replace={CallStatus.DEAD_LETTERED}, replays_below=2
    )
    assert (claim.status, claim.replays) == (CallStatus.ACCEPTING, 2)


@pytest_twisted.ensureDeferred
async def test_only_the_claims_owner_settles_it(store):
    claim, _ = await store.claim_call(CallRecord("c1", "fn"), 0.05)
    await deferLater(reactor, 0.1, lambda: None)
    theirs, _ = await store.claim_call(CallRecord("c1", "fn"), 10.0)
    queued = CallRecord("c1", "fn")
    assert await store.settle_claim(claim, queued) == theirs  # ours lapsed and was taken
    assert await store.settle_claim(claim, None) == theirs
    assert await store.settle_claim(theirs, queued) is None
    assert await store.get_call("c1") == queued
    assert await store.settle_claim(theirs, None) == queued  # confirmed: not a claim any more
    claim, _ = await store.claim_call(CallRecord("c2", "fn"), 10.0)
    assert await store.settle_claim(claim, None) is None
    assert await store.get_call("c2") is None


# --- namespaces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.__name__)
@pytest_twisted.ensureDeferred
async def test_namespace_contract(store, case):
    await case(store)


@pytest_twisted.ensureDeferred
async def test_records_of_the_release_before_namespaces_read_as_the_default_namespace(store, prefix, raw):
    """Exactly what the release before namespaces wrote: a function (namespace "" under its bare
    name), its counter, a call record and a dead letter without namespace."""
    old_function = {
        "service": "echo",
        "image": "old:1",
        "namespace": "",
        "envProcess": "",
        "envVars": {},
        "labels": {},
        "annotations": {},
        "constraints": [],
        "secrets": [],
        "limits": None,
        "requests": None,
        "readOnlyRootFilesystem": False,
        "url": "http://old.example:8080",
        "replicas": 2,
        "createdAt": 5.0,
    }
    await raw.hset(f"{prefix}functions", "echo", orjson.dumps(old_function))
    await raw.hset(f"{prefix}invocations", "echo", "7")
    await raw.set(
        f"{prefix}call:c-old", orjson.dumps({"callId": "c-old", "function": "echo", "status": "succeeded"})
    )
    old_message = {
        "v": 1,
        "callId": "c-dead",
        "function": "echo",
        "method": "POST",
        "path": "/",
        "query": "",
        "headers": [],
        "callbackUrl": None,
        "acceptedAt": 1.0,
        "queue": "faas-request",
        "attempt": 3,
        "dead": {"reason": "max_age", "at": 9.0, "error": None, "attempts": 3},
    }
    old_letter = {
        "callId": "c-dead",
        "function": "echo",
        "queue": "faas-request",
        "phase": "call",
        "reason": "max_age",
        "message": old_message,
        "body": "",
    }
    await raw.set(f"{prefix}dead:c-dead", orjson.dumps(old_letter))
    await raw.zadd(f"{prefix}dead-letters", 9.0, "c-dead")
    await raw.zadd(f"{prefix}dead-letters:fn:echo", 9.0, "c-dead")

    spec = await store.get_function("echo")
    assert (spec.namespace, spec.ref, spec.image, spec.replicas) == (
        "openfaas-fn",
        "echo.openfaas-fn",
        "old:1",
        2,
    )
    assert await store.get_function("echo", "openfaas-fn") == spec
    assert await store.get_function("echo", "dev") is None
    assert [s.ref for s in await store.list_functions("openfaas-fn")] == ["echo.openfaas-fn"]
    assert await store.invocation_counts(["echo.openfaas-fn"]) == {"echo.openfaas-fn": 7}
    assert (await store.get_call("c-old")).namespace == "openfaas-fn"
    [letter] = await store.list_dead_letters("echo")
    assert (letter.call_id, letter.namespace) == ("c-dead", "openfaas-fn")
    assert await store.remove_dead_letter("c-dead")
    assert int(await raw.zcard(f"{prefix}dead-letters:fn:echo")) == 0

    # Deleting it in the default namespace removes the old record and its counter.
    await store.delete_function("echo", "openfaas-fn")
    assert await raw.hget(f"{prefix}functions", "echo") is None
    assert await raw.hget(f"{prefix}invocations", "echo") is None


@pytest_twisted.ensureDeferred
async def test_a_dead_letter_of_another_namespace_is_indexed_and_removed_by_name_dot_namespace(
    store, prefix, raw
):
    call = Call(call_id="c-ns", function="echo", namespace="dev", dead=DeadMark("max_age", 3.0))
    await store.put_dead_letter(DeadLetter(call))
    assert [d.call_id for d in await store.list_dead_letters("echo.dev")] == ["c-ns"]
    assert await store.list_dead_letters("echo") == []
    assert await store.remove_dead_letter("c-ns")
    assert int(await raw.zcard(f"{prefix}dead-letters:fn:echo.dev")) == 0


# --- secrets ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_secrets_by_namespace_create_update_delete(store, raw, prefix):
    await store.create_secret("openfaas-fn", "db", b"token-1")
    await store.create_secret("openfaas-fn", "api", b"token-2")
    await store.create_secret("dev", "db", b"token-3")
    with pytest.raises(AlreadyExists):
        await store.create_secret("openfaas-fn", "db", b"other")
    assert await store.list_secrets("openfaas-fn") == ["api", "db"]
    assert await store.list_secrets("dev") == ["db"]
    assert await store.list_secrets("none") == []
    assert await store.get_secret("openfaas-fn", "db") == b"token-1"
    await store.update_secret("openfaas-fn", "db", b"token-4")
    assert await store.get_secret("openfaas-fn", "db") == b"token-4"
    with pytest.raises(NotFound):
        await store.update_secret("openfaas-fn", "absent", b"x")
    assert await store.get_secret("openfaas-fn", "absent") is None  # an update never creates
    assert await store.missing_secrets("openfaas-fn", ["db", "absent", "api", "gone"]) == ["absent", "gone"]
    assert await store.missing_secrets("openfaas-fn", []) == []
    await store.delete_secret("dev", "db")
    with pytest.raises(NotFound):
        await store.delete_secret("dev", "db")
    assert await raw.hgetall(f"{prefix}secrets:openfaas-fn") == {"api": "token-2", "db": "token-4"}


@pytest_twisted.ensureDeferred
async def test_secrets_key_check_is_kept_once(store):
    assert await store.secrets_key_check(None) is None
    assert await store.secrets_key_check(b"first") == b"first"
    assert await store.secrets_key_check(b"second") == b"first"
    assert await store.secrets_key_check(None) == b"first"


# --- function logs ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_logs_append_in_batches_read_by_range_and_capped(store, raw, prefix):
    now = time.time()
    lines = [("fn", "openfaas-fn", now + i / 1000, b"gw-1", f"line {i} \u00e9".encode()) for i in range(1200)]
    lines.append(("other", "dev", now, b"w-1", b"elsewhere"))
    await store.append_logs(lines, 300)  # three scripts (LOG_BATCH 500), one round trip
    length = await raw.execute_command("XLEN", f"{prefix}logs:openfaas-fn:fn")
    assert 300 <= int(length) < 500  # MAXLEN ~: trimmed by whole nodes
    last = await store.last_logs("fn", "openfaas-fn", 3)
    assert [e.text for e in last] == ["line 1197 é", "line 1198 é", "line 1199 é"]
    assert last[0].instance == "gw-1"
    assert abs(last[-1].timestamp - (now + 1.199)) < 1e-6
    first = await store.read_logs("fn", "openfaas-fn", count=2)
    after = await store.read_logs("fn", "openfaas-fn", after=first[0].id, count=1)
    assert after == first[1:]
    assert await store.read_logs("fn", "openfaas-fn", after=last[-1].id, count=10) == []
    assert await store.read_logs("fn", "openfaas-fn", since=time.time() + 60, count=10) == []
    assert len(await store.read_logs("fn", "openfaas-fn", since=now - 60, count=5000)) == int(length)
    assert [e.text for e in await store.read_logs("other", "dev", count=10)] == ["elsewhere"]
    assert await store.last_logs("none", "openfaas-fn", 5) == []
    await store.delete_logs("fn", "openfaas-fn")
    assert await store.read_logs("fn", "openfaas-fn", count=10) == []
