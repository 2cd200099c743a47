"""Parsing of configuration values shared by every txfaas process.

Pure: nothing here imports the reactor, pika or txredisapi.  One duration
parser, one URL parser, one parser for each kind of value (sizes, counts,
booleans, URL templates), one rule for "flag, else environment variable, else
default" (:func:`option_or_env`) and one table of flags (:class:`Flags`) that
makes both ``--help`` and the lookups: every process uses these, so ``10``,
``10s``, ``1m30s`` and ``500ms`` mean the same thing everywhere.
About 500 lines: one parser per kind of value, kept together so they agree.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import attrs

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid.  ``str()`` is one line naming the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(value: str | float | int) -> float:
    """Parse an OpenFaaS/Go duration into seconds.

    A bare number is seconds (``"10"``, ``"2.5"``); otherwise a Go duration
    (``"10s"``, ``"1m30s"``, ``"500ms"``).  Negative or malformed values raise
    :class:`ValueError` with a short reason.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        if not text:
            raise ValueError("empty duration")
        try:
            seconds = float(text)
        except ValueError:
            seconds = _parse_go_duration(text)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite duration: {value!r}")
    if seconds < 0:
        raise ValueError(f"negative duration: {value!r}")
    return seconds


def _parse_go_duration(text: str) -> float:
    sign = 1.0
    if text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"not a duration: {text!r} (use 10, 10s, 1m30s or 500ms)")
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"not a duration: {text!r}")
    return sign * total


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, for messages and --help."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    if seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    # Fixed-point: ``:g`` would print 1.23457e+06 (which parse_duration refuses) and drop digits.
    return f"{seconds:f}".rstrip("0").rstrip(".") + "s"


def parse_positive_duration(value: str | float | int) -> float:
    """A duration (see :func:`parse_duration`) that must be more than 0."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def parse_positive_int(value: Any) -> int:
    """A whole number of at least 1 (``"8"``, ``8``)."""
    n = _whole_number(value)
    if n < 1:
        raise ValueError(f"must be at least 1, not {n}")
    return n


def parse_count(value: Any) -> int:
    """A whole number of at least 0 (a limit where 0 means none, a number of tries)."""
    n = _whole_number(value)
    if n < 0:
        raise ValueError(f"must not be negative, not {n}")
    return n


def _whole_number(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"not a whole number: {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"not a whole number: {value!r}") from None


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_bool(value: Any) -> bool:
    """``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0`` (any case; empty is false)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not true or false: {value!r}")


def parse_url_template(value: str) -> str:
    """A function URL template such as ``http://{name}.{namespace}:8080``, returned unchanged.

    Only ``{name}`` and ``{namespace}`` may appear, and filled in it must be an
    absolute http(s) URL.
    """
    try:
        example = value.format(name="f", namespace="n")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"bad template {value!r}: only {{name}} and {{namespace}} may appear ({e})"
        ) from None
    try:
        parse_http_url(example)
    except ValueError:
        raise ValueError(f"not an http(s) URL template: {value!r}") from None
    return value


def format_size(n: int) -> str:
    """The inverse of :func:`parse_size`, for messages and --help (``16MiB``, ``512KiB``, ``1000``)."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def parse_size(value: str | int) -> int:
    """Parse a byte count: ``1048576``, ``512KiB``, ``10MiB``, ``1MB``, ``2GiB``."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]i?[bB]?|[bB])?\s*", str(value))
        if match is None:
            raise ValueError(f"not a size: {value!r} (use 1048576, 512KiB or 10MiB)")
        n = int(match.group(1))
        unit = (match.group(2) or "b").lower().rstrip("b")
        factor = {"": 1, "k": 1000, "ki": 1024, "m": 1000**2, "mi": 1024**2, "g": 1000**3, "gi": 1024**3}[
            unit
        ]
        n *= factor
    if n < 0:
        raise ValueError(f"negative size: {value!r}")
    return n


@attrs.frozen
class RedisURL:
    """Where the store lives.  ``memory`` selects the in-process store."""

    memory: bool = False
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = None
    unix_socket: str | None = None


def parse_redis_url(value: str) -> RedisURL:
    """``redis://[:password@]host[:port][/db]``, ``unix:///path?db=N`` or ``memory:``."""
    if value.strip() in ("memory:", "memory", "memory://"):
        return RedisURL(memory=True)
    parts = urlsplit(value)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"no socket path in {value!r}")
        return RedisURL(unix_socket=parts.path)
    if parts.scheme != "redis":
        raise ValueError(f"not a redis:// URL: {value!r}")
    try:
        port = parts.port or 6379
    except ValueError as e:
        raise ValueError(f"bad port in {value!r}") from e
    db_text = parts.path.lstrip("/") or "0"
    if not db_text.isdigit():
        raise ValueError(f"bad database number {db_text!r} in {value!r}")
    return RedisURL(
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=int(db_text),
        password=unquote(parts.password) if parts.password else None,
    )


@attrs.frozen
class AMQPURL:
    """Where the broker lives.  ``memory`` selects the in-process queue."""

    memory: bool = False
    host: str = "127.0.0.1"
    port: int = 5672
    vhost: str = "/"
    username: str = "guest"
    password: str = "guest"
    tls: bool = False
    heartbeat: int = 30

    @property
    def url(self) -> str:
        """A URL that pika's ``URLParameters`` understands (password included)."""
        from urllib.parse import quote

        scheme = "amqps" if self.tls else "amqp"
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return (
            f"{scheme}://{quote(self.username, safe='')}:{quote(self.password, safe='')}"
            f"@{host}:{self.port}/{quote(self.vhost, safe='')}?heartbeat={self.heartbeat}"
        )


def parse_amqp_url(value: str) -> AMQPURL:
    """``amqp://user:pass@host:port/vhost`` (vhost ``%2F`` is ``/``), or ``memory:``."""
    if value.strip() in ("memory:", "memory", "memory://"):
        return AMQPURL(memory=True)
    parts = urlsplit(value)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"not an amqp:// URL: {value!r}")
    tls = parts.scheme == "amqps"
    try:
        port = parts.port or (5671 if tls else 5672)
    except ValueError as e:
        raise ValueError(f"bad port in {value!r}") from e
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    heartbeat = 30
    for item in parts.query.split("&"):
        key, _, val = item.partition("=")
        if key == "heartbeat" and val.isdigit():
            heartbeat = int(val)
    return AMQPURL(
        host=parts.hostname or "127.0.0.1",
        port=port,
        vhost=vhost,
        username=unquote(parts.username) if parts.username else "guest",
        password=unquote(parts.password) if parts.password else "guest",
        tls=tls,
        heartbeat=heartbeat,
    )


def amqp_url_text(options: Mapping[str, Any], environ: Mapping[str, str], get: Callable[..., Any]) -> str:
    """--amqp, else the URL held in --amqp-url-file (a Docker secret); never both.

    The file's content is never shown: a bad one is named by its path only.
    """
    path = get("amqp-url-file", str)
    if not path:
        return get("amqp", _checked_amqp_url)
    setting = "--amqp-url-file"
    if options.get("amqp") is not None or environ.get("TXFAAS_AMQP"):
        raise ConfigError(setting, "give --amqp ($TXFAAS_AMQP) or its file, not both")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as e:
        raise ConfigError(setting, f"cannot read {path}: {e.strerror}") from None
    if not text:
        raise ConfigError(setting, f"{path} is empty")
    try:
        parse_amqp_url(text)
    except ValueError:
        raise ConfigError(setting, f"{path} does not hold an amqp:// or amqps:// URL") from None
    return text


def _checked_amqp_url(value: str) -> str:
    parse_amqp_url(value)
    return value


def parse_http_url(value: str) -> str:
    """An absolute http(s) URL, returned unchanged (without a trailing slash)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an absolute http(s) URL: {value!r}")
    return value.rstrip("/")


def parse_networks(
    value: str,
) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], tuple[str, ...]]:
    """Comma-separated CIDRs, addresses and host names -> (networks, host names)."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    hosts: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9.-]+", item):
                raise ValueError(f"not a CIDR, address or host name: {item!r}") from None
            hosts.append(item.lower().rstrip("."))
    return tuple(nets), tuple(hosts)


def option_or_env(
    options: Mapping[str, Any],
    key: str,
    env_names: tuple[str, ...],
    default: T,
    parse: Callable[[Any], Any],
    environ: Mapping[str, str] | None = None,
    flag: str | None = None,
) -> Any:
    """The flag's value, else the first environment variable that is set, else the default.

    Whatever the source, the value goes through ``parse``; a failure becomes a
    :class:`ConfigError` naming the flag (and the variable, when that was the source).
    """
    environ = os.environ if environ is None else environ
    flag = flag or f"--{key}"
    raw = options.get(key)
    source = flag
    if raw is None:
        for name in env_names:
            if environ.get(name, "") != "":
                raw = environ[name]
                source = f"{flag} (from ${name})"
                break
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError as e:
        raise ConfigError(source, str(e)) from None


@attrs.frozen
class Flag:
    """One setting: its flag (without ``--``), the environment variables it falls back to (first
    set wins), its default as a user would type it (parsed like any given value; None: no
    default), and its help.  ``shown`` replaces the default in ``--help`` ("no limit")."""

    name: str
    env: tuple[str, ...]
    default: str | None
    help: str
    shown: str | None = None

    def usage(self) -> str:
        """The help text with its variables and default: ``Text [$A, $B; default 5s]``."""
        default = self.shown if self.shown is not None else self.default
        where = ", ".join("$" + e for e in self.env)
        tail = "; ".join(part for part in (where, f"default {default}" if default else "") if part)
        return f"{self.help} [{tail}]" if tail else self.help


class Flags:
    """A process's table of :class:`Flag` s: ``--help`` lines and "flag, else env, else default"
    lookups from one place, so that a default shown is the default used."""

    def __init__(self, *flags: Flag) -> None:
        self._flags = {flag.name: flag for flag in flags}

    def __getitem__(self, name: str) -> Flag:
        return self._flags[name]

    def __iter__(self) -> Iterator[Flag]:
        return iter(self._flags.values())

    def opt_parameters(self, leave_out: Iterable[str] = ()) -> list[list[Any]]:
        """Rows for ``twisted.python.usage.Options.optParameters``."""
        skip = set(leave_out)
        return [[flag.name, None, None, flag.usage()] for flag in self if flag.name not in skip]

    def reader(
        self, options: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> Callable[[str, Callable[[Any], Any]], Any]:
        """``get(name, parse)``: the flag's value, else its variables', else its default, parsed."""

        def get(name: str, parse: Callable[[Any], Any]) -> Any:
            flag = self._flags[name]
            default = None
            if flag.default is not None:
                try:
                    default = parse(flag.default)
                except ValueError as e:
                    raise ConfigError(f"--{name} (default {flag.default})", str(e)) from None
            return option_or_env(options, name, flag.env, default, parse, environ)

        return get


def read_secret(mount_path: str, name: str) -> str:
    """Read an OpenFaaS-style secret file (``<mount>/<name>``), stripped of whitespace."""
    path = os.path.join(mount_path, name)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise ConfigError("--secret-mount-path", f"cannot read {path}: {e.strerror}") from None


def default_state_dir(environ: Mapping[str, str]) -> str:
    """Where txfaas keeps what it generates: ``$XDG_STATE_HOME/txfaas``, else ``~/.local/state/txfaas``."""
    base = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "txfaas")


#: The user name of generated credentials (OpenFaaS's installers use the same).
GENERATED_USER = "admin"


def load_or_create_credentials(state_dir: str) -> tuple[str, str, bool]:
    """Basic-auth ``(user, password, created)`` kept in ``state_dir``; generated when absent.

    The files are ``basic-auth-user`` and ``basic-auth-password`` (as in a secret mount), mode
    0600 in a 0700 folder.  Each is written whole to a temporary file, then linked into place
    (which fails if it exists), so concurrent first starts agree and never read half a file.
    """
    import secrets
    import tempfile

    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError("--state-dir", f"cannot create {state_dir}: {e.strerror}") from None
    created = False
    values = []
    for name, make in (
        ("basic-auth-user", lambda: GENERATED_USER),
        ("basic-auth-password", lambda: secrets.token_urlsafe(24)),
    ):
        path = os.path.join(state_dir, name)
        if not os.path.exists(path):
            try:
                fd, temp = tempfile.mkstemp(dir=state_dir, prefix=f".{name}.")  # mode 0600
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(make())
                    os.link(temp, path)
                    created = True
                except FileExistsError:
                    pass  # another process was first: use its file
                finally:
                    os.unlink(temp)
            except OSError as e:
                raise ConfigError("--state-dir", f"cannot write {path}: {e.strerror}") from None
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as e:
            raise ConfigError("--state-dir", f"cannot read {path}: {e.strerror}") from None
        if not value:
            raise ConfigError("--state-dir", f"{path} is empty (delete it to generate another)")
        values.append(value)
    return values[0], values[1], created
