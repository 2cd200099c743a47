"""Namespaces: which exist, and ``/system/namespace[s]`` (faas-provider's FunctionNamespace)."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from txfaas.gateway.answers import json, text
from txfaas.gateway.errors import HTTPError, no_namespace
from txfaas.gateway.web import query_arg, read_json
from txfaas.model import DEFAULT_NAMESPACE, Namespace, check_namespace
from txfaas.store import AlreadyExists, NamespaceNotEmpty, NotFound


class Namespaces:
    """The built-in namespaces and those in the store; the one check every route makes."""

    def __init__(self, store: Any, default: str) -> None:
        self.store = store
        self.default = default
        #: Always exist, cannot be deleted.
        self.builtin = frozenset({DEFAULT_NAMESPACE, default})

    def of(self, request: IRequest) -> str:
        """``?namespace=``, else the default namespace."""
        given = query_arg(request, b"namespace")
        return self.default if not given else check_namespace(given)

    async def exists(self, name: str) -> bool:
        return name in self.builtin or await self.store.get_namespace(name) is not None

    async def known(self, name: str) -> str:
        """``name`` if it exists; a 400 naming it otherwise."""
        if not await self.exists(name):
            raise HTTPError(400, no_namespace(name))
        return name


class NamespacesAPI:
    """``/system/namespaces`` and ``/system/namespace/{name}``: list, create, read, update, delete."""

    log = Logger()

    def __init__(self, namespaces: Namespaces) -> None:
        self._namespaces = namespaces
        self._store = namespaces.store

    async def list(self, request: IRequest) -> bytes:
        """The names, as a JSON list (what ``faas-cli namespaces`` reads)."""
        stored = {ns.name for ns in await self._store.list_namespaces()}
        return json(request, 200, sorted(stored | self._namespaces.builtin))

    async def create(self, request: IRequest, name: str | None) -> bytes:
        """faas-cli posts to ``/system/namespace/`` with the name in the body (``name`` None)."""
        if name is not None:
            check_namespace(name, "name")
        namespace = Namespace.from_json(read_json(request), name)
        exists = HTTPError(409, f"namespace {namespace.name!r} already exists: use PUT to update it")
        if namespace.name in self._namespaces.builtin:
            raise exists
        try:
            await self._store.create_namespace(namespace)
        except AlreadyExists:
            raise exists from None
        self.log.info("created namespace {namespace}", namespace=namespace.name)
        return text(request, 201, f"namespace {namespace.name!r} created")

    async def get(self, request: IRequest, name: str) -> bytes:
        check_namespace(name, "name")
        namespace = await self._store.get_namespace(name)
        if namespace is None:
            if name not in self._namespaces.builtin:
                raise HTTPError(404, f"namespace {name!r} not found")
            namespace = Namespace(name, {"openfaas": "1"})
        return json(request, 200, namespace.to_json())

    async def update(self, request: IRequest, name: str) -> bytes:
        """Replace its labels and annotations."""
        check_namespace(name, "name")
        namespace = Namespace.from_json(read_json(request), name)
        if not await self._namespaces.exists(name):
            raise HTTPError(404, f"namespace {name!r} not found")
        await self._store.put_namespace(namespace)
        self.log.info("updated namespace {namespace}", namespace=name)
        return text(request, 202, f"namespace {name!r} updated")

    async def delete(self, request: IRequest, name: str) -> bytes:
        check_namespace(name, "name")
        if name in self._namespaces.builtin:
            raise HTTPError(400, f"namespace {name!r} is built in: it cannot be deleted")
        try:
            await self._store.delete_namespace(name)
        except NotFound:
            raise HTTPError(404, f"namespace {name!r} not found") from None
        except NamespaceNotEmpty:
            raise HTTPError(409, f"namespace {name!r} still holds functions: remove them first") from None
        self.log.info("deleted namespace {namespace}", namespace=name)
        return text(request, 202, f"namespace {name!r} deleted")
