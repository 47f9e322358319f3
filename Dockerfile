# flowsubmit daemon image. Prefect is configured the Prefect way at run time:
#   docker run -e PREFECT_API_URL=http://prefect:4200/api -v /srv/queue:/var/spool/flowsubmit flowsubmit
# Without PREFECT_API_URL the daemon refuses to start (exit 2); it never starts a Prefect server of its own.
# A pinned base: an exact Python patch release on an exact Debian release (rebuild to update it).
FROM python:3.11.13-slim-bookworm

# PREFECT_HOME: Prefect's client keeps its profile and caches there; it must be writable by the
# unprivileged user (the default, ~/.prefect, is not: the user has no home).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_HOME=/var/lib/flowsubmit/prefect \
    FLOWSUBMIT_LOG_FORMAT=json

RUN groupadd --system --gid 10001 flowsubmit \
 && useradd --system --uid 10001 --gid flowsubmit --home-dir /nonexistent --shell /usr/sbin/nologin flowsubmit \
 && mkdir -p /var/spool/flowsubmit /var/lib/flowsubmit/prefect \
 && chown flowsubmit:flowsubmit /var/spool/flowsubmit /var/lib/flowsubmit /var/lib/flowsubmit/prefect \
 && chmod 0750 /var/spool/flowsubmit /var/lib/flowsubmit

WORKDIR /opt/flowsubmit
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN pip install . && rm -rf /opt/flowsubmit/daemon

USER flowsubmit:flowsubmit
VOLUME ["/var/spool/flowsubmit"]
# Healthy while a daemon in this container passes its loop and Prefect answers (docs/metrics.md);
# reads the heartbeat file in the queue, so no port is needed. start-period covers a slow Prefect.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["flowsubmit", "health", "--queue", "/var/spool/flowsubmit"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["flowsubmit", "run", "--queue", "/var/spool/flowsubmit"]
