"""Building blocks of the benchmarks in ``bench/``: tools, private servers, wrk runs, statistics.

Synchronous on purpose: a benchmark driver only starts processes, runs ``wrk``
and reads ``/proc``; it has no reactor of its own, so it cannot steal CPU from
the processes it measures.  Everything it starts goes on an :class:`ExitStack`
kept by the caller, so processes and temporary folders go away on success,
exceptions, Ctrl-C and SIGTERM alike.  Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A failure the operator must see as one message (a tool missing, a server not answering)."""


class WrkTimeout(BenchError):
    """wrk did not end long after its duration (seen when the shared machine was swapping)."""


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- tools


def ensure_commands(packages: dict[str, str]) -> None:
    """Install the Debian ``packages`` (command -> package) whose command is not on PATH.

    ``apt-get install -y`` first; if that fails (an old or empty package list),
    ``apt-get update`` once and install again.  Services are not started by the
    install on this machine (policy-rc.d), and we never use the system ones anyway.
    """
    missing = sorted({pkg for cmd, pkg in packages.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise BenchError(f"missing {', '.join(missing)} and no apt-get to install them")
    say(f"installing with apt-get: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=False)
        if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise BenchError(f"apt-get install {' '.join(missing)} failed")
    still = [cmd for cmd in packages if shutil.which(cmd) is None]
    if still:
        raise BenchError(f"still not on PATH after installing: {', '.join(still)}")


def ensure_python_module(module: str, requirement: str) -> None:
    """Import ``module``, installing ``requirement`` into this interpreter's environment if missing."""
    try:
        __import__(module)
        return
    except ImportError:
        pass
    say(f"installing {requirement} into {sys.prefix}")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement])
    if result.returncode != 0:
        raise BenchError(f"pip install {requirement} failed")
    __import__(module)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- processes


class Child:
    """A child process in its own session (Ctrl-C reaches only us; we stop it in order)."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log_path.parent,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Ask politely, then kill the whole process group (nginx workers, twistd's children)."""
        if self.alive():
            try:
                os.kill(self.popen.pid, sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.popen.poll() is None:
            self.popen.wait(5)
        self._log.close()


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx's workers), from ``/proc``."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        pass
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent's pid; the command name (field 2) may hold spaces and ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of ``pids`` so far (``/proc/<pid>/stat`` utime + stime)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the ')' field 3 is at index 0, so utime (14) and stime (15) are at 11 and 12.
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's children that it has waited for (wrk, clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU-seconds all cores have spent busy since boot (``/proc/stat``, everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def direct_opener() -> urllib.request.OpenerDirector:
    """A urllib opener that never goes through an environment proxy."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``url`` directly (never through an environment proxy), with basic ``auth`` when given."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with direct_opener().open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(
    url: str, child: Child, status: int = 200, body: bytes | None = None, timeout: float = 20.0
) -> None:
    """Wait until ``url`` answers ``status`` (and ``body``); fail at once if ``child`` died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited with {child.popen.returncode}:\n{child.tail()}")
        try:
            code, got = http_get(url)
            if code == status and (body is None or got == body):
                return
            last = f"{code} {got[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise BenchError(f"{url} did not answer {status} within {timeout:g}s (last: {last})\n{child.tail()}")


# --------------------------------------------------------------------------- nginx


_NGINX_COMMON = """\
worker_processes 1;
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
    # nginx closes a keep-alive connection after 1000 requests by default; the gateway
    # (twisted.web) never does, so lift the limit to compare like with like.
    keepalive_requests 100000000;
    keepalive_timeout 75s;
{body}
}}
"""


def nginx_function_conf(directory: Path, port: int) -> str:
    """The function: ``return 200 "ok"`` on every path."""
    body = f"""\
    server {{
        listen {LOOPBACK}:{port};
        location / {{ return 200 "ok"; }}
    }}"""
    return _NGINX_COMMON.format(dir=directory, name="function", body=body)


def nginx_proxy_conf(directory: Path, port: int, upstream_port: int) -> str:
    """``proxy_pass`` to the function, keeping upstream connections alive."""
    body = f"""\
    upstream function {{
        server {LOOPBACK}:{upstream_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen {LOOPBACK}:{port};
        location / {{
            proxy_pass http://function;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    return _NGINX_COMMON.format(dir=directory, name="proxy", body=body)


def nginx_argv(directory: Path, name: str, conf: str) -> list[str]:
    """Write ``<name>.conf`` into ``directory`` and return the nginx command running it (checked first)."""
    conf_path = directory / f"{name}.conf"
    conf_path.write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    argv = [nginx, "-p", str(directory), "-e", str(directory / f"{name}-error.log"), "-c", str(conf_path)]
    check = subprocess.run([argv[0], "-t", "-q", *argv[1:]], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"nginx rejected {conf_path}:\n{check.stderr}")
    return argv


class Nginx(Child):
    """A private nginx (own config, pid, logs and temp paths; ``daemon off``) as a child."""

    def __init__(self, name: str, directory: Path, conf: str) -> None:
        super().__init__(f"nginx ({name})", nginx_argv(directory, name, conf), directory / f"{name}.out")

    def workers(self) -> list[int]:
        return children_of(self.pid)

    def stop(self, sig: int = signal.SIGQUIT, timeout: float = 10.0) -> None:
        super().stop(sig, timeout)


# --------------------------------------------------------------------------- the gateway


def twistd_command() -> list[str]:
    """The ``twistd`` next to this interpreter (the venv's), else the module."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


#: The basic-auth credentials of every gateway the benchmarks start (for their /system/* requests).
BENCH_AUTH = ("bench", os.urandom(16).hex())


def auth_env(directory: Path) -> dict[str, str]:
    """Gives a gateway :data:`BENCH_AUTH`, and a state dir in ``directory`` (none in the user's)."""
    return {
        "TXFAAS_BASIC_AUTH_USER": BENCH_AUTH[0],
        "TXFAAS_BASIC_AUTH_PASSWORD": BENCH_AUTH[1],
        "TXFAAS_STATE_DIR": str(directory / "state"),
    }


class Twistd(Child):
    """``twistd -n --pidfile= <plugin> ...`` of this venv, inheriting no ``TXFAAS_*`` setting nor any
    environment variable named in :attr:`drop_env` (settings the plugin would otherwise read);
    gateways get :data:`BENCH_AUTH`."""

    drop_env: tuple[str, ...] = ()

    def __init__(self, name: str, directory: Path, plugin: str, args: Sequence[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TXFAAS_") and k not in self.drop_env}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(auth_env(directory))
        argv = [*twistd_command(), "-n", "--pidfile=", plugin, *args]
        super().__init__(name, argv, directory / f"{name}.log", env)


class Gateway(Twistd):
    """``twistd -n --pidfile= faas-gateway ...`` with one function deployed from a JSON file."""

    # Settings the gateway would otherwise take from our environment.
    drop_env = ("upstream_timeout", "read_timeout", "write_timeout", "basic_auth", "secret_mount_path")

    def __init__(
        self,
        name: str,
        directory: Path,
        port: int,
        functions: list[dict[str, Any]],
        redis: str = "memory:",
        extra: Sequence[str] = (),
    ) -> None:
        functions_path = directory / f"{name}-functions.json"
        functions_path.write_text(json.dumps(functions))
        args = [
            f"--listen=tcp:{port}:interface={LOOPBACK}",
            f"--redis={redis}",
            "--amqp=memory:",
            f"--functions={functions_path}",
            *extra,
        ]
        super().__init__(name, directory, "faas-gateway", args)


# --------------------------------------------------------------------------- redis clean-up


def redis_address(url: str) -> tuple[str, int, int]:
    """Host, port and database of a ``redis://host:port/db`` URL (defaults 127.0.0.1, 6379, 0)."""
    parts = urlsplit(url)
    return parts.hostname or LOOPBACK, parts.port or 6379, int((parts.path or "/0").strip("/") or 0)


class RawRedis:
    """A blocking RESP client of a few lines, for the benchmarks' own bookkeeping (no redis-py here)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        host, port, db = redis_address(url)
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._reader = self._sock.makefile("rb")
        self.command("SELECT", str(db))

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> RawRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(self, *args: str) -> Any:
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            data = a.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self._reader.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise BenchError(f"redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            return self._reader.read(n + 2)[:-2].decode()
        if kind == b"*":
            return [self._read() for _ in range(int(rest))]
        raise BenchError(f"redis: unexpected reply {line!r}")


def redis_mget(url: str, keys: Sequence[str], chunk: int = 500) -> list[str | None]:
    """The values of ``keys`` (None where missing), read ``chunk`` keys per MGET."""
    values: list[str | None] = []
    with RawRedis(url) as redis:
        for i in range(0, len(keys), chunk):
            values += redis.command("MGET", *keys[i : i + chunk])
    return values


def redis_delete_prefix(url: str, prefix: str, timeout: float = 5.0) -> int:
    """Delete every key starting with ``prefix`` (SCAN + DEL over raw RESP); return how many."""
    deleted = 0
    with RawRedis(url, timeout) as redis:
        cursor = "0"
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
        while True:
            cursor, keys = redis.command("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
            if keys:
                deleted += redis.command("DEL", *keys)
            if cursor == "0":
                return deleted


# --------------------------------------------------------------------------- wrk


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = r"([0-9.]+)(us|ms|s|m|h)"


def latency_ms(text: str) -> float:
    """``'415.09us'``, ``'1.03ms'``, ``'2.00s'``, ``'1.50m'`` -> milliseconds."""
    m = re.fullmatch(_TIME, text.strip())
    if not m:
        raise ValueError(f"not a wrk time: {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    seconds: float
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0
    #: CPU seconds used by each watched process group during the run (filled in by the caller)
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = self.errors
        return data


def parse_wrk(text: str) -> WrkResult:
    """Read ``wrk --latency`` output: Requests/sec, the 50%/99% lines, counts and errors."""

    def need(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.MULTILINE)
        if not m:
            raise BenchError(f"wrk output has no {pattern!r}:\n{text}")
        return m

    rps = float(need(r"^Requests/sec:\s*([0-9.]+)").group(1))
    p50 = need(rf"^\s*50(?:\.0+)?%\s+{_TIME}\s*$")
    p99 = need(rf"^\s*99(?:\.0+)?%\s+{_TIME}\s*$")
    total = need(rf"^\s*(\d+) requests in {_TIME}")
    result = WrkResult(
        rps=rps,
        p50_ms=latency_ms(p50.group(1) + p50.group(2)),
        p99_ms=latency_ms(p99.group(1) + p99.group(2)),
        requests=int(total.group(1)),
        seconds=latency_ms(total.group(2) + total.group(3)) / 1000.0,
    )
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if errors:
        result.socket_errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non_2xx:
        result.non_2xx = int(non_2xx.group(1))
    return result


def wrk_command(
    url: str, connections: int, seconds: float, threads: int | None = None, script: Path | None = None
) -> list[str]:
    threads = threads or min(2, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    return [*argv, url]


def run_wrk(
    url: str,
    connections: int,
    seconds: float,
    *,
    script: Path | None = None,
    watch: dict[str, Callable[[], list[int]]] | None = None,
) -> WrkResult:
    """One wrk run; ``watch`` names process groups whose CPU time is measured over the run."""
    if not url.startswith(f"http://{LOOPBACK}:"):
        raise BenchError(f"refusing to load anything but {LOOPBACK}: {url}")
    pids = {name: get() for name, get in (watch or {}).items()}
    before = {name: cpu_seconds(p) for name, p in pids.items()}
    wrk_before = children_cpu_seconds()
    busy_before = machine_busy_seconds()
    try:
        done = subprocess.run(
            wrk_command(url, connections, seconds, script=script),
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
    except subprocess.TimeoutExpired:
        raise WrkTimeout(
            f"wrk -c{connections} -d{seconds:g}s {url} still running after {seconds + 30:g}s"
        ) from None
    after = {name: cpu_seconds(p) for name, p in pids.items()}
    busy = machine_busy_seconds() - busy_before
    wrk_after = children_cpu_seconds()
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = parse_wrk(done.stdout)
    result.cpu_s = {name: round(after[name] - before[name], 3) for name in pids}
    if watch is not None:
        result.cpu_s["wrk"] = round(wrk_after - wrk_before, 3)
        # What the rest of the (shared) machine used meanwhile: a noise indicator.
        result.cpu_s["others"] = round(max(0.0, busy - sum(result.cpu_s.values())), 3)
    return result


def measured_wrk(
    url: str,
    connections: int,
    duration: float,
    warmup: float,
    *,
    script: Path | None = None,
    watch: dict[str, Callable[[], list[int]]] | None = None,
    before: Callable[[], object] | None = None,
) -> WrkResult:
    """``warmup`` seconds of the same load, then the measured run (``before`` is called between the
    two); all of it once more if wrk hangs (:class:`WrkTimeout`), which a busy machine can cause."""
    attempt = 1
    while True:
        try:
            if warmup:
                run_wrk(url, connections, warmup, script=script)
            if before is not None:
                before()
            return run_wrk(url, connections, duration, script=script, watch=watch)
        except WrkTimeout as e:
            if attempt == 2:
                raise
            attempt += 1
            say(f"warning: {e}; trying once more")


def cpu_per_10k(result: WrkResult, group: str) -> float | None:
    """CPU-seconds ``group`` spent per 10,000 requests of ``result`` (None when none completed)."""
    if not result.requests:
        return None
    return result.cpu_s.get(group, 0.0) / result.requests * 10_000


def post_script(directory: Path, size: int) -> Path:
    """A wrk Lua script sending a POST with a ``size``-byte body."""
    path = directory / f"post-{size}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = string.rep("x", {size})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    )
    return path


# --------------------------------------------------------------------------- statistics


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, min and max of the runs (and the runs themselves)."""
    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
    }


def make_tempdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    # nginx's workers drop to 'nobody' when started as root: let them reach their temp paths.
    path.chmod(0o755)
    return path


def median_min_max(s: dict[str, Any], fmt: str) -> str:
    """A :func:`summary` as ``median (min-max)``, each formatted with ``fmt``; ``-`` if nothing was measured."""
    if s["median"] is None:
        return "-"
    return f"{format(s['median'], fmt)} ({format(s['min'], fmt)}-{format(s['max'], fmt)})"


# --------------------------------------------------------------------------- running a benchmark


def first_line(argv: Sequence[str]) -> str:
    """The first line ``argv`` prints (stdout, then stderr): a tool's version; ``?`` if it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def environment(*tools: str) -> dict[str, Any]:
    """What a result file records of the machine: cores, load, Python, the ``tools``' versions (``<tool> -v``)
    and the txfaas commit (``+dirty src/`` when src/ has changes not committed)."""
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "python": platform.python_version(),
        **{tool: first_line([tool, "-v"]) for tool in tools},
        "txfaas_commit": commit + ("+dirty src/" if dirty else ""),
    }


def prepare_run(stack: ExitStack, results: Path, name: str, tmp_prefix: str) -> tuple[str, Path, Path]:
    """Make the ``results`` folder; return the run's time stamp, the base of its files
    (``<results>/<name>-<stamp>``) and a private temporary folder, removed when ``stack`` closes."""
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp = make_tempdir(tmp_prefix)
    stack.callback(shutil.rmtree, tmp, True)
    return stamp, results / f"{name}-{stamp}", tmp


def stop_on_signals() -> None:
    """Ctrl-C raises KeyboardInterrupt (even when started in the background), SIGTERM and SIGHUP
    SystemExit(128 + signal): either way the ``with`` blocks unwind and stop what was started."""

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)


def run_main(run: Callable[[Any, ExitStack], int], args: Any) -> int:
    """``run(args, stack)`` with :func:`stop_on_signals`; everything put on ``stack`` is stopped at the
    end, on errors and on signals.  A :class:`BenchError` is one line on stderr (exit 1); Ctrl-C is 130."""
    stop_on_signals()
    try:
        with ExitStack() as stack:
            return run(args, stack)
    except BenchError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: stopped everything started\n")
        return 130


# --------------------------------------------------------------------------- result files


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def partial_on_failure(
    base: Path, results: dict[str, Any], measured: Callable[[], dict[str, Any] | None]
) -> Iterator[None]:
    """If the block fails or is stopped, write ``<base>-partial.json``: ``results`` with ``incomplete``
    (the error) and what ``measured()`` returns, unless it returns nothing (nothing measured yet)."""
    try:
        yield
    except BaseException as e:
        got = measured()
        if got:
            partial = Path(f"{base}-partial.json")
            results.update(incomplete=f"{type(e).__name__}: {e}", **got)
            write_json(partial, results)
            say(f"partial results: {partial}")
        raise


def write_results(base: Path, results: dict[str, Any], text: str, note: str = "") -> Path:
    """``<base>.json`` (``results``) and ``<base>.txt`` (``text``, the table), then the table on stdout
    and where the files are; returns the JSON's path."""
    json_path = base.with_suffix(".json")
    txt_path = base.with_suffix(".txt")
    write_json(json_path, results)
    txt_path.write_text(text + "\n")
    say("")
    say(text)
    say("")
    say(f"results: {json_path} (table: {txt_path.name}{note})")
    return json_path


# --------------------------------------------------------------------------- profiling


def py_spy() -> str:
    """The py-spy next to this interpreter, else on PATH, else installed into this environment."""
    spy = Path(sys.executable).parent / "py-spy"
    if spy.exists():
        return str(spy)
    found = shutil.which("py-spy")
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(spy)


def short_frame(frame: str) -> str:
    """``'request (/x/site-packages/treq/client.py)'`` -> ``'request (treq/client.py)'``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/src/", "/lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})"


def summarise_stacks(
    lines: Iterable[str],
    areas: Sequence[tuple[str, str]],
    trunk: Sequence[str],
    top: int,
    threads_area: str | None = None,
) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's collapsed stacks (``a;b;c count``).

    A sample's self time goes to the first of ``areas`` (needle, name) whose needle is in its leaf
    frame, or to ``threads_area`` if given and the sample is of a thread other than the main one;
    frames containing any of ``trunk`` (the reactor's, in every sample) are left out of the
    inclusive ranking.  Shares are percentages of all samples; ``top`` functions of each ranking.
    """
    total = 0
    area_counts: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        if threads_area is not None and frames[0].startswith("Thread._bootstrap"):
            area = threads_area
        else:
            area = next((name for needle, name in areas if needle in leaf), "Python stdlib / other")
        area_counts[area] = area_counts.get(area, 0) + count
        own[short_frame(leaf)] = own.get(short_frame(leaf), 0) + count
        for frame in {short_frame(f) for f in frames}:
            if not any(t in frame for t in trunk):
                inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(counts: dict[str, int], n: int) -> list[tuple[str, float]]:
        items = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [(k, round(100.0 * v / total, 1)) for k, v in items]

    return {
        "samples": total,
        "self_by_area": ranked(area_counts, len(area_counts)) if total else [],
        "inclusive": ranked(inclusive, top) if total else [],
        "self": ranked(own, top) if total else [],
    }


def stacks_text(report: dict[str, Any]) -> list[str]:
    """The three rankings of a :func:`summarise_stacks` report, as lines of text."""
    return [
        "self time by area (% of samples)",
        *(f"  {pct:6.1f}%  {area}" for area, pct in report["self_by_area"]),
        "",
        "inclusive time, top functions (% of samples)",
        *(f"  {pct:6.1f}%  {name}" for name, pct in report["inclusive"]),
        "",
        "self time, top functions (% of samples)",
        *(f"  {pct:6.1f}%  {name}" for name, pct in report["self"]),
    ]
