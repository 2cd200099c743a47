"""Deployed functions: faas-provider's ``FunctionDeployment`` and ``FunctionStatus`` on the wire."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

from txfaas.config import parse_duration, parse_http_url
from txfaas.model.base import (
    DEFAULT_NAMESPACE,
    DEFAULT_QUEUE,
    MAX_REPLICAS,
    QUEUE_ANNOTATION,
    TIMEOUT_ANNOTATION,
    URL_ANNOTATION,
    ValidationError,
    check_name,
    function_ref,
    key_namespace,
    namespace_or,
    resources_field,
    store_key,
    str_field,
    str_list,
    str_map,
)
from txfaas.model.namespaces import check_queue_name
from txfaas.retry import RetryConfigError, RetryPolicy


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen
class FunctionSpec:
    """A deployed function: OpenFaaS's FunctionDeployment plus ``url`` and bookkeeping."""

    service: str
    image: str = ""
    namespace: str = DEFAULT_NAMESPACE
    env_process: str = ""
    env_vars: dict[str, str] = attrs.field(factory=dict)
    labels: dict[str, str] = attrs.field(factory=dict)
    annotations: dict[str, str] = attrs.field(factory=dict)
    constraints: list[str] = attrs.field(factory=list)
    secrets: list[str] = attrs.field(factory=list)
    limits: dict[str, str] | None = None
    requests: dict[str, str] | None = None
    read_only_root_filesystem: bool = False
    url: str | None = None
    replicas: int = 1
    created_at: float = 0.0

    @classmethod
    def from_json(
        cls,
        data: Any,
        *,
        created_at: float | None = None,
        default_namespace: str = DEFAULT_NAMESPACE,
    ) -> FunctionSpec:
        """Validate a FunctionDeployment body; raise :class:`ValidationError` naming the field.

        No ``namespace`` (or an empty one) means ``default_namespace``."""
        if not isinstance(data, dict):
            raise ValidationError("", "the body must be a JSON object")
        if "service" not in data:
            raise ValidationError("service", "missing")
        service = check_name(str_field(data, "service"))
        annotations = str_map(data, "annotations")
        url = data.get("url")
        if url is None:
            url = annotations.get(URL_ANNOTATION)
            url_field = f"annotations.{URL_ANNOTATION}"
        else:
            url_field = "url"
        if url is not None:
            if not isinstance(url, str):
                raise ValidationError(url_field, "must be a string")
            try:
                url = parse_http_url(url)
            except ValueError as e:
                raise ValidationError(url_field, str(e)) from None
        rorf = data.get("readOnlyRootFilesystem", False)
        if not isinstance(rorf, bool):
            raise ValidationError("readOnlyRootFilesystem", "must be true or false")
        spec = cls(
            service=service,
            image=str_field(data, "image"),
            namespace=namespace_or(data, default_namespace),
            env_process=str_field(data, "envProcess"),
            env_vars=str_map(data, "envVars"),
            labels=str_map(data, "labels"),
            annotations=annotations,
            constraints=str_list(data, "constraints"),
            secrets=str_list(data, "secrets"),
            limits=resources_field(data, "limits"),
            requests=resources_field(data, "requests"),
            read_only_root_filesystem=rorf,
            url=url,
            created_at=time.time() if created_at is None else created_at,
        )
        # Validate derived settings now, so a bad value is a 400 at deploy time.
        spec.timeout  # noqa: B018
        spec.queue  # noqa: B018
        spec.check_retry_annotations()
        return spec

    @functools.cached_property
    def ref(self) -> str:
        """``name.namespace`` (:func:`function_ref`)."""
        return function_ref(self.service, self.namespace)

    @property
    def key(self) -> str:
        """Where the store keeps it (:func:`store_key`)."""
        return store_key(self.service, self.namespace)

    # Both are read on every call (the proxy, the async accept): computed once per record.
    @functools.cached_property
    def timeout(self) -> float | None:
        """The function's own time limit: annotation ``txfaas.timeout``, else envVars ``exec_timeout``."""
        for field, raw in (
            (f"annotations.{TIMEOUT_ANNOTATION}", self.annotations.get(TIMEOUT_ANNOTATION)),
            ("envVars.exec_timeout", self.env_vars.get("exec_timeout")),
        ):
            if raw is not None:
                try:
                    value = parse_duration(raw)
                except ValueError as e:
                    raise ValidationError(field, str(e)) from None
                return value or None
        return None

    @functools.cached_property
    def queue(self) -> str:
        """The queue its async calls go to (OpenFaaS's ``com.openfaas.queue`` annotation)."""
        name = self.annotations.get(QUEUE_ANNOTATION)
        return DEFAULT_QUEUE if name is None else check_queue_name(name)

    def check_retry_annotations(self) -> None:
        """Refuse bad ``com.openfaas.retry.*`` annotations (400 at deploy time, not a surprise later)."""
        try:
            RetryPolicy().for_function(self.annotations)
        except RetryConfigError as e:
            raise ValidationError(f"annotations.{e.field}", e.problem) from None

    def base_url(self, template: str) -> str:
        """Where the function answers: its own ``url``, else the operator's template."""
        if self.url:
            return self.url
        return template.format(name=self.service, namespace=self.namespace).rstrip("/")

    def to_record(self) -> dict[str, Any]:
        """What the store keeps."""
        data = self.deployment_json()
        data["url"] = self.url
        data["replicas"] = self.replicas
        data["createdAt"] = self.created_at
        return data

    @classmethod
    def from_record(cls, data: Mapping[str, Any], key: str | None = None) -> FunctionSpec:
        """A stored record.  The key it was found under decides its namespace: a record of the
        releases before namespaces (kept under the bare name, whatever ``namespace`` it
        carried, often none) is the default namespace's."""
        data = dict(data)
        if key is not None:
            data["namespace"] = key_namespace(key)
        spec = cls.from_json(data, created_at=float(data.get("createdAt") or 0.0))
        return attrs.evolve(spec, replicas=int(data.get("replicas", 1)))

    def deployment_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "image": self.image,
            "namespace": self.namespace,
            "envProcess": self.env_process,
            "envVars": dict(self.env_vars),
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "constraints": list(self.constraints),
            "secrets": list(self.secrets),
            "limits": self.limits,
            "requests": self.requests,
            "readOnlyRootFilesystem": self.read_only_root_filesystem,
        }

    def status_json(self, invocation_count: int = 0) -> dict[str, Any]:
        """OpenFaaS's FunctionStatus shape (what ``faas-cli list/describe`` read)."""
        data = self.deployment_json()
        del data["service"]
        return {
            "name": self.service,
            **data,
            "url": self.url,
            "replicas": self.replicas,
            "availableReplicas": self.replicas,
            "invocationCount": invocation_count,
            "createdAt": rfc3339(self.created_at),
        }


def parse_scale_request(data: Any, name: str, default_namespace: str = DEFAULT_NAMESPACE) -> tuple[str, int]:
    """``{"serviceName": name, "namespace": ns, "replicas": n}`` -> (namespace, n)."""
    if not isinstance(data, dict):
        raise ValidationError("", "the body must be a JSON object")
    service = data.get("serviceName", name)
    if service != name:
        raise ValidationError("serviceName", f"{service!r} does not match the URL's {name!r}")
    namespace = namespace_or(data, default_namespace)
    replicas = data.get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= MAX_REPLICAS:
        raise ValidationError("replicas", f"must be a whole number from 0 to {MAX_REPLICAS}")
    return namespace, replicas
