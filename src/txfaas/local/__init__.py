"""``twistd faas-local``: gateway and worker in one process on an in-memory queue and store.

For trying txfaas without RabbitMQ and Redis.  Nothing is durable: a restart
forgets every function, call and queued message.
"""
