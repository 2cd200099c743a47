"""Names, store keys and field validation shared by every model type.

Validation errors name the field, so the API's 400s say what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

NAME_RULE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")  # \Z: "$" would accept a trailing newline
MAX_NAME = 63
MAX_REPLICAS = 2**31 - 1  # Kubernetes's replicas are an int32

URL_ANNOTATION = "txfaas.url"
TIMEOUT_ANNOTATION = "txfaas.timeout"
QUEUE_ANNOTATION = "com.openfaas.queue"
DEFAULT_QUEUE = "faas-request"
#: OpenFaaS's default function namespace.  Records and messages written before namespaces
#: existed carry none and belong to it; its functions keep the keys they had then.
DEFAULT_NAMESPACE = "openfaas-fn"


class ValidationError(ValueError):
    """Bad input.  ``str()`` is one short line naming the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


def check_name(name: str, field: str = "service") -> str:
    """A function name must be a DNS-1123 label of at most 63 characters."""
    if not isinstance(name, str) or not name:
        raise ValidationError(field, "a function name is required")
    if len(name) > MAX_NAME:
        raise ValidationError(field, f"function name longer than {MAX_NAME} characters")
    if not NAME_RULE.match(name):
        raise ValidationError(
            field,
            f"invalid function name {name!r}: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit",
        )
    return name


def check_namespace(namespace: str, field: str = "namespace") -> str:
    """A namespace name must be a DNS-1123 label of at most 63 characters, as in Kubernetes."""
    if not isinstance(namespace, str) or not namespace:
        raise ValidationError(field, "a namespace name is required")
    if len(namespace) > MAX_NAME or not NAME_RULE.match(namespace):
        raise ValidationError(
            field,
            f"invalid namespace {namespace!r}: use at most {MAX_NAME} lower-case letters, digits "
            "and '-', starting and ending with a letter or digit",
        )
    return namespace


def function_ref(name: str, namespace: str) -> str:
    """``name.namespace``: a function's full name (metrics labels, ``X-Function-Name``, logs)."""
    return f"{name}.{namespace}"


def split_ref(ref: str, default_namespace: str, field: str = "function name") -> tuple[str, str]:
    """``name`` or ``name.namespace`` (as in ``/function/{ref}``) -> (name, namespace), both checked."""
    name, dot, namespace = ref.partition(".")
    check_name(name, field)
    if not dot:
        return name, default_namespace
    return name, check_namespace(namespace, field)


def store_key(name: str, namespace: str) -> str:
    """Where a function is kept: the default namespace's under the bare name, as before
    namespaces existed (so their records are still found), any other's under ``name.namespace``."""
    return name if namespace == DEFAULT_NAMESPACE else f"{name}.{namespace}"


def ref_key(ref: str) -> str:
    """The :func:`store_key` of ``name.namespace`` (or of a bare name: the default namespace's)."""
    name, _, namespace = ref.partition(".")
    return store_key(name, namespace or DEFAULT_NAMESPACE)


def key_namespace(key: str) -> str:
    """The namespace :func:`store_key` put in ``key``."""
    return key.partition(".")[2] or DEFAULT_NAMESPACE


def namespace_or(data: Mapping[str, Any], default: str) -> str:
    """A body's ``namespace``: absent or empty means ``default``."""
    value = data.get("namespace")
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ValidationError("namespace", "must be a string")
    return check_namespace(value)


def str_map(data: Mapping[str, Any], key: str) -> dict[str, str]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValidationError(key, "must be an object of strings")
    return dict(value)


def str_list(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError(key, "must be a list of strings")
    return list(value)


def str_field(data: Mapping[str, Any], key: str, default: str = "") -> str:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValidationError(key, "must be a string")
    return value


def resources_field(data: Mapping[str, Any], key: str) -> dict[str, str] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError(key, 'must be an object like {"memory": "128Mi", "cpu": "100m"}')
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(v, str):
            raise ValidationError(f"{key}.{k}", "must be a string")
        out[k] = v
    return out
