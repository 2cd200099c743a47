"""The things txfaas stores and queues: functions, namespaces, calls and call records.

Pure: JSON in, JSON out, validation with messages that name the field. The OpenFaaS shapes
(faas-provider's ``FunctionDeployment`` and ``FunctionStatus``) are kept on the wire so
faas-cli works unchanged. Split by job into :mod:`.base` (names, keys, field checks),
:mod:`.namespaces`, :mod:`.functions` and :mod:`.calls`; every name is importable from here.
"""

from __future__ import annotations

from txfaas.model.base import (
    DEFAULT_NAMESPACE,
    DEFAULT_QUEUE,
    MAX_NAME,
    MAX_REPLICAS,
    NAME_RULE,
    QUEUE_ANNOTATION,
    TIMEOUT_ANNOTATION,
    URL_ANNOTATION,
    ValidationError,
    check_name,
    check_namespace,
    function_ref,
    key_namespace,
    ref_key,
    split_ref,
    store_key,
)
from txfaas.model.calls import (
    Call,
    CallbackJob,
    CallbackState,
    CallRecord,
    CallResult,
    CallStatus,
    DeadLetter,
    DeadMark,
    DeadReason,
    Headers,
    outcome_status,
)
from txfaas.model.functions import FunctionSpec, parse_scale_request, rfc3339
from txfaas.model.namespaces import Namespace, ReservedQueues, check_queue_name

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_QUEUE",
    "MAX_NAME",
    "MAX_REPLICAS",
    "NAME_RULE",
    "QUEUE_ANNOTATION",
    "TIMEOUT_ANNOTATION",
    "URL_ANNOTATION",
    "Call",
    "CallRecord",
    "CallResult",
    "CallStatus",
    "CallbackJob",
    "CallbackState",
    "DeadLetter",
    "DeadMark",
    "DeadReason",
    "FunctionSpec",
    "Headers",
    "Namespace",
    "ReservedQueues",
    "ValidationError",
    "check_name",
    "check_namespace",
    "check_queue_name",
    "function_ref",
    "key_namespace",
    "outcome_status",
    "parse_scale_request",
    "ref_key",
    "rfc3339",
    "split_ref",
    "store_key",
]
