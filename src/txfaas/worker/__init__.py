"""``twistd faas-worker``: consumes queued calls, invokes functions, records outcomes, delivers callbacks.

- :mod:`txfaas.worker.service`: :class:`~txfaas.worker.service.WorkerService` (one message, start to ack)
- :mod:`txfaas.worker.callback`: callback delivery and Standard Webhooks signing
- :mod:`txfaas.worker.web`: ``/healthz`` and ``/metrics``
- :mod:`txfaas.worker.tap`: options and the only place real objects are built
"""
