# The mmsim image: `mmsim serve` by default; with Debian's nginx 1.22 as well, so the same image runs
# the gRPC proxy of docker-compose.yml (deploy/nginx.conf), whose healthcheck is `mmsim health-probe`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx \
 && rm -rf /var/lib/apt/lists/*

# mmsim without extras (the server and the SDK), its dependencies at the tested versions of requirements.lock.
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY server ./server
COPY client ./client
COPY loadgen ./loadgen
COPY proto ./proto
RUN pip install --no-cache-dir . -c requirements.lock \
 && rm -rf /src

# Not root: the server and nginx (deploy/nginx.conf writes only under /tmp and listens above 1024).
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin mmsim
USER mmsim
WORKDIR /home/mmsim

# 7077: gRPC (the server, or the proxy in front of the shards); 9100: Prometheus /metrics.
EXPOSE 7077 9100
ENTRYPOINT ["mmsim"]
CMD ["serve", "--listen", "0.0.0.0:7077", "--insecure"]
