"""Secrets: /system/secrets in OpenFaaS's shapes, sealed at rest, the key file, and deploy's check."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import tempfile
import threading
from typing import Any

import pytest
from cryptography.fernet import Fernet
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

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


class SecretsAPITests(SecretsTestCase):
    def test_create_is_201_and_list_gives_names_and_namespace_never_values(self) -> None:
        response, body = self.send("POST", {"name": "db-password", "value": "s3cr3t"})
        self.assertEqual(response.code, 201, body)
        self.send("POST", {"name": "api-key", "namespace": "openfaas-fn", "value": "k"})
        response, body = self.call("GET", "/system/secrets")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(
            js(body),
            [
                {"name": "api-key", "namespace": "openfaas-fn"},
                {"name": "db-password", "namespace": "openfaas-fn"},
            ],
        )
        self.assertNotIn(b"s3cr3t", body)

    def test_values_are_sealed_in_the_store_and_bound_to_their_name(self) -> None:
        self.send("POST", {"name": "db-password", "value": "s3cr3t"})
        token = self.store.secrets["openfaas-fn", "db-password"]
        self.assertNotIn(b"s3cr3t", token)
        self.assertEqual(self.box.open("openfaas-fn", "db-password", token), b"s3cr3t")
        # The same token under another name does not open: tokens are not interchangeable.
        with self.assertRaises(SecretUnreadable):
            self.box.open("openfaas-fn", "other", token)
        with self.assertRaises(SecretUnreadable):
            SecretBox(Fernet.generate_key()).open("openfaas-fn", "db-password", token)

    def test_the_first_secret_marks_the_store_with_the_key_and_another_key_is_refused(self) -> None:
        self.assertIsNone(self.store.secrets_check)
        self.send("POST", {"name": "k", "value": "1"})
        self.assertTrue(self.box.opens(self.store.secrets_check))
        self.build(secret_box=SecretBox(Fernet.generate_key()))
        response, body = self.send("POST", {"name": "j", "value": "1"})
        self.assertEqual(response.code, 503)
        self.assertIn(b"sealed with another key", body)
        self.assertNotIn(("openfaas-fn", "j"), self.store.secrets)

    def test_raw_value_is_base64_bytes(self) -> None:
        raw = bytes(range(256))
        response, _ = self.send("POST", {"name": "blob", "rawValue": base64.b64encode(raw).decode()})
        self.assertEqual(response.code, 201)
        self.assertEqual(self.box.open("openfaas-fn", "blob", self.store.secrets["openfaas-fn", "blob"]), raw)

    def test_create_twice_is_409(self) -> None:
        self.send("POST", {"name": "k", "value": "1"})
        response, body = self.send("POST", {"name": "k", "value": "2"})
        self.assertEqual(response.code, 409)
        self.assertIn(b"already exists", body)

    def test_update_replaces_and_is_404_when_absent(self) -> None:
        response, body = self.send("PUT", {"name": "k", "value": "1"})
        self.assertEqual(response.code, 404)
        self.assertIn(b"'k' not found", body)
        self.assertEqual(self.store.secrets, {})  # an update never creates
        self.send("POST", {"name": "k", "value": "1"})
        response, _ = self.send("PUT", {"name": "k", "value": "2"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.box.open("openfaas-fn", "k", self.store.secrets["openfaas-fn", "k"]), b"2")

    def test_remove_and_404_when_absent(self) -> None:
        self.send("POST", {"name": "k", "value": "1"})
        response, _ = self.send("DELETE", {"name": "k"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.store.secrets, {})
        response, body = self.send("DELETE", {"name": "k"})
        self.assertEqual(response.code, 404)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])

    def test_a_namespace_must_exist(self) -> None:
        response, body = self.send("POST", {"name": "k", "namespace": "dev", "value": "1"})
        self.assertEqual(response.code, 400)
        self.assertIn(b"namespace 'dev' does not exist", body)
        response, _ = self.call("GET", "/system/secrets?namespace=dev")
        self.assertEqual(response.code, 400)
        self.assertEqual(self.store.secrets, {})

    def test_namespaces_keep_apart(self) -> None:
        response, body = self.send("POST", {"name": "dev"}, "/system/namespace/dev")
        self.assertEqual(response.code // 100, 2, body)
        self.send("POST", {"name": "k", "namespace": "dev", "value": "1"})
        _, body = self.call("GET", "/system/secrets")
        self.assertEqual(js(body), [])
        _, body = self.call("GET", "/system/secrets?namespace=dev")
        self.assertEqual(js(body), [{"name": "k", "namespace": "dev"}])
        response, _ = self.send("DELETE", {"name": "k"})
        self.assertEqual(response.code, 404)

    def test_bad_bodies_are_400_naming_the_problem(self) -> None:
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
            response, answer = self.send("POST", body)
            self.assertEqual((response.code, message in answer), (400, True), (body, answer))
        self.assertEqual(self.store.secrets, {})
        response, answer = self.call("GET", "/system/secrets?namespace=UPPER")
        self.assertEqual(response.code, 400)
        self.assertIn(b"invalid namespace", answer)

    def test_other_methods_are_405(self) -> None:
        response, _ = self.send("PATCH", {"name": "k"})
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, POST, PUT, DELETE"])

    def test_store_unavailable_is_503(self) -> None:
        self.store.available = False
        response, _ = self.call("GET", "/system/secrets")
        self.assertEqual(response.code, 503)

    def test_an_app_built_without_a_key_seals_with_one_of_its_own(self) -> None:
        from txfaas.gateway.app import GatewayApp

        app = GatewayApp(self.functions, self.store, self.queue, self.resolver, self.metrics)
        self.assertIsInstance(app.secrets.box, SecretBox)
        token = app.secrets.box.seal("openfaas-fn", "k", b"v")
        self.assertEqual(app.secrets.box.open("openfaas-fn", "k", token), b"v")


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


class SecretRequestTests(SynchronousTestCase):
    def test_default_namespace_and_utf8_value(self) -> None:
        secret = SecretRequest.from_json({"name": "a.b-c", "value": "é"}, value_required=True)
        self.assertEqual(
            (secret.name, secret.namespace, secret.value), ("a.b-c", "openfaas-fn", "é".encode())
        )

    def test_names_follow_faas_cli_rule(self) -> None:
        for good in ["a", "a.b", "a-b.c1", "x" * 253]:
            self.assertEqual(check_secret_name(good), good)
        for bad in ["", "A", "-a", "a-", "a..b", ".a", "a_b", "a\n", "x" * 254, None, 3]:
            with self.assertRaises(ValidationError, msg=repr(bad)):
                check_secret_name(bad)


class KeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = tempfile.mkdtemp(prefix="txfaas-keytest-")
        self.addCleanup(shutil.rmtree, base, True)
        self.dir = os.path.join(base, "dir")
        self.path = os.path.join(self.dir, "state", "secrets.key")

    def test_generated_with_mode_0600_then_kept(self) -> None:
        key, created = load_or_create_key(self.path)
        self.assertTrue(created)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o700)
        Fernet(key)
        again, created = load_or_create_key(self.path)
        self.assertEqual((again, created), (key, False))
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["secrets.key"])  # no temp file left

    def test_concurrent_first_starts_agree_on_one_key(self) -> None:
        keys: list[bytes] = []
        threads = [
            threading.Thread(target=lambda: keys.append(load_or_create_key(self.path)[0])) for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(set(keys)), 1)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["secrets.key"])

    def test_a_corrupt_key_is_a_clear_error(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("not a key\n")
        with self.assertRaises(KeyFileError) as caught:
            load_or_create_key(self.path)
        self.assertIn("is not a Fernet key", str(caught.exception))
        self.assertIn(self.path, str(caught.exception))

    def test_an_unreadable_folder_is_a_clear_error(self) -> None:
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "state"), "w") as f:
            f.write("a file where the folder should be")
        with self.assertRaises(KeyFileError) as caught:
            load_or_create_key(self.path)
        self.assertIn("cannot create the secrets key", str(caught.exception))

    def test_the_check_token_tells_the_right_key(self) -> None:
        box = SecretBox(KEY)
        self.assertTrue(box.opens(box.check_token()))
        self.assertFalse(SecretBox(Fernet.generate_key()).opens(box.check_token()))
        self.assertFalse(box.opens(b"garbage"))


class _StartupKeyCheck(SynchronousTestCase):
    """The gateway refuses to start with a key that did not seal the store's secrets."""

    def start(self, store: MemoryStore, key: bytes) -> Any:
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


@pytest.fixture
def startup_key_check_gateway() -> _StartupKeyCheck:
    return set_up(_StartupKeyCheck())


def test_another_key_is_refused_once_a_secret_was_sealed(startup_key_check_gateway: _StartupKeyCheck) -> None:
    store = MemoryStore()
    d, listened = startup_key_check_gateway.start(
        store, Fernet.generate_key()
    )  # no secrets yet: any key will do
    startup_key_check_gateway.successResultOf(d)
    assert listened == ["tcp:0"]
    store.secrets_check = SecretBox(KEY).check_token()  # a secret was created with KEY
    d, listened = startup_key_check_gateway.start(store, Fernet.generate_key())
    failure = startup_key_check_gateway.failureResultOf(d, StartupError)
    assert "--secrets-key /state/secrets.key: not the key that sealed" in str(failure.value)
    assert listened == []
    d, _ = startup_key_check_gateway.start(store, KEY)
    startup_key_check_gateway.successResultOf(d)


def test_creating_a_secret_marks_the_store_with_the_key(startup_key_check_gateway: _StartupKeyCheck) -> None:
    store = MemoryStore()
    box = SecretBox(KEY)
    assert store.secrets_check is None
    startup_key_check_gateway.successResultOf(
        defer.Deferred.fromCoroutine(store.secrets_key_check(box.check_token()))
    )
    assert box.opens(store.secrets_check)


class _Port:
    def getHost(self) -> str:
        return "here"
