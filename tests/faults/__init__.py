"""The fault suite: proves that no accepted call is lost while faults are injected.

One run (``scripts/faults``, or ``python -m tests.faults``) starts everything privately on
loopback: a RabbitMQ node of its own (own ports and mnesia dir, so ``stop_app`` never touches
the shared broker), a Redis child process, one ``faas-gateway`` and two ``faas-worker``
processes whose AMQP connections go through :class:`tests.tcpproxy.TCPProxy` instances, a
function that records every execution, and a callback receiver that records every callback.
A load driver posts N calls while the faults of :mod:`tests.faults.injectors` are injected;
then the run waits for every accepted call to reach a final status and for the queue to
drain, and prints the ledger of ``reliability.md`` (:mod:`tests.faults.ledger`).

Modules:

- :mod:`tests.faults.ledger`: the pure bookkeeping: what was sent, executed, called back and
  recorded, which faults happened when; the summary (lost, unexpected, duplicates explained
  by crash windows, ...) and the table.
- :mod:`tests.faults.servers`: the function and the callback receiver (Twisted web servers).
- :mod:`tests.faults.driver`: the load driver.
- :mod:`tests.faults.stack`: the private broker, Redis, gateway, workers and proxies.
- :mod:`tests.faults.injectors`: the faults and their schedule.
- :mod:`tests.faults.runner`: one whole run, and the command line.
"""
