"""Secrets: /system/secrets in OpenFaaS's shapes, sealed at rest, the key file, and deploy's check."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet
from twisted.internet import defer
from twisted.internet.task import Clock

from tests.support import failureResultOf, successResultOf
from tests.unit.gateway_fixtures import GatewayTestCase, set_up
from txfaas.gateway.service import GatewayService
from txfaas.model import ValidationError
from txfaas.secrets import (
    KeyFileError,
    SecretBox,
    SecretRequest,
    SecretUnreadable,
    check_secret_name,
    load_or_create_key,
)
from txfaas.service import StartupError
from txfaas.store.cache import FunctionCache
from txfaas.store.memory import MemoryStore

KEY = Fernet.generate_key()


def js(body: bytes) -> Any:
    return json.loads(body)


class SecretsTestCase(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.box = SecretBox(KEY)
        self.build(secret_box=self.box)

    def send(self, method: str, body: Any, path: str = "/system/secrets") -> tuple[Any, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.call(method, path, data=data)


@pytest.fixture
def gw() -> SecretsTestCase:
    return set_up(SecretsTestCase())


def test_create_is_201_and_list_gives_names_and_namespace_never_values(gw: SecretsTestCase) -> None:
    response, body = gw.send("POST", {"name": "db-password", "value": "s3cr3t"})
    assert response.code == 201, body
    gw.send("POST", {"name": "api-key", "namespace": "openfaas-fn", "value": "k"})
    response, body = gw.call("GET", "/system/secrets")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert js(body) == [
        {"name": "api-key", "namespace": "openfaas-fn"},
        {"name": "db-password", "namespace": "openfaas-fn"},
    ]
    assert b"s3cr3t" not in body


def test_values_are_sealed_in_the_store_and_bound_to_their_name(gw: SecretsTestCase) -> None:
    gw.send("POST", {"name": "db-password", "value": "s3cr3t"})
    token = gw.store.secrets["openfaas-fn", "db-password"]
    assert b"s3cr3t" not in token
    assert gw.box.open("openfaas-fn", "db-password", token) == b"s3cr3t"
    # The same token under another name does not open: tokens are not interchangeable.
    with pytest.raises(SecretUnreadable):
        gw.box.open("openfaas-fn", "other", token)
    with pytest.raises(SecretUnreadable):
        SecretBox(Fernet.generate_key()).open("openfaas-fn", "db-password", token)


def test_the_first_secret_marks_the_store_with_the_key_and_another_key_is_refused(
    gw: SecretsTestCase,
) -> None:
    assert gw.store.secrets_check is None
    gw.send("POST", {"name": "k", "value": "1"})
    assert gw.box.opens(gw.store.secrets_check)
    gw.build(secret_box=SecretBox(Fernet.generate_key()))
    response, body = gw.send("POST", {"name": "j", "value": "1"})
    assert response.code == 503
    assert b"sealed with another key" in body
    assert ("openfaas-fn", "j") not in gw.store.secrets


def test_raw_value_is_base64_bytes(gw: SecretsTestCase) -> None:
    raw = bytes(range(256))
    response, _ = gw.send("POST", {"name": "blob", "rawValue": base64.b64encode(raw).decode()})
    assert response.code == 201
    assert gw.box.open("openfaas-fn", "blob", gw.store.secrets["openfaas-fn", "blob"]) == raw


def test_create_twice_is_409(gw: SecretsTestCase) -> None:
    gw.send("POST", {"name": "k", "value": "1"})
    response, body = gw.send("POST", {"name": "k", "value": "2"})
    assert response.code == 409
    assert b"already exists" in body


def test_update_replaces_and_is_404_when_absent(gw: SecretsTestCase) -> None:
    response, body = gw.send("PUT", {"name": "k", "value": "1"})
    assert response.code == 404
    assert b"'k' not found" in body
    assert gw.store.secrets == {}  # an update never creates
    gw.send("POST", {"name": "k", "value": "1"})
    response, _ = gw.send("PUT", {"name": "k", "value": "2"})
    assert response.code == 200
    assert gw.box.open("openfaas-fn", "k", gw.store.secrets["openfaas-fn", "k"]) == b"2"


def test_remove_and_404_when_absent(gw: SecretsTestCase) -> None:
    gw.send("POST", {"name": "k", "value": "1"})
    response, _ = gw.send("DELETE", {"name": "k"})
    assert response.code == 200
    assert gw.store.secrets == {}
    response, body = gw.send("DELETE", {"name": "k"})
    assert response.code == 404
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]


def test_a_namespace_must_exist(gw: SecretsTestCase) -> None:
    response, body = gw.send("POST", {"name": "k", "namespace": "dev", "value": "1"})
    assert response.code == 400
    assert b"namespace 'dev' does not exist" in body
    response, _ = gw.call("GET", "/system/secrets?namespace=dev")
    assert response.code == 400
    assert gw.store.secrets == {}


def test_namespaces_keep_apart(gw: SecretsTestCase) -> None:
    response, body = gw.send("POST", {"name": "dev"}, "/system/namespace/dev")
    assert response.code // 100 == 2, body
    gw.send("POST", {"name": "k", "namespace": "dev", "value": "1"})
    _, body = gw.call("GET", "/system/secrets")
    assert js(body) == []
    _, body = gw.call("GET", "/system/secrets?namespace=dev")
    assert js(body) == [{"name": "k", "namespace": "dev"}]
    response, _ = gw.send("DELETE", {"name": "k"})
    assert response.code == 404


def test_bad_bodies_are_400_naming_the_problem(gw: SecretsTestCase) -> None:
    cases = [
        (b"", b"JSON body is required"),
        (b"{nope", b"not valid JSON"),
        ([], b"must be a JSON object"),
        ({"value": "x"}, b"name: a secret name is required"),
        ({"name": "Bad_Name", "value": "x"}, b"invalid secret name"),
        ({"name": "k"}, b"non-empty value or rawValue"),
        ({"name": "k", "value": ""}, b"non-empty value or rawValue"),
        ({"name": "k", "value": 5}, b"value: must be a string"),
        ({"name": "k", "rawValue": "@@@"}, b"rawValue: not valid base64"),
        ({"name": "k", "value": "a", "rawValue": "YQ=="}, b"not both"),
        ({"name": "k", "namespace": "Not Valid", "value": "a"}, b"invalid namespace"),
    ]
    for body, message in cases:
        response, answer = gw.send("POST", body)
        assert (response.code, message in answer) == (400, True), (body, answer)
    assert gw.store.secrets == {}
    response, answer = gw.call("GET", "/system/secrets?namespace=UPPER")
    assert response.code == 400
    assert b"invalid namespace" in answer


def test_other_methods_are_405(gw: SecretsTestCase) -> None:
    response, _ = gw.send("PATCH", {"name": "k"})
    assert response.code == 405
    assert response.headers.getRawHeaders(b"allow") == [b"GET, POST, PUT, DELETE"]


def test_store_unavailable_is_503(gw: SecretsTestCase) -> None:
    gw.store.available = False
    response, _ = gw.call("GET", "/system/secrets")
    assert response.code == 503


def test_an_app_built_without_a_key_seals_with_one_of_its_own(gw: SecretsTestCase) -> None:
    from txfaas.gateway.app import GatewayApp

    app = GatewayApp(gw.functions, gw.store, gw.queue, gw.resolver, gw.metrics)
    assert isinstance(app.secrets.box, SecretBox)
    token = app.secrets.box.seal("openfaas-fn", "k", b"v")
    assert app.secrets.box.open("openfaas-fn", "k", token) == b"v"


class _SecretsBehindAuth(SecretsTestCase):
    auth = ("admin", "pw")


@pytest.fixture
def secrets_behind_auth_gateway() -> _SecretsBehindAuth:
    return set_up(_SecretsBehindAuth())


def test_secrets_behind_auth_secrets_need_credentials(
    secrets_behind_auth_gateway: _SecretsBehindAuth,
) -> None:
    response, body = secrets_behind_auth_gateway.call("GET", "/system/secrets")
    assert response.code == 401
    creds = base64.b64encode(b"admin:pw")
    response, _ = secrets_behind_auth_gateway.call(
        "GET", "/system/secrets", headers={b"Authorization": [b"Basic " + creds]}
    )
    assert response.code == 200


class _DeployNeedsItsSecrets(SecretsTestCase):
    def deploy_json(self, method: str = "POST", **fields: Any) -> tuple[Any, bytes]:
        body = {"service": "echo", "image": "x", **fields}
        return self.send(method, body, "/system/functions")


@pytest.fixture
def deploy_needs_its_secrets_gateway() -> _DeployNeedsItsSecrets:
    return set_up(_DeployNeedsItsSecrets())


def test_deploy_naming_a_missing_secret_is_400_naming_it(
    deploy_needs_its_secrets_gateway: _DeployNeedsItsSecrets,
) -> None:
    deploy_needs_its_secrets_gateway.send("POST", {"name": "present", "value": "1"})
    response, body = deploy_needs_its_secrets_gateway.deploy_json(secrets=["present", "absent"])
    assert response.code == 400
    assert b"'absent' not found in namespace 'openfaas-fn'" in body
    assert b"'present'" not in body
    assert deploy_needs_its_secrets_gateway.store.functions == {}


def test_update_naming_a_missing_secret_is_400(
    deploy_needs_its_secrets_gateway: _DeployNeedsItsSecrets,
) -> None:
    deploy_needs_its_secrets_gateway.deploy_json()
    response, body = deploy_needs_its_secrets_gateway.deploy_json("PUT", secrets=["absent"])
    assert response.code == 400
    assert deploy_needs_its_secrets_gateway.store.functions["echo"].secrets == []


def test_the_secret_must_be_in_the_functions_namespace(
    deploy_needs_its_secrets_gateway: _DeployNeedsItsSecrets,
) -> None:
    deploy_needs_its_secrets_gateway.send("POST", {"name": "dev"}, "/system/namespace/dev")
    deploy_needs_its_secrets_gateway.send("POST", {"name": "k", "namespace": "dev", "value": "1"})
    response, _ = deploy_needs_its_secrets_gateway.deploy_json(secrets=["k"])
    assert response.code == 400
    deploy_needs_its_secrets_gateway.send("POST", {"name": "k", "value": "1"})
    response, body = deploy_needs_its_secrets_gateway.deploy_json(secrets=["k"])
    assert response.code == 202, body


def test_default_namespace_and_utf8_value() -> None:
    secret = SecretRequest.from_json({"name": "a.b-c", "value": "é"}, value_required=True)
    assert (secret.name, secret.namespace, secret.value) == ("a.b-c", "openfaas-fn", "é".encode())


def test_names_follow_faas_cli_rule() -> None:
    for good in ["a", "a.b", "a-b.c1", "x" * 253]:
        assert check_secret_name(good) == good
    for bad in ["", "A", "-a", "a-", "a..b", ".a", "a_b", "a\n", "x" * 254, None, 3]:
        with pytest.raises(ValidationError):
            check_secret_name(bad)
            pytest.fail(f"no ValidationError for {bad!r}")


@pytest.fixture
def key_path() -> Iterator[str]:
    """Where the key file goes: ``<tmp>/dir/state/secrets.key``, none of which exists yet."""
    base = tempfile.mkdtemp(prefix="txfaas-keytest-")
    try:
        yield os.path.join(base, "dir", "state", "secrets.key")
    finally:
        shutil.rmtree(base, True)


def test_generated_with_mode_0600_then_kept(key_path: str) -> None:
    key, created = load_or_create_key(key_path)
    assert created
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(key_path)).st_mode) == 0o700
    Fernet(key)
    again, created = load_or_create_key(key_path)
    assert (again, created) == (key, False)
    assert os.listdir(os.path.dirname(key_path)) == ["secrets.key"]  # no temp file left


def test_concurrent_first_starts_agree_on_one_key(key_path: str) -> None:
    keys: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: keys.append(load_or_create_key(key_path)[0])) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1
    assert os.listdir(os.path.dirname(key_path)) == ["secrets.key"]


def test_a_corrupt_key_is_a_clear_error(key_path: str) -> None:
    os.makedirs(os.path.dirname(key_path))
    with open(key_path, "w") as f:
        f.write("not a key\n")
    with pytest.raises(KeyFileError) as caught:
        load_or_create_key(key_path)
    assert "is not a Fernet key" in str(caught.value)
    assert key_path in str(caught.value)


def test_an_unreadable_folder_is_a_clear_error(key_path: str) -> None:
    folder = os.path.dirname(os.path.dirname(key_path))
    os.makedirs(folder)
    with open(os.path.join(folder, "state"), "w") as f:
        f.write("a file where the folder should be")
    with pytest.raises(KeyFileError) as caught:
        load_or_create_key(key_path)
    assert "cannot create the secrets key" in str(caught.value)


def test_the_check_token_tells_the_right_key() -> None:
    box = SecretBox(KEY)
    assert box.opens(box.check_token())
    assert not SecretBox(Fernet.generate_key()).opens(box.check_token())
    assert not box.opens(b"garbage")


def start_gateway(store: MemoryStore, key: bytes) -> tuple[defer.Deferred, list[Any]]:
    """Start a gateway service on ``store`` with ``key``: the Deferred of its start, where it listened.

    The gateway refuses to start with a key that did not seal the store's secrets.
    """
    listened: list[Any] = []

    async def listen(reactor: Any, where: str, site: Any) -> Any:
        listened.append(where)
        return _Port()

    service = GatewayService(
        Clock(),
        None,
        "tcp:0",
        FunctionCache(store, Clock()),
        None,
        secret_box=SecretBox(key),
        secrets_key_path="/state/secrets.key",
        listen=listen,
    )
    d = defer.Deferred.fromCoroutine(service._start())
    return d, listened


def test_another_key_is_refused_once_a_secret_was_sealed() -> None:
    store = MemoryStore()
    d, listened = start_gateway(store, Fernet.generate_key())  # no secrets yet: any key will do
    successResultOf(d)
    assert listened == ["tcp:0"]
    store.secrets_check = SecretBox(KEY).check_token()  # a secret was created with KEY
    d, listened = start_gateway(store, Fernet.generate_key())
    failure = failureResultOf(d, StartupError)
    assert "--secrets-key /state/secrets.key: not the key that sealed" in str(failure.value)
    assert listened == []
    d, _ = start_gateway(store, KEY)
    successResultOf(d)


def test_creating_a_secret_marks_the_store_with_the_key() -> None:
    store = MemoryStore()
    box = SecretBox(KEY)
    assert store.secrets_check is None
    successResultOf(defer.Deferred.fromCoroutine(store.secrets_key_check(box.check_token())))
    assert box.opens(store.secrets_check)


class _Port:
    def getHost(self) -> str:
        return "here"
