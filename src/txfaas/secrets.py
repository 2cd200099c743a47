"""Secrets: OpenFaaS's ``Secret`` body, names, and their encryption at rest.

Values are sealed with ``cryptography``'s Fernet (AES-128-CBC + HMAC-SHA256) under a key
kept in a file, before they reach the store; the store only ever holds tokens.  Each token
also binds the secret's namespace and name, so a token copied to another secret in Redis
does not open.  No Twisted here: the key file is read once, at start.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import tempfile
from typing import Any

import attrs
from cryptography.fernet import Fernet, InvalidToken

from txfaas.model import DEFAULT_NAMESPACE, ValidationError, check_namespace

#: Kubernetes' DNS-1123 subdomain, as ``faas-cli secret create`` checks it.
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
MAX_SECRET_NAME = 253
#: What a key check token holds (see :meth:`SecretBox.check_token`).
_CHECK = b"txfaas secrets key check"


class KeyFileError(Exception):
    """The key file cannot be made, read or used.  ``str()`` is one line naming the file."""


class SecretUnreadable(Exception):
    """A stored token does not open with this key (another key, or damaged)."""


def check_secret_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise ValidationError(field, "a secret name is required")
    if len(name) > MAX_SECRET_NAME:
        raise ValidationError(field, f"secret name longer than {MAX_SECRET_NAME} characters")
    if not _SECRET_NAME.match(name):
        raise ValidationError(
            field,
            f"invalid secret name {name!r}: use lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit",
        )
    return name


@attrs.frozen
class SecretRequest:
    """A ``POST``/``PUT``/``DELETE /system/secrets`` body: ``{name, namespace, value | rawValue}``."""

    name: str
    namespace: str
    value: bytes | None

    @classmethod
    def from_json(
        cls, data: Any, *, value_required: bool, default_namespace: str = DEFAULT_NAMESPACE
    ) -> SecretRequest:
        if not isinstance(data, dict):
            raise ValidationError("", "the body must be a JSON object")
        name = check_secret_name(data.get("name"))
        namespace = check_namespace(data.get("namespace") or default_namespace)
        text, raw = data.get("value"), data.get("rawValue")
        value: bytes | None = None
        if text not in (None, "") and raw not in (None, ""):
            raise ValidationError("", "give value or rawValue, not both")
        if text not in (None, ""):
            if not isinstance(text, str):
                raise ValidationError("value", "must be a string")
            value = text.encode("utf-8")
        elif raw not in (None, ""):
            if not isinstance(raw, str):
                raise ValidationError("rawValue", "must be base64 text")
            try:
                value = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise ValidationError("rawValue", "not valid base64") from None
        if value_required and not value:
            raise ValidationError("value", "a non-empty value or rawValue is required")
        return cls(name, namespace, value)


class SecretBox:
    """Seals and opens secret values with one Fernet key."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @staticmethod
    def _bound(namespace: str, name: str) -> bytes:
        return f"{namespace}/{name}\n".encode()

    def seal(self, namespace: str, name: str, value: bytes) -> bytes:
        return self._fernet.encrypt(self._bound(namespace, name) + value)

    def open(self, namespace: str, name: str, token: bytes | str) -> bytes:
        try:
            data = self._fernet.decrypt(token)
        except InvalidToken:
            raise SecretUnreadable(f"secret {namespace}/{name} does not open with this key") from None
        bound = self._bound(namespace, name)
        if not data.startswith(bound):
            raise SecretUnreadable(f"secret {namespace}/{name} holds another secret's value")
        return data[len(bound) :]

    def check_token(self) -> bytes:
        """A token kept beside the secrets: a later start with another key is refused."""
        return self._fernet.encrypt(_CHECK)

    def opens(self, token: bytes | str) -> bool:
        try:
            return self._fernet.decrypt(token) == _CHECK
        except InvalidToken:
            return False


def load_or_create_key(path: str) -> tuple[bytes, bool]:
    """The Fernet key in ``path``, generated there (mode 0600) when the file does not exist.

    Returns ``(key, created)``.  A new key is written whole to a temporary file (``mkstemp``:
    ``O_EXCL``, mode 0600) and linked into place, which fails if the file appeared meanwhile:
    concurrent first starts end up with the same key, and nobody reads half a file.
    """
    created = False
    if not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=folder, prefix=".secrets-key.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(Fernet.generate_key() + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.link(temp, path)
                created = True
            except FileExistsError:
                pass  # another process was first: its key it is
            finally:
                os.unlink(temp)
        except OSError as e:
            raise KeyFileError(f"cannot create the secrets key {path}: {e.strerror}") from None
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            key = f.read().strip()
    except OSError as e:
        raise KeyFileError(f"cannot read the secrets key {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise KeyFileError(f"the secrets key {path} is not a file")
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise KeyFileError(
            f"the secrets key {path} is not a Fernet key (44 characters of url-safe base64); "
            "restore the right file, or move it away to start with a new key and no secrets"
        ) from None
    return key, created


def key_too_open(path: str) -> bool:
    """True if anyone but the owner may read the key file."""
    try:
        return bool(os.stat(path).st_mode & 0o077)
    except OSError:
        return False
