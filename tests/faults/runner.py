"""One fault run, and the ``scripts/faults`` command line.

::

    scripts/faults                  # N = 10,000 calls, each fault 3 times
    scripts/faults --quick          # ~300 calls, each fault once or twice (what CI runs)
    scripts/faults --calls 2000 --rate 50 --rounds 2 --report /tmp/faults.json

The run: start the stack (:mod:`tests.faults.stack`), deploy the function, post the calls
while the faults happen, wait until every accepted call is settled (final status, callback
delivered or given up) and the queue is drained, print the table, write the JSON report.
Exit status: 0 when nothing was lost and nothing unexpected arrived, 1 otherwise, 2 when
the run could not be set up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from tests.faults.driver import LoadDriver
from tests.faults.injectors import KINDS, NEEDS_PRIVATE_BROKER, SELF_TESTS, Injector, Timings, plan
from tests.faults.ledger import ACCEPTED, FINAL, Ledger, Summary, report_json, summarize, table
from tests.faults.servers import CallbackReceiver, FunctionServer
from tests.faults.stack import Stack, StackError
from tests.support import GATEWAY_AUTH, listen_http

FUNCTION = "faults-fn"
#: Callback states after which nothing more will happen to a final call.
SETTLED_CALLBACK = frozenset({None, "delivered", "failed", "dead_lettered"})


@attrs.frozen
class RunOptions:
    calls: int = 10_000
    rate: float = 100.0
    concurrency: int = 64
    #: How many times each fault is injected.
    rounds: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(KINDS, 3))
    drain_timeout: float = 180.0
    function_delay: tuple[float, float] = (0.02, 0.3)
    max_inflight: int = 20
    private_broker: bool = True
    #: A succeeded call whose callback was given up counts as lost.  Callbacks are retried
    #: durably and dead-lettered when exhausted, so "failed" only follows a receiver's 410/4xx,
    #: which the suite's receiver never answers.
    strict_callbacks: bool = True
    #: The driver's clients post again under the same X-Call-Id until they get a 202.
    client_retries: bool = True
    timings: Timings = attrs.field(factory=Timings)
    report: str | None = None
    keep_logs: bool = False
    seed: int = 0

    @classmethod
    def quick(cls, **changes: Any) -> RunOptions:
        """≈300 calls in ≈30 s, each fault once (worker and gateway kills, connection cuts twice)."""
        rounds = dict.fromkeys(KINDS, 1)
        rounds.update(worker_kill=2, gateway_kill=2, amqp_cut=2)
        base = cls(calls=300, rate=10.0, concurrency=16, rounds=rounds, drain_timeout=60.0)
        return attrs.evolve(base, **changes)


@attrs.frozen
class Outcome:
    summary: Summary
    ledger: Ledger
    table: str
    report_path: str | None
    notes: list[str]
    private_broker: bool


class StatusPoller:
    """``GET /system/calls/{id}`` for many ids at a bounded concurrency."""

    def __init__(
        self, reactor: Any, base: str, concurrency: int = 32, auth: tuple[str, str] = GATEWAY_AUTH
    ) -> None:
        self._reactor = reactor
        self._base = base
        self._auth = auth
        self._slots = defer.DeferredSemaphore(concurrency)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = concurrency
        self._http = HTTPClient(Agent(reactor, pool=self._pool))

    async def _get(self, path: str) -> tuple[int, bytes]:
        d = self._http.get(self._base + path, auth=self._auth)
        d.addTimeout(10, self._reactor)
        response = await d
        body = await response.content()
        return response.code, body

    async def _one(self, call_id: str, records: dict[str, Any]) -> None:
        try:
            code, body = await self._get(f"/system/calls/{call_id}")
        except Exception:
            return  # unknown this time: polled again
        if code == 404:
            records[call_id] = None
        elif code == 200:
            records[call_id] = json.loads(body)

    async def poll(self, call_ids: list[str], records: dict[str, Any]) -> None:
        await defer.gatherResults(
            [
                self._slots.run(lambda c=c: defer.Deferred.fromCoroutine(self._one(c, records)))
                for c in call_ids
            ]
        )

    async def dead_letters(self) -> dict[str, str] | None:
        """Every entry of ``GET /system/dead-letters`` (call id -> reason); None if there is no list."""
        found: dict[str, str] = {}
        page, offset = 1000, 0
        while True:
            code, body = await self._get(f"/system/dead-letters?limit={page}&offset={offset}")
            if code != 200:
                return None
            letters = json.loads(body)
            found.update((str(e.get("callId")), str(e.get("reason"))) for e in letters)
            offset += len(letters)
            if len(letters) < page:
                return found

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


def _final(ledger: Ledger, call_id: str) -> bool:
    return (ledger.records.get(call_id) or {}).get("status") in FINAL


def _settled(ledger: Ledger, call_id: str) -> bool:
    """Nothing more will happen to this accepted call: called back, or final with its callback
    delivered or given up."""
    if any(a.accepted for a in ledger.callbacks.get(call_id, [])):
        return True
    record = ledger.records.get(call_id)
    return _final(ledger, call_id) and (record or {}).get("callbackState") in SETTLED_CALLBACK


class Run:
    log = Logger()

    def __init__(self, reactor: Any, options: RunOptions) -> None:
        self._reactor = reactor
        self.options = options
        self.run_id = f"f{uuid.uuid4().hex[:8]}"
        self.workdir = Path(tempfile.mkdtemp(prefix="txfaas-faults-"))
        self.workdir.chmod(0o755)  # the private broker runs as the rabbitmq user
        self.ledger = Ledger()
        self.function = FunctionServer(reactor, self.ledger, options.function_delay, seed=options.seed)
        self.receiver = CallbackReceiver(reactor, self.ledger)
        self.stack = Stack(
            reactor,
            self.workdir,
            max_inflight=options.max_inflight,
            private_broker=options.private_broker,
        )
        self._ports: list[Any] = []

    async def sleep(self, seconds: float) -> None:
        await task.deferLater(self._reactor, seconds, lambda: None)

    async def execute(self) -> Outcome:
        ok = False
        try:
            outcome = await self._execute()
            ok = outcome.summary.ok
            return outcome
        finally:
            await self._close(keep_logs=self.options.keep_logs or not ok)

    async def _execute(self) -> Outcome:
        o = self.options
        function_port = listen_http(self.function)
        self._ports.append(function_port)
        self.receiver.listen()
        await self.stack.start()
        await self.stack.deploy(FUNCTION, f"http://127.0.0.1:{function_port.getHost().port}")
        await self.stack.start_workers()
        kinds = plan(o.rounds)
        if not self.stack.private_broker:
            kinds = [k for k in kinds if k not in NEEDS_PRIVATE_BROKER]
        self.log.info(
            "run {run}: {n} calls at {rate:g}/s, {f} faults, broker {broker}",
            run=self.run_id,
            n=o.calls,
            rate=o.rate,
            f=len(kinds),
            broker=f"private node {self.stack.rabbit.node}" if self.stack.private_broker else "SHARED",
        )
        driver = LoadDriver(
            self._reactor,
            self.ledger,
            f"{self.stack.gateway_url}/async-function/{FUNCTION}",
            self.receiver.url,
            rate=o.rate,
            concurrency=o.concurrency,
            run_id=self.run_id,
            retry=o.client_retries,
        )
        injector = Injector(
            self._reactor,
            self.stack,
            self.ledger,
            self.function,
            self.receiver,
            function_name=FUNCTION,
            run_id=self.run_id,
            timings=o.timings,
        )
        progress = task.LoopingCall(self._progress, driver, injector)
        progress.clock = self._reactor
        progress.start(10, now=False).addErrback(lambda f: self.log.failure("progress", f))
        poller = StatusPoller(self._reactor, self.stack.gateway_url)
        try:
            load = defer.Deferred.fromCoroutine(driver.run(o.calls))
            faults = defer.Deferred.fromCoroutine(injector.run(kinds, o.calls / o.rate))
            results = await defer.DeferredList([load, faults], consumeErrors=True)
            for success, value in results:
                if not success:
                    value.raiseException()
            self.ledger.load_seconds = results[0][1]
            await self._drain(poller)
            await self._finish(poller)
        finally:
            if progress.running:
                progress.stop()
            await driver.close()
            await poller.close()
        summary = summarize(self.ledger, strict_callbacks=o.strict_callbacks)
        title = (
            f"txfaas fault suite, run {self.run_id}: {o.calls} calls at {o.rate:g}/s, "
            f"broker {'private node' if self.stack.private_broker else 'SHARED (no broker restart)'}"
        )
        text = table(summary, title)
        report_path = o.report or str(Path(tempfile.gettempdir()) / f"txfaas-faults-{self.run_id}.json")
        extra = {
            "run": self.run_id,
            "options": attrs.asdict(o),
            "notes": self.stack.notes,
            "logs": self.stack.log_paths() if not summary.ok or o.keep_logs else [],
            "lost": summary.lost,
        }
        Path(report_path).write_text(report_json(summary, self.ledger, extra))
        return Outcome(
            summary, self.ledger, text, report_path, list(self.stack.notes), self.stack.private_broker
        )

    def _progress(self, driver: LoadDriver, injector: Injector) -> None:
        accepted = sum(1 for a in self.ledger.sent.values() if a == ACCEPTED)
        self.log.info(
            "sent {sent} answered {answered} accepted {accepted} retries {retries} executions {ex} "
            "callbacks {cb} fault {fault}",
            sent=driver.sent,
            answered=driver.answered,
            retries=driver.retries,
            accepted=accepted,
            ex=len(self.ledger.executions),
            cb=len(self.ledger.callbacks),
            fault=injector.current or "-",
        )

    async def _drain(self, poller: StatusPoller) -> None:
        """Wait until the work queue holds nothing but circulating poison and every accepted call
        is settled.  Statuses are read only while the queue looks drained: reading
        them is load on the cores the workers need, and a received callback settles a call
        by itself (the worker writes the final record before it calls back)."""
        start = self._reactor.seconds()
        deadline = start + self.options.drain_timeout
        unsettled = [c for c, a in self.ledger.sent.items() if a == ACCEPTED]
        poison = [c for c, kind in self.ledger.poison.items() if kind == "unprocessable"]
        admin = self.stack.admin
        assert admin is not None
        while True:
            await poller.poll(poison, self.ledger.records)
            circulating = sum(
                1 for c in poison if (self.ledger.records.get(c) or {}).get("status") not in FINAL
            )
            ready = await admin.ready_count(self.stack.queue)
            held = await self.stack.worker_in_flight()
            # What workers hold is not waited for: with retries, callbacks and dead letters they may
            # hold messages that are no accepted call's (it is reported at the end).
            quiet = ready is not None and ready <= circulating
            self.ledger.held = held
            unsettled = [c for c in unsettled if not _settled(self.ledger, c)]
            if quiet and unsettled:
                await poller.poll(unsettled, self.ledger.records)
                unsettled = [c for c in unsettled if not _settled(self.ledger, c)]
            if quiet and not unsettled:
                self.ledger.drained = True
                self.ledger.drain_seconds = self._reactor.seconds() - start
                return
            if self._reactor.seconds() > deadline:
                self.log.warn(
                    "not drained after {t:g}s: {n} accepted call(s) unsettled, {ready} ready, {held} held",
                    t=self.options.drain_timeout,
                    n=len(unsettled),
                    ready=ready,
                    held=held,
                )
                return
            await self.sleep(1.0)

    async def _finish(self, poller: StatusPoller) -> None:
        """Read every record not known final yet (for the final-status counts, the calls not
        accepted that ran anyway, and the poison)."""
        unknown = [c for c in [*self.ledger.sent, *self.ledger.poison] if not _final(self.ledger, c)]
        await poller.poll(unknown, self.ledger.records)
        self.ledger.undecodable_rejections = self.stack.worker_logs().count("undecodable message")
        try:
            self.ledger.dead_letters = await poller.dead_letters()
        except Exception as e:
            self.log.warn("could not list the dead letters: {error}", error=e)
        admin = self.stack.admin
        assert admin is not None
        for name in await self.stack.queue_names():
            count = await admin.ready_count(name)
            if count is not None:
                self.ledger.queues[name] = count

    async def _close(self, keep_logs: bool) -> None:
        try:
            await self.stack.close(keep_logs=keep_logs)
        finally:
            await self.receiver.close()
            for port in self._ports:
                await defer.maybeDeferred(port.stopListening)
            shutil.rmtree(self.workdir, ignore_errors=True)


async def run(reactor: Any, options: RunOptions) -> Outcome:
    """One whole fault run (raises :class:`StackError` when the stack cannot start)."""
    return await Run(reactor, options).execute()


def parse_args(argv: list[str]) -> RunOptions:
    parser = argparse.ArgumentParser(
        prog="scripts/faults",
        description="Post N calls through a private txfaas stack while injecting faults; "
        "print the ledger (lost must be 0). Exit 1 on any loss or unexpected callback.",
    )
    parser.add_argument("--calls", type=int, help="calls to post (default 10000; 300 with --quick)")
    parser.add_argument(
        "--quick", action="store_true", help="the CI-sized run: ~300 calls, each fault once or twice"
    )
    parser.add_argument("--rate", type=float, help="calls per second (default 100; 10 with --quick)")
    parser.add_argument(
        "--concurrency", type=int, help="calls in flight at most (default 64; 16 with --quick)"
    )
    parser.add_argument(
        "--rounds", type=int, help="times each fault is injected (default 3; 1-2 with --quick)"
    )
    parser.add_argument(
        "--faults",
        help=f"comma-separated subset of: {','.join(KINDS)} (or the self-test 'purge', which must fail)",
    )
    parser.add_argument(
        "--lenient-callbacks",
        action="store_true",
        help="do not count a succeeded call whose callback was given up (callbackState failed) as lost",
    )
    parser.add_argument(
        "--no-client-retries",
        action="store_true",
        help="post each call once (by default a client retries under its X-Call-Id until it gets a 202)",
    )
    parser.add_argument("--drain-timeout", type=float, help="seconds to wait for the queue to drain")
    parser.add_argument("--shared-broker", action="store_true", help="use 127.0.0.1:5672 (no broker restart)")
    parser.add_argument(
        "--report", help="where to write the JSON report (default /tmp/txfaas-faults-<run>.json)"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the gateway/worker logs even on success"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = RunOptions.quick() if args.quick else RunOptions()
    changes: dict[str, Any] = {"seed": args.seed, "keep_logs": args.keep_logs, "report": args.report}
    for name in ("calls", "rate", "concurrency", "drain_timeout"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    rounds = dict(options.rounds)
    if args.rounds is not None:
        rounds = dict.fromkeys(KINDS, args.rounds)
    if args.faults:
        wanted = {k.strip() for k in args.faults.split(",") if k.strip()}
        unknown = wanted - set(KINDS) - set(SELF_TESTS)
        if unknown:
            parser.error(f"unknown fault(s): {', '.join(sorted(unknown))}")
        rounds = {k: (rounds.get(k) or 1) if k in wanted else 0 for k in KINDS + SELF_TESTS}
    changes["rounds"] = rounds
    if args.shared_broker:
        changes["private_broker"] = False
    if args.lenient_callbacks:
        changes["strict_callbacks"] = False
    if args.no_client_retries:
        changes["client_retries"] = False
    return attrs.evolve(options, **changes)


def _ours_or_warnings(event: dict[str, Any]) -> Any:
    """Log the suite's own info lines, and only warnings and errors of everything else."""
    from twisted.logger import LogLevel, PredicateResult

    if str(event.get("log_namespace", "")).startswith("tests.faults"):
        return PredicateResult.yes
    level = event.get("log_level", LogLevel.info)
    return PredicateResult.yes if level >= LogLevel.warn else PredicateResult.no


def main(argv: list[str] | None = None) -> None:
    from twisted.logger import FilteringLogObserver, globalLogBeginner, textFileLogObserver

    options = parse_args(sys.argv[1:] if argv is None else argv)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [_ours_or_warnings])], redirectStandardIO=False
    )

    async def go(reactor: Any) -> None:
        start = reactor.seconds()
        try:
            outcome = await run(reactor, options)
        except StackError as e:
            sys.stderr.write(f"faults: cannot set up the run: {e}\n")
            raise SystemExit(2) from None
        for note in outcome.notes:
            sys.stdout.write(note + "\n")
        sys.stdout.write(outcome.table + "\n")
        sys.stdout.write(f"report: {outcome.report_path}\nwall time: {reactor.seconds() - start:.0f} s\n")
        if not outcome.summary.ok:
            raise SystemExit(1)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)))
