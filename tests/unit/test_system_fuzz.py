"""No bad input makes a 5xx: arbitrary JSON bodies, query values and path values thrown at every
``/system`` route of the real Klein app (in-memory store and queue, Twisted's HTTP parsing)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.gateway_fixtures import GatewayTestCase
from txfaas.gateway.app import GatewayApp

#: (rule, method) for every /system route the Klein app has: a new route is fuzzed too.
ROUTES = sorted(
    (rule.rule, method)
    for rule in GatewayApp.app.url_map.iter_rules()
    if rule.rule.startswith("/system")
    for method in rule.methods or ()
)

_BIG = st.sampled_from([10**30, -(10**30), 2**63, 2**64, -(2**63) - 1, 2**53 + 1, 10**400])
_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["\ud800", "\udfff", "a\x00b", "é", "9223372036854775808", "-1", "1e400", "NaN"]),
)
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), _BIG, st.floats(), _TEXT)
_JSON = st.recursive(
    _SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)),
    max_leaves=12,
)
_FIELDS = [
    "service",
    "image",
    "envProcess",
    "envVars",
    "labels",
    "annotations",
    "limits",
    "requests",
    "url",
    "readOnlyRootFilesystem",
    "constraints",
    "secrets",
    "functionName",
    "serviceName",
    "replicas",
]
_ANNOTATIONS = st.dictionaries(
    st.sampled_from(
        [
            "com.openfaas.queue",
            "txfaas.url",
            "txfaas.timeout",
            "com.openfaas.retry.attempts",
            "com.openfaas.retry.codes",
            "com.openfaas.retry.min_wait",
            "com.openfaas.retry.max_wait",
        ]
    ),
    _TEXT,
    max_size=3,
)
#: Objects shaped like the routes' bodies, so that validation past the first check is reached.
_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        **{field: _JSON for field in _FIELDS},
        "service": st.one_of(st.just("echo"), st.just("fuzzed"), _TEXT),
        "functionName": st.one_of(st.just("fuzzed"), _TEXT),
        "serviceName": st.one_of(st.just("echo"), _TEXT),
        "annotations": _ANNOTATIONS,
        "replicas": st.one_of(st.integers(min_value=0), _BIG, _SCALAR),
    },
)


def _deep(depth: int) -> bytes:
    return b'{"service": "deep", "labels": ' + b"[" * depth + b"]" * depth + b"}"


_BODY = st.one_of(
    st.none(),
    st.builds(lambda v: json.dumps(v).encode(), _SHAPED),
    st.builds(lambda v: json.dumps(v).encode(), _JSON),
    st.builds(_deep, st.sampled_from([100, 1000, 100_000])),
    st.builds(lambda n: b"[" * n, st.sampled_from([10, 100_000])),
    st.binary(max_size=40),
)
_QUERY = st.dictionaries(
    st.sampled_from(["offset", "limit", "function", "x"]),
    st.one_of(
        _TEXT,
        st.builds(str, st.integers()),
        st.builds(str, _BIG),
        st.sampled_from(["9223372036854775808", "18446744073709551616", "-9223372036854775809", ""]),
    ),
    max_size=3,
)
_PATH_VALUE = st.one_of(
    st.just("echo"),
    st.text(min_size=1, max_size=30),
    st.sampled_from(["..", ".", "%", "a/b", "\x00", "\ud800", "x" * 300, "ECHO", "-a-"]),
)


class Gateway(GatewayTestCase):
    pass


_CASE = Gateway()
_CASE.setUp()
_CASE.deploy("echo")


def _target(rule: str, value: str, query: dict[str, str]) -> str:
    encoded = quote(value.encode("utf-8", "surrogatepass"), safe="")
    path = rule.replace("<name>", encoded).replace("<call_id>", encoded)
    if query:
        path += "?" + "&".join(
            f"{quote(k)}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in query.items()
        )
    return path


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), value=_PATH_VALUE, query=_QUERY, body=_BODY)
def test_no_system_route_answers_5xx_to_bad_input(
    route: tuple[str, str], value: str, query: dict[str, str], body: bytes | None
) -> None:
    rule, method = route
    target = _target(rule, value, query)
    response, answer = _CASE.call(method, target, data=body)
    assert response.code < 500, (method, target, body[:100] if body else body, response.code, answer[:300])


def test_every_system_route_is_fuzzed() -> None:
    assert len(ROUTES) >= 14
    assert ("/system/functions", "POST") in ROUTES
    assert ("/system/dead-letters", "GET") in ROUTES


def _answer(method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response, answer = _CASE.call(method, path, data=data)
    return response.code, answer


def test_a_deploy_nested_100000_deep_is_a_400() -> None:
    code, answer = _answer("POST", "/system/functions", _deep(100_000))
    assert code == 400, answer
    assert b"JSON" in answer


def test_a_lone_surrogate_in_a_deploy_is_a_400() -> None:
    code, answer = _answer("POST", "/system/functions", b'{"service": "sur", "image": "\\ud800"}')
    assert code == 400, answer
    assert _CASE.successResultOf(_store_get("sur")) is None


def test_replicas_of_ten_to_the_30_is_a_400() -> None:
    code, answer = _answer("POST", "/system/scale-function/echo", {"serviceName": "echo", "replicas": 10**30})
    assert code == 400, answer
    assert b"replicas" in answer


def test_a_dead_letter_offset_past_64_bits_is_a_400() -> None:
    code, answer = _answer("GET", "/system/dead-letters?offset=9223372036854775808")
    assert code == 400, answer
    assert b"offset" in answer


def _store_get(name: str) -> Any:
    from twisted.internet import defer

    return defer.Deferred.fromCoroutine(_CASE.store.get_function(name))
