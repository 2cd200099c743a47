"""Function namespaces and the queue names a function may not take."""

from __future__ import annotations

import re
from typing import Any

import attrs

from txfaas.model.base import QUEUE_ANNOTATION, ValidationError, check_namespace, str_map


@attrs.frozen
class Namespace:
    """A function namespace: faas-provider's ``FunctionNamespace``."""

    name: str
    labels: dict[str, str] = attrs.field(factory=dict)
    annotations: dict[str, str] = attrs.field(factory=dict)

    @classmethod
    def from_json(cls, data: Any, name: str | None = None) -> Namespace:
        """Validate a ``{name, labels, annotations}`` body; ``name`` is the URL's, if it has one."""
        if not isinstance(data, dict):
            raise ValidationError("", "the body must be a JSON object")
        given = data.get("name")
        if given is None or given == "":
            if name is None:
                raise ValidationError("name", "missing")
            given = name
        if not isinstance(given, str):
            raise ValidationError("name", "must be a string")
        check_namespace(given, "name")
        if name is not None and given != name:
            raise ValidationError("name", f"{given!r} does not match the URL's {name!r}")
        return cls(given, str_map(data, "labels"), str_map(data, "annotations"))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "labels": dict(self.labels), "annotations": dict(self.annotations)}


def check_queue_name(name: str, field: str = "annotations.com.openfaas.queue") -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}", name):
        raise ValidationError(field, f"invalid queue name {name!r}")
    return name


@attrs.frozen
class ReservedQueues:
    """Queue names a function may not take: RabbitMQ's own (``amq.*``: 403 on declare) and the
    worker's internal ones -- its dead-letter and callback queues, and everything under its
    retry prefix (``<prefix>.retry``, ``<prefix>.delay.<ms>``).  Gateway and worker read the
    same flags (--retry-prefix, --dead-letter-queue, --callback-queue)."""

    prefix: str = "txfaas"
    dead_letter_queue: str = "txfaas.dead-letter"
    callback_queue: str = "txfaas.callbacks"

    def refusal(self, name: str) -> str | None:
        """Why ``name`` may not be a function's queue, or None."""
        if name.lower().startswith("amq."):
            return f"queue {name!r}: names starting with 'amq.' are reserved by RabbitMQ"
        if name == self.dead_letter_queue:
            return f"queue {name!r} is the worker's dead-letter queue (--dead-letter-queue)"
        if name == self.callback_queue:
            return f"queue {name!r} is the worker's callback queue (--callback-queue)"
        if name.startswith(self.prefix + "."):
            return (
                f"queue {name!r}: names under {self.prefix + '.'!r} are the worker's retry exchange "
                "and delay queues (--retry-prefix)"
            )
        return None

    def check(self, name: str, field: str = f"annotations.{QUEUE_ANNOTATION}") -> str:
        reason = self.refusal(name)
        if reason is not None:
            raise ValidationError(field, reason)
        return name
