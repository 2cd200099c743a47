"""``twistd faas-worker``: consumes queued calls, invokes functions, records outcomes, delivers callbacks.

- :mod:`~txfaas.worker.service`: the service; takes deliveries and settles each once its work is done
- :mod:`~txfaas.worker.call`: one call's run (claim, invoke, retry or outcome)
- :mod:`~txfaas.worker.callback_jobs`, :mod:`~txfaas.worker.dead_letters`: what follows a call
- :mod:`~txfaas.worker.records`: the one writer of call records
- :mod:`~txfaas.worker.jobs`: the job table (in flight, slots, answer memory)
- :mod:`~txfaas.worker.invoke`, :mod:`~txfaas.worker.callback`: the function's and the callback's HTTP request
- :mod:`~txfaas.worker.config`, :mod:`~txfaas.worker.metrics`, :mod:`~txfaas.worker.context`
- :mod:`~txfaas.worker.web`: ``/healthz`` and ``/metrics``
- :mod:`~txfaas.worker.tap`: options and the only place real objects are built
"""
