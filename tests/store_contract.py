"""What every function and namespace store must do with namespaces: run against the in-memory
store (tests/unit/test_namespaces.py) and the Redis store (tests/integration/test_redis_store.py),
the latter on the accelerated and on the stock txredisapi path (the ``accel`` fixture)."""

from __future__ import annotations

from typing import Any

import pytest

from txfaas import _accel
from txfaas.model import FunctionSpec, Namespace
from txfaas.store import AlreadyExists, NamespaceNotEmpty, NotFound, UnknownNamespace


@pytest.fixture(name="accel", params=["accel", "stock"])
def accel_fixture(request: Any, monkeypatch: Any) -> Any:
    """Whether the Redis store made under this fixture takes txfaas._accel.redis (``accel``) or
    txredisapi's own pool handler (``stock``, as with ``TXFAAS_ACCEL=0``)."""
    if request.param == "stock":
        monkeypatch.setenv(_accel.ENV, "0")
    else:
        monkeypatch.delenv(_accel.ENV, raising=False)
    _accel.reset()
    yield request.param == "accel"
    _accel.reset()


def spec(name: str, namespace: str = "openfaas-fn", **kwargs: Any) -> FunctionSpec:
    return FunctionSpec(service=name, namespace=namespace, image=f"example/{name}:{namespace}", **kwargs)


async def same_name_in_two_namespaces_is_two_functions(store: Any) -> None:
    await store.create_namespace(Namespace("dev"))
    await store.create_function(spec("echo"))
    await store.create_function(spec("echo", "dev"), check_namespace=True)
    default = await store.get_function("echo")
    dev = await store.get_function("echo", "dev")
    assert (default.namespace, default.image) == ("openfaas-fn", "example/echo:openfaas-fn")
    assert (dev.namespace, dev.image) == ("dev", "example/echo:dev")
    assert [s.ref for s in await store.list_functions()] == ["echo.openfaas-fn", "echo.dev"]
    assert [s.ref for s in await store.list_functions("dev")] == ["echo.dev"]
    assert [s.ref for s in await store.list_functions("openfaas-fn")] == ["echo.openfaas-fn"]

    await store.add_invocations({"echo.dev": 2, "echo.openfaas-fn": 5})
    assert await store.invocation_counts(["echo.dev", "echo.openfaas-fn"]) == {
        "echo.dev": 2,
        "echo.openfaas-fn": 5,
    }
    await store.scale_function("echo", 3, "dev")
    assert (await store.get_function("echo", "dev")).replicas == 3
    assert (await store.get_function("echo")).replicas == 1
    await store.update_function(spec("echo", "dev", env_process="cat"))
    assert (await store.get_function("echo", "dev")).env_process == "cat"
    assert (await store.get_function("echo")).env_process == ""

    # Removing one leaves the other (and its counter) alone.
    await store.delete_function("echo", "dev")
    assert await store.get_function("echo", "dev") is None
    assert (await store.get_function("echo")).image == "example/echo:openfaas-fn"
    assert await store.invocation_counts(["echo.dev", "echo.openfaas-fn"]) == {
        "echo.dev": 0,
        "echo.openfaas-fn": 5,
    }
    with pytest.raises(NotFound):
        await store.delete_function("echo", "dev")
    with pytest.raises(NotFound):
        await store.scale_function("echo", 1, "dev")


async def a_function_needs_its_namespace_when_asked(store: Any) -> None:
    with pytest.raises(UnknownNamespace):
        await store.create_function(spec("echo", "nowhere"), check_namespace=True)
    assert await store.get_function("echo", "nowhere") is None
    await store.create_namespace(Namespace("somewhere"))
    await store.create_function(spec("echo", "somewhere"), check_namespace=True)
    with pytest.raises(AlreadyExists):
        await store.create_function(spec("echo", "somewhere"), check_namespace=True)


async def namespaces_are_created_read_replaced_and_deleted(store: Any) -> None:
    assert await store.list_namespaces() == []
    assert await store.get_namespace("dev") is None
    dev = Namespace("dev", {"openfaas": "1"}, {"owner": "me"})
    await store.create_namespace(dev)
    with pytest.raises(AlreadyExists):
        await store.create_namespace(Namespace("dev"))
    assert await store.get_namespace("dev") == dev
    await store.create_namespace(Namespace("a-team"))
    assert [n.name for n in await store.list_namespaces()] == ["a-team", "dev"]
    await store.put_namespace(Namespace("dev", {"openfaas": "1", "tier": "2"}))
    assert (await store.get_namespace("dev")).labels == {"openfaas": "1", "tier": "2"}
    assert (await store.get_namespace("dev")).annotations == {}

    # A namespace that holds a function is not deleted; once empty it is.
    await store.create_function(spec("fn", "dev"), check_namespace=True)
    with pytest.raises(NamespaceNotEmpty):
        await store.delete_namespace("dev")
    assert await store.get_namespace("dev") is not None
    await store.delete_function("fn", "dev")
    await store.delete_namespace("dev")
    assert await store.get_namespace("dev") is None
    with pytest.raises(NotFound):
        await store.delete_namespace("dev")
    # A function of another namespace whose name ends like this one does not count.
    await store.create_namespace(Namespace("team"))
    await store.create_function(spec("x", "a-team"), check_namespace=True)
    await store.delete_namespace("team")


CONTRACT = [
    same_name_in_two_namespaces_is_two_functions,
    a_function_needs_its_namespace_when_asked,
    namespaces_are_created_read_replaced_and_deleted,
]
