"""``twistd faas-watchdog``: runs any program as an OpenFaaS-style function over HTTP.

- :mod:`~txfaas.watchdog.tap`: options (flags falling back to OpenFaaS's
  environment variables) and ``makeService``, the only place real objects are built.
- :mod:`~txfaas.watchdog.server`: the HTTP front (read/write/exec timeouts,
  ``max_inflight``, ``/_/health``, draining on stop) around a runner.
- :mod:`~txfaas.watchdog.fork`: fork mode, a process per request.
- :mod:`~txfaas.watchdog.http`: http mode, one long-running server, proxied.
- :mod:`~txfaas.watchdog.process`: process groups, kills, reaping, output logging.
- :mod:`~txfaas.watchdog.common`: the frozen config and what the front and runners exchange.

Importing this package imports nothing heavy (no reactor).
"""
