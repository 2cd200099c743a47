"""End-to-end checks of a running compose stack, run by scripts/docker-test (standard library only).

Talks to the stack only through its published ports on 127.0.0.1; callbacks go to the stack's own
``receiver`` service.  Faults are made with the docker CLI.  Each check prints one line; the first
failure raises and the exit status is 1.
"""

import argparse
import base64
import json
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

CALLBACK = "http://receiver:8080/cb/"
PACE = 10  # calls a second per submitting thread


class Failed(Exception):
    pass


class Stack:
    def __init__(self, args):
        self.gateway = args.gateway.rstrip("/")
        self.receiver = args.receiver.rstrip("/")
        self.compose = shlex.split(args.compose)
        with open(args.user_file) as f:
            user = f.read().strip()
        with open(args.password_file) as f:
            password = f.read().strip()
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        with open(args.amqp_url_file) as f:
            amqp = urllib.parse.urlsplit(f.read().strip())
        self.amqp_user = urllib.parse.unquote(amqp.username)
        self.amqp_password = urllib.parse.unquote(amqp.password)

    def request(self, method, url, body=None, headers=(), auth=False, timeout=10):
        """(status, headers, body) of one request; a refused connection is status 0."""
        req = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
        if auth:
            req.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()
        except (OSError, urllib.error.URLError) as e:
            return 0, {}, str(e).encode()

    def api(self, method, path, body=None, headers=(), auth=True, timeout=10):
        return self.request(method, self.gateway + path, body, headers, auth, timeout)

    def docker(self, *args, timeout=180):
        cmd = list(args)
        print("e2e: $", " ".join(cmd), flush=True)
        done = subprocess.run(
            cmd, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if done.returncode:
            raise Failed(f"{' '.join(cmd)} exited {done.returncode}: {done.stdout.strip()[-2000:]}")
        return done.stdout.strip()

    def compose_cmd(self, *args, timeout=300):
        return self.docker(*self.compose, *args, timeout=timeout)

    def container(self, service):
        cid = self.compose_cmd("ps", "-q", service)
        if not cid:
            raise Failed(f"no running container for {service}")
        return cid.split()[0]

    def wait_healthy(self, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            gw = self.request("GET", self.gateway + "/healthz", timeout=3)[0]
            rc = self.request("GET", self.receiver + "/healthz", timeout=3)[0]
            if gw == 200 and rc == 200:
                return
            time.sleep(1)
        raise Failed(f"gateway or receiver not healthy within {timeout}s")

    def received(self):
        status, _, body = self.request("GET", self.receiver + "/received")
        if status != 200:
            raise Failed(f"receiver answered {status}")
        return json.loads(body)

    def submit(self, function, call_id, body, tag):
        """Queue one async call; True when the gateway accepted it (202)."""
        status, headers, text = self.api(
            "POST",
            f"/async-function/{function}",
            body,
            {"X-Call-Id": call_id, "X-Callback-Url": CALLBACK + tag},
            auth=False,
        )
        if status == 202:
            return True
        if status in (0, 502, 503):  # the broker or the gateway is restarting: not accepted
            return False
        raise Failed(f"async call {call_id}: {status} {text[:200]!r}")

    def burst(self, function, tag, count, fault_at=None, fault=None, after=40, workers=2, timeout=300):
        """Submit calls while ``fault`` runs (started once ``fault_at`` were accepted): at least
        ``count``, and ``after`` more once the fault is over, each of ``workers`` threads at most
        ``PACE`` a second (a fault that lasts does not pile up calls).  (accepted ids, refused)."""
        accepted = []
        state = {"attempted": 0, "after": 0, "refused": 0}
        lock = threading.Lock()
        fired = threading.Event()
        fault_done = threading.Event()
        errors = []
        if fault is None:
            fault_done.set()

        def fire():
            try:
                fault()
            except Exception as e:  # reported by the burst
                errors.append(e)
            finally:
                fault_done.set()

        deadline = time.monotonic() + timeout

        def loop():
            while time.monotonic() < deadline:
                with lock:
                    if state["attempted"] >= count and fault_done.is_set() and state["after"] >= after:
                        return
                    i = state["attempted"]
                    state["attempted"] += 1
                    if fault_done.is_set():
                        state["after"] += 1
                call_id = f"{tag}-{i}-{uuid.uuid4().hex[:8]}"
                try:
                    ok = self.submit(function, call_id, f"{tag} {i}".encode(), tag)
                except Failed as e:
                    errors.append(e)
                    return
                time.sleep(1 / PACE)
                with lock:
                    if not ok:
                        state["refused"] += 1
                        continue
                    accepted.append(call_id)
                    start = fault is not None and not fired.is_set() and len(accepted) >= fault_at
                    if start:
                        fired.set()
                if start:
                    threading.Thread(target=fire, daemon=True).start()

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 10)
        if errors:
            raise Failed(f"{tag}: {errors[0]}")
        if not fault_done.is_set():
            raise Failed(f"{tag}: the fault did not finish within {timeout}s")
        return accepted, state["refused"]

    def duplicates(self, tag):
        ids = [c["callId"] for c in self.received() if c["path"] == "/cb/" + tag]
        return len(ids) - len(set(ids))

    def settle(self, tag, ids, timeout=240):
        """Wait until every id succeeded and its callback arrived; fail naming the missing ones."""
        deadline = time.monotonic() + timeout
        pending = set(ids)
        while time.monotonic() < deadline:
            got = {c["callId"] for c in self.received() if c["path"] == "/cb/" + tag and c["status"] == "200"}
            pending -= got
            if not pending:
                break
            time.sleep(1)
        if pending:
            raise Failed(
                f"{tag}: {len(pending)} of {len(ids)} accepted calls got no callback, e.g. {sorted(pending)[:5]}"
            )
        not_ok = {}
        for call_id in ids:
            status, _, body = self.api("GET", f"/system/calls/{call_id}")
            record = json.loads(body) if status == 200 else {}
            if record.get("status") != "succeeded":
                not_ok[call_id] = (status, record.get("status"))
        if not_ok:
            raise Failed(f"{tag}: calls not recorded as succeeded: {dict(list(not_ok.items())[:5])}")


def check(name):
    def wrap(fn):
        def run(stack):
            start = time.monotonic()
            detail = fn(stack)
            print(
                f"e2e: ok  {name} ({time.monotonic() - start:.1f}s){': ' + detail if detail else ''}",
                flush=True,
            )

        run.__name__ = fn.__name__
        return run

    return wrap


@check("broker credentials come from secrets, not the environment")
def broker_secrets(stack):
    for service in ("rabbitmq", "gateway", "worker"):
        env = stack.docker("docker", "inspect", "--format", "{{json .Config.Env}}", stack.container(service))
        if stack.amqp_password in env or "guest:guest" in env:
            raise Failed(f"{service}'s environment holds a broker password")
    users = stack.compose_cmd("exec", "-T", "rabbitmq", "rabbitmqctl", "list_users", "-q", "-s")
    names = {line.split()[0] for line in users.splitlines() if line.strip()}
    if names != {stack.amqp_user}:
        raise Failed(f"RabbitMQ's users are {sorted(names)}, not only {stack.amqp_user!r} (no guest)")
    return f"RabbitMQ has only the user {stack.amqp_user!r}, from its secret"


@check("basic auth guards /system/*")
def auth(stack):
    status = stack.api("GET", "/system/functions", auth=False)[0]
    if status != 401:
        raise Failed(f"/system/functions without credentials: {status}, not 401")
    status, _, body = stack.api("GET", "/system/functions")
    if status != 200 or "echo" not in {f["name"] for f in json.loads(body)}:
        raise Failed(f"/system/functions: {status} {body[:200]!r}")


@check("deploy")
def deploy(stack):
    spec = {
        "service": "e2e-echo",
        "image": "txfaas-echo:latest",
        "annotations": {"txfaas.url": "http://echo:8080"},
    }
    status, _, body = stack.api("POST", "/system/functions", json.dumps(spec).encode())
    if status not in (200, 201, 202, 409):
        raise Failed(f"deploy: {status} {body[:200]!r}")
    status, _, body = stack.api("GET", "/system/function/e2e-echo")
    if status != 200 or json.loads(body)["name"] != "e2e-echo":
        raise Failed(f"/system/function/e2e-echo: {status} {body[:200]!r}")


@check("sync invoke")
def sync_invoke(stack):
    payload = f"sync {uuid.uuid4()}".encode()
    status, _, body = stack.api("POST", "/function/e2e-echo", payload, auth=False)
    if status != 200 or body != payload:
        raise Failed(f"/function/e2e-echo: {status} {body[:200]!r}")


@check("async invoke, callback and call record")
def async_invoke(stack):
    call_id = f"e2e-async-{uuid.uuid4().hex[:8]}"
    if not stack.submit("e2e-echo", call_id, b"async hello", "async"):
        raise Failed("async call not accepted")
    stack.settle("async", [call_id], timeout=60)
    callback = next(c for c in stack.received() if c["callId"] == call_id)
    if callback["body"] != "async hello":
        raise Failed(f"callback body {callback['body']!r}")
    status, headers, body = stack.api("GET", f"/system/calls/{call_id}/result")
    if status != 200 or body != b"async hello" or headers.get("X-Function-Status") != "200":
        raise Failed(f"/system/calls/{call_id}/result: {status} {body[:200]!r}")
    stack.first_call = call_id


@check("callbacks outside the compose network are refused")
def callback_refused(stack):
    for url in ("http://127.0.0.1:8080/", "http://10.0.0.1/", "http://192.168.1.1/"):
        status, _, body = stack.api(
            "POST", "/async-function/e2e-echo", b"x", {"X-Callback-Url": url}, auth=False
        )
        if status != 400:
            raise Failed(f"callback to {url}: {status} {body[:200]!r}, not 400")


@check("docker kill of the worker mid-burst loses nothing")
def worker_kill(stack):
    def kill():
        stack.docker("docker", "kill", stack.container("worker"))
        time.sleep(2)
        stack.compose_cmd("start", "worker")

    ids, refused = stack.burst("e2e-echo", "kill", 150, fault_at=50, fault=kill)
    stack.settle("kill", ids)
    return (
        f"{len(ids)} accepted ({refused} refused), all succeeded with a callback; "
        f"{stack.duplicates('kill')} callbacks repeated (calls run again after the kill)"
    )


@check("restart of rabbitmq mid-burst loses nothing")
def broker_restart(stack):
    restart = lambda: stack.compose_cmd("restart", "rabbitmq")  # noqa: E731
    ids, refused = stack.burst("e2e-echo", "restart", 150, fault_at=50, fault=restart)
    stack.wait_healthy()
    stack.settle("restart", ids)
    return (
        f"{len(ids)} accepted, {refused} refused while the broker was down; all accepted succeeded "
        f"with a callback ({stack.duplicates('restart')} callbacks repeated)"
    )


@check("up/down/up keeps accepted calls")
def down_up(stack):
    stack.compose_cmd("stop", "worker")
    ids, _ = stack.burst("e2e-echo", "downup", 50, after=0)
    if len(ids) != 50:
        raise Failed(f"only {len(ids)} of 50 calls accepted with the broker up")
    stack.compose_cmd("down", timeout=300)
    stack.compose_cmd("up", "-d", "--wait", "--wait-timeout", "180", timeout=300)
    stack.wait_healthy()
    stack.settle("downup", ids)
    status, _, body = stack.api("GET", f"/system/calls/{stack.first_call}")
    if status != 200 or json.loads(body).get("status") != "succeeded":
        raise Failed(f"the first call's record after down/up: {status} {body[:200]!r}")
    return f"{len(ids)} calls queued with no worker survived down/up and succeeded"


STEPS = (
    broker_secrets,
    auth,
    deploy,
    sync_invoke,
    async_invoke,
    callback_refused,
    worker_kill,
    broker_restart,
    down_up,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--receiver", required=True)
    parser.add_argument("--compose", required=True, help="the docker compose command, as one string")
    parser.add_argument("--user-file", required=True)
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--amqp-url-file", required=True, help="the secret holding the broker's URL")
    stack = Stack(parser.parse_args())
    try:
        stack.wait_healthy()
        for step in STEPS:
            step(stack)
    except (Failed, subprocess.TimeoutExpired) as e:
        print(f"e2e: FAILED {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
