# RabbitMQ and Redis from Debian's packages, for machines that cannot pull the official images
# (used by docker/compose.local.yaml; users keep rabbitmq:3.13 and redis:7).  BASE is a Debian
# bookworm image, e.g. the one scripts/docker-test makes with debootstrap.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS rabbitmq
RUN apt-get -o Acquire::Check-Valid-Until=false update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends rabbitmq-server \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    # As the official image: users may log in from other hosts (the compose network only here);
    # the user itself comes from a secret mounted in conf.d (see compose.yaml).
    && printf 'loopback_users = none\nlisteners.tcp.default = 5672\n' > /etc/rabbitmq/rabbitmq.conf \
    && install -d /etc/rabbitmq/conf.d \
    && install -d -o rabbitmq -g rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
USER rabbitmq
ENV HOME=/var/lib/rabbitmq \
    RABBITMQ_LOGS=-
EXPOSE 5672
CMD ["rabbitmq-server"]

FROM ${BASE} AS redis
RUN apt-get -o Acquire::Check-Valid-Until=false update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && install -d -o redis -g redis /data
USER redis
WORKDIR /data
EXPOSE 6379
# As the official image: no protected mode (which refuses every other host without a password);
# appended to whatever command compose gives.
ENTRYPOINT ["sh", "-c", "exec \"$@\" --protected-mode no", "redis"]
CMD ["redis-server"]
