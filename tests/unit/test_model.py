"""txfaas.model: OpenFaaS shapes on the wire, validation naming the field, lossless round trips."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txfaas import headers
from txfaas.model import (
    DEFAULT_QUEUE,
    Call,
    CallRecord,
    CallResult,
    CallStatus,
    FunctionSpec,
    ValidationError,
    check_name,
    outcome_status,
    parse_scale_request,
)

# --- check_name ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "f", "0", "007", "fn-1", "a" * 63, "a-b-c", "9lives"])
def test_check_name_accepts_dns_1123_labels_up_to_63_characters(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "a" * 64, "Foo", "-a", "a-", "a_b", "a.b", "a b", "a\n", "\na", "é", "a/b", None, 5],
)
def test_check_name_refuses_what_is_not_a_dns_1123_label_naming_the_field(name):
    with pytest.raises(ValidationError) as info:
        check_name(name, field="functionName")
    assert info.value.field == "functionName"
    assert str(info.value).startswith("functionName: ")


def test_check_name_field_defaults_to_service():
    with pytest.raises(ValidationError) as info:
        check_name("Foo")
    assert info.value.field == "service"


@given(st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True))
def test_check_name_accepts_every_dns_1123_label(name):
    assert check_name(name) == name


@given(st.text(max_size=70))
def test_check_name_accepts_exactly_the_dns_1123_labels(name):
    is_label = bool(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)) and len(name) <= 63
    try:
        check_name(name)
    except ValidationError:
        assert not is_label
    else:
        assert is_label


# --- FunctionSpec.from_json validation ----------------------------------------------------------


def deploy(**fields):
    return FunctionSpec.from_json({"service": "fn", **fields}, created_at=0.0)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"envVars": {"A": 1}}, "envVars"),
        ({"envVars": ["A=1"]}, "envVars"),
        ({"envVars": "A=1"}, "envVars"),
        ({"labels": {"a": True}}, "labels"),
        ({"labels": []}, "labels"),
        ({"annotations": {"a": None}}, "annotations"),
        ({"annotations": "x"}, "annotations"),
        ({"constraints": "node.role==worker"}, "constraints"),
        ({"constraints": [1]}, "constraints"),
        ({"secrets": {"a": "b"}}, "secrets"),
        ({"secrets": [None]}, "secrets"),
        ({"limits": "128Mi"}, "limits"),
        ({"limits": {"memory": 128}}, "limits.memory"),
        ({"requests": {"cpu": 0.1}}, "requests.cpu"),
        ({"readOnlyRootFilesystem": "true"}, "readOnlyRootFilesystem"),
        ({"readOnlyRootFilesystem": 1}, "readOnlyRootFilesystem"),
        ({"image": 5}, "image"),
        ({"namespace": ["x"]}, "namespace"),
        ({"envProcess": {}}, "envProcess"),
        ({"url": "ftp://fn.example/"}, "url"),
        ({"url": "/relative"}, "url"),
        ({"url": 8080}, "url"),
        ({"annotations": {"txfaas.url": "file:///etc/passwd"}}, "annotations.txfaas.url"),
        ({"annotations": {"txfaas.timeout": "soon"}}, "annotations.txfaas.timeout"),
        ({"annotations": {"txfaas.timeout": "-5s"}}, "annotations.txfaas.timeout"),
        ({"envVars": {"exec_timeout": "10x"}}, "envVars.exec_timeout"),
        ({"envVars": {"exec_timeout": "-1"}}, "envVars.exec_timeout"),
        ({"annotations": {"com.openfaas.queue": "bad queue"}}, "annotations.com.openfaas.queue"),
        ({"annotations": {"com.openfaas.queue": ""}}, "annotations.com.openfaas.queue"),
        ({"annotations": {"com.openfaas.queue": "-dash-first"}}, "annotations.com.openfaas.queue"),
        ({"service": "Bad_Name"}, "service"),
        ({"service": 5}, "service"),
        ({"service": ""}, "service"),
    ],
)
def test_from_json_refuses_wrong_typed_fields_naming_the_field(fields, field):
    with pytest.raises(ValidationError) as info:
        deploy(**fields)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert "\n" not in str(info.value)


def test_from_json_refuses_a_body_that_is_not_an_object():
    for body in ([], "fn", None, 5):
        with pytest.raises(ValidationError):
            FunctionSpec.from_json(body)


def test_from_json_refuses_a_missing_service():
    with pytest.raises(ValidationError) as info:
        FunctionSpec.from_json({"image": "x"})
    assert info.value.field == "service"


def test_from_json_reads_the_openfaas_function_deployment_shape():
    spec = FunctionSpec.from_json(
        {
            "service": "nodeinfo",
            "image": "ghcr.io/openfaas/nodeinfo:1.10",
            "namespace": "openfaas-fn",
            "envProcess": "node index.js",
            "envVars": {"write_debug": "true"},
            "labels": {"com.openfaas.scale.min": "1"},
            "annotations": {"topic": "cron"},
            "constraints": ["node.platform.os == linux"],
            "secrets": ["api-key"],
            "limits": {"memory": "128Mi"},
            "requests": {"cpu": "100m"},
            "readOnlyRootFilesystem": True,
            "url": "http://nodeinfo.local:8080/",
        },
        created_at=12.5,
    )
    assert spec == FunctionSpec(
        service="nodeinfo",
        image="ghcr.io/openfaas/nodeinfo:1.10",
        namespace="openfaas-fn",
        env_process="node index.js",
        env_vars={"write_debug": "true"},
        labels={"com.openfaas.scale.min": "1"},
        annotations={"topic": "cron"},
        constraints=["node.platform.os == linux"],
        secrets=["api-key"],
        limits={"memory": "128Mi"},
        requests={"cpu": "100m"},
        read_only_root_filesystem=True,
        url="http://nodeinfo.local:8080",
        created_at=12.5,
    )


def test_from_json_treats_null_fields_as_absent():
    spec = deploy(image=None, envVars=None, labels=None, constraints=None, limits=None, url=None)
    assert (spec.image, spec.env_vars, spec.labels, spec.constraints, spec.limits, spec.url) == (
        "",
        {},
        {},
        [],
        None,
        None,
    )


def test_url_annotation_is_the_url_when_no_url_field():
    assert deploy(annotations={"txfaas.url": "https://fn.example/base/"}).url == "https://fn.example/base"


def test_url_field_wins_over_url_annotation():
    spec = deploy(url="http://a.example", annotations={"txfaas.url": "http://b.example"})
    assert spec.url == "http://a.example"


@pytest.mark.parametrize(
    ("annotations", "env_vars", "timeout"),
    [
        ({}, {}, None),
        ({"txfaas.timeout": "30s"}, {}, 30.0),
        ({}, {"exec_timeout": "1m30s"}, 90.0),
        ({"txfaas.timeout": "5s"}, {"exec_timeout": "60s"}, 5.0),
        ({}, {"exec_timeout": "0"}, None),
        ({}, {"exec_timeout": "2.5"}, 2.5),
    ],
)
def test_timeout_comes_from_annotation_else_exec_timeout_and_zero_means_none(annotations, env_vars, timeout):
    assert deploy(annotations=annotations, envVars=env_vars).timeout == timeout


def test_queue_defaults_to_faas_request_and_follows_the_openfaas_annotation():
    assert deploy().queue == DEFAULT_QUEUE == "faas-request"
    assert deploy(annotations={"com.openfaas.queue": "slow-queue"}).queue == "slow-queue"


@pytest.mark.parametrize(
    ("url", "template", "expected"),
    [
        (None, "http://{name}.{namespace}:8080/", "http://fn.openfaas-fn:8080"),
        (None, "http://127.0.0.1:9000/function/{name}", "http://127.0.0.1:9000/function/fn"),
        ("http://own.example:1234", "http://{name}:8080", "http://own.example:1234"),
    ],
)
def test_base_url_is_the_own_url_else_the_template_filled_in(url, template, expected):
    spec = FunctionSpec(service="fn", namespace="openfaas-fn", url=url)
    assert spec.base_url(template) == expected


# --- records and status -------------------------------------------------------------------------

_text = st.text(max_size=12)
_str_map = st.dictionaries(_text, _text, max_size=4)
_name = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
_specs = st.builds(
    FunctionSpec,
    service=_name,
    image=_text,
    namespace=st.just("openfaas-fn") | _name,
    env_process=_text,
    env_vars=_str_map.filter(lambda d: "exec_timeout" not in d),
    labels=_str_map,
    annotations=_str_map.filter(
        lambda d: not {"txfaas.url", "txfaas.timeout", "com.openfaas.queue"} & set(d)
    ),
    constraints=st.lists(_text, max_size=3),
    secrets=st.lists(_text, max_size=3),
    limits=st.none() | _str_map,
    requests=st.none() | _str_map,
    read_only_root_filesystem=st.booleans(),
    url=st.none() | st.sampled_from(["http://fn.example:8080", "https://fn.example/base"]),
    replicas=st.integers(0, 1000),
    created_at=st.floats(0, 4e9, allow_nan=False),
)


@given(_specs)
def test_to_record_from_record_round_trips_through_json(spec):
    assert FunctionSpec.from_record(json.loads(json.dumps(spec.to_record()))) == spec
    assert FunctionSpec.from_record(json.loads(json.dumps(spec.to_record())), spec.key) == spec


def test_from_record_validates_like_from_json():
    record = deploy().to_record()
    record["envVars"] = {"A": 1}
    with pytest.raises(ValidationError):
        FunctionSpec.from_record(record)


FUNCTION_STATUS_KEYS = {
    "name",
    "image",
    "namespace",
    "envProcess",
    "envVars",
    "labels",
    "annotations",
    "replicas",
    "availableReplicas",
    "invocationCount",
    "createdAt",
}


def test_status_json_has_the_openfaas_function_status_keys():
    spec = FunctionSpec(
        service="fn",
        image="img:1",
        namespace="ns",
        env_process="cat",
        env_vars={"a": "b"},
        replicas=3,
        created_at=1700000000.75,
    )
    status = spec.status_json(invocation_count=42)
    assert FUNCTION_STATUS_KEYS <= set(status)
    assert "service" not in status
    assert status["name"] == "fn"
    assert (status["image"], status["namespace"], status["envProcess"]) == ("img:1", "ns", "cat")
    assert status["envVars"] == {"a": "b"}
    assert (status["replicas"], status["availableReplicas"], status["invocationCount"]) == (3, 3, 42)
    assert status["createdAt"] == "2023-11-14T22:13:20Z"
    json.dumps(status)


@given(st.floats(0, 4e9, allow_nan=False))
def test_status_json_created_at_is_rfc3339_utc(ts):
    created = FunctionSpec(service="fn", created_at=ts).status_json()["createdAt"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created)


# --- Call ---------------------------------------------------------------------------------------

_header_bytes = st.binary(min_size=1, max_size=20)
_calls = st.builds(
    Call,
    call_id=st.uuids().map(str),
    function=_name,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    path=st.text(max_size=20),
    query=st.text(max_size=20),
    headers=st.lists(st.tuples(_header_bytes, st.binary(max_size=30)), max_size=5).map(headers.to_str_pairs),
    body=st.binary(max_size=200),
    callback_url=st.none() | st.just("https://hooks.example/cb"),
    accepted_at=st.floats(0, 4e9, allow_nan=False),
    queue=st.sampled_from([DEFAULT_QUEUE, "slow"]),
    attempt=st.integers(1, 20),
)


@given(_calls)
def test_call_encode_meta_decode_round_trips_with_raw_body(call):
    meta = call.encode_meta()
    assert isinstance(meta, bytes)
    assert Call.decode(meta, call.body) == call
    assert Call.decode(meta.decode(), call.body) == call
    assert Call.from_meta(json.loads(meta), call.body) == call


def test_call_keeps_non_utf8_header_bytes_and_binary_body_through_the_queue():
    raw = [(b"X-Bin", b"\xff\xfe\x00\x80"), (b"Content-Type", b"application/octet-stream")]
    body = bytes(range(256))
    call = Call(call_id="c1", function="fn", headers=headers.to_str_pairs(raw), body=body)
    decoded = Call.decode(call.encode_meta(), body)
    assert headers.to_bytes_pairs(decoded.headers) == raw
    assert decoded.body == body


def test_call_meta_is_versioned_json_without_the_body():
    call = Call(call_id="c1", function="fn", body=b"secret payload")
    meta = call.meta()
    assert meta["v"] == 1
    assert meta["callId"] == "c1"
    assert b"secret payload" not in call.encode_meta()


@pytest.mark.parametrize(
    "meta",
    [
        b"not json",
        b"[1, 2]",
        b'"x"',
        b"{}",
        b'{"callId": "c1"}',
        b'{"callId": "c", "function": "f", "headers": 5}',
        b'{"callId": "c", "function": "f", "headers": [["a"]]}',
        b'{"callId": "c", "function": "f", "attempt": "x"}',
    ],
)
def test_call_decode_refuses_what_is_not_a_txfaas_call(meta):
    with pytest.raises(ValidationError) as info:
        Call.decode(meta, b"")
    assert info.value.field == "message"


# --- CallRecord / CallResult --------------------------------------------------------------------

_opt_float = st.none() | st.floats(0, 4e9, allow_nan=False)
_records = st.builds(
    CallRecord,
    call_id=st.uuids().map(str),
    function=_name,
    status=st.sampled_from(
        [CallStatus.QUEUED, CallStatus.RUNNING, CallStatus.RETRYING, *sorted(CallStatus.FINAL)]
    ),
    status_code=st.none() | st.integers(100, 599),
    attempts=st.integers(0, 50),
    max_attempts=st.none() | st.integers(1, 50),
    accepted_at=st.floats(0, 4e9, allow_nan=False),
    started_at=_opt_float,
    finished_at=_opt_float,
    duration=_opt_float,
    next_attempt_at=_opt_float,
    callback_url=st.none() | st.just("https://hooks.example/cb"),
    callback_state=st.sampled_from([None, "pending", "delivered", "failed"]),
    callback_attempts=st.integers(0, 10),
    callback_status=st.none() | st.integers(100, 599),
    error=st.none() | st.text(max_size=30),
    queue=st.sampled_from([DEFAULT_QUEUE, "slow"]),
)


@given(_records)
def test_call_record_json_round_trips(record):
    assert CallRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


def test_call_record_final_is_true_only_for_final_statuses():
    assert not CallRecord("c", "f", status=CallStatus.QUEUED).final
    assert not CallRecord("c", "f", status=CallStatus.RETRYING).final
    for status in CallStatus.FINAL:
        assert CallRecord("c", "f", status=status).final


def test_call_record_for_call_is_queued_with_pending_callback_only_when_a_callback_url_is_set():
    call = Call(call_id="c1", function="fn", accepted_at=5.0, queue="slow", callback_url="https://h.example/")
    record = CallRecord.for_call(call)
    assert (record.call_id, record.function, record.status, record.accepted_at, record.queue) == (
        "c1",
        "fn",
        CallStatus.QUEUED,
        5.0,
        "slow",
    )
    assert (record.callback_url, record.callback_state) == ("https://h.example/", "pending")
    assert CallRecord.for_call(Call(call_id="c2", function="fn")).callback_state is None


@given(
    st.builds(
        CallResult,
        status_code=st.integers(100, 599),
        headers=st.lists(st.tuples(_header_bytes, st.binary(max_size=30)), max_size=4).map(
            headers.to_str_pairs
        ),
        body=st.binary(max_size=300),
        truncated=st.booleans(),
    )
)
def test_call_result_json_round_trips_binary_body(result):
    encoded = json.dumps(result.to_json())
    assert CallResult.from_json(json.loads(encoded)) == result


# --- outcome_status / parse_scale_request -------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (200, CallStatus.SUCCEEDED),
        (202, CallStatus.SUCCEEDED),
        (204, CallStatus.SUCCEEDED),
        (302, CallStatus.SUCCEEDED),
        (399, CallStatus.SUCCEEDED),
        (400, CallStatus.FAILED),
        (404, CallStatus.FAILED),
        (500, CallStatus.FAILED),
        (502, CallStatus.FAILED),
        (503, CallStatus.FAILED),
        (504, CallStatus.TIMED_OUT),
        (101, CallStatus.FAILED),
    ],
)
def test_outcome_status_maps_http_status_to_record_status(code, status):
    assert outcome_status(code) == status


def test_parse_scale_request_returns_the_namespace_and_replicas():
    assert parse_scale_request({"serviceName": "fn", "replicas": 3}, "fn") == ("openfaas-fn", 3)
    assert parse_scale_request({"replicas": 0}, "fn", "dev") == ("dev", 0)
    assert parse_scale_request({"serviceName": "fn", "namespace": "staging", "replicas": 2}, "fn") == (
        "staging",
        2,
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"serviceName": "other", "replicas": 1}, "serviceName"),
        ({"serviceName": "fn"}, "replicas"),
        ({"serviceName": "fn", "replicas": -1}, "replicas"),
        ({"serviceName": "fn", "replicas": "2"}, "replicas"),
        ({"serviceName": "fn", "replicas": 1.5}, "replicas"),
        ({"serviceName": "fn", "replicas": True}, "replicas"),
        ({"serviceName": "fn", "replicas": None}, "replicas"),
        ([], ""),
        ("fn", ""),
    ],
)
def test_parse_scale_request_refuses_bad_bodies_naming_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        parse_scale_request(body, "fn")
    assert info.value.field == field


def test_validation_error_is_a_value_error_with_field_and_problem():
    error = ValidationError("envVars", "must be an object of strings")
    assert isinstance(error, ValueError)
    assert (error.field, error.problem, str(error)) == (
        "envVars",
        "must be an object of strings",
        "envVars: must be an object of strings",
    )
