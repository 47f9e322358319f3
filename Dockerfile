# flowsubmit daemon image. Prefect is configured the Prefect way at run time:
#   docker run -e PREFECT_API_URL=http://prefect:4200/api -v /srv/queue:/var/spool/flowsubmit flowsubmit
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 flowsubmit \
 && useradd --system --uid 10001 --gid flowsubmit --home-dir /nonexistent --shell /usr/sbin/nologin flowsubmit \
 && mkdir -p /var/spool/flowsubmit \
 && chown flowsubmit:flowsubmit /var/spool/flowsubmit \
 && chmod 0750 /var/spool/flowsubmit

WORKDIR /opt/flowsubmit
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN pip install . && rm -rf /opt/flowsubmit/daemon

USER flowsubmit:flowsubmit
VOLUME ["/var/spool/flowsubmit"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["flowsubmit", "run", "--queue", "/var/spool/flowsubmit"]
