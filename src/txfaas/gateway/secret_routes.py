"""``/system/secrets``: secrets sealed with the gateway's key, their names listed, never their values."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from txfaas.gateway.answers import json, text
from txfaas.gateway.errors import HTTPError
from txfaas.gateway.namespaces import Namespaces
from txfaas.gateway.web import read_json
from txfaas.secrets import SecretBox, SecretRequest
from txfaas.store import AlreadyExists, NotFound


class SecretsAPI:
    """List, create, update and remove the secrets of a namespace."""

    log = Logger()

    def __init__(self, store: Any, namespaces: Namespaces, box: SecretBox) -> None:
        self._store = store
        self._namespaces = namespaces
        self.box = box

    async def _secret_request(self, request: IRequest, *, value_required: bool) -> SecretRequest:
        secret = SecretRequest.from_json(
            read_json(request),
            value_required=value_required,
            default_namespace=self._namespaces.default,
        )
        await self._namespaces.known(secret.namespace)
        return secret

    async def list(self, request: IRequest) -> bytes:
        """Names only, never values (faas-provider's ``Secret`` with ``value`` left out)."""
        namespace = await self._namespaces.known(self._namespaces.of(request))
        names = await self._store.list_secrets(namespace)
        return json(request, 200, [{"name": name, "namespace": namespace} for name in names])

    async def create(self, request: IRequest) -> bytes:
        box = self.box
        secret = await self._secret_request(request, value_required=True)
        sealed = box.seal(secret.namespace, secret.name, secret.value or b"")
        # The first secret marks the store with this key: a later start with another is refused.
        kept = await self._store.secrets_key_check(box.check_token())
        if kept is not None and not box.opens(kept):
            raise HTTPError(503, "secrets unavailable: the store's secrets were sealed with another key")
        try:
            await self._store.create_secret(secret.namespace, secret.name, sealed)
        except AlreadyExists:
            raise HTTPError(
                409,
                f"secret {secret.name!r} already exists in namespace {secret.namespace!r}: "
                "use PUT to update it",
            ) from None
        self.log.info("created secret {namespace}/{name}", namespace=secret.namespace, name=secret.name)
        return text(request, 201, f"secret {secret.name!r} created")

    async def update(self, request: IRequest) -> bytes:
        secret = await self._secret_request(request, value_required=True)
        sealed = self.box.seal(secret.namespace, secret.name, secret.value or b"")
        try:
            await self._store.update_secret(secret.namespace, secret.name, sealed)
        except NotFound:
            raise HTTPError(
                404, f"secret {secret.name!r} not found in namespace {secret.namespace!r}"
            ) from None
        self.log.info("updated secret {namespace}/{name}", namespace=secret.namespace, name=secret.name)
        return text(request, 200, f"secret {secret.name!r} updated")

    async def remove(self, request: IRequest) -> bytes:
        secret = await self._secret_request(request, value_required=False)
        try:
            await self._store.delete_secret(secret.namespace, secret.name)
        except NotFound:
            raise HTTPError(
                404, f"secret {secret.name!r} not found in namespace {secret.namespace!r}"
            ) from None
        self.log.info("removed secret {namespace}/{name}", namespace=secret.namespace, name=secret.name)
        return text(request, 200, f"secret {secret.name!r} removed")
