"""Prefect's self-hosted production topology on this machine, for the tests, the benchmarks and people.

PostgreSQL and Redis must already run (127.0.0.1:5432 with trust auth for ``postgres``,
127.0.0.1:6379); ``prefect-redis`` must be installed (a dev dependency). ``Topology``
creates a database of its own and claims an empty Redis database index, migrates once,
and starts two API replicas (``prefect server start --no-services``) and one
``prefect server services start``, every one with the Redis message broker and an
API auth string. ``close()`` stops them, drops the database and flushes the index.

Run ``python -m flowsubmit.local.topology`` to start one and print how to reach it (Ctrl-C
stops it and removes its data).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from flowsubmit.local.localserver import LocalServer, prefect_env, start_prefect, stop_process

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["Topology", "claim_redis_db", "release_redis_db"]

POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379"
#: The key that marks a Redis database index as taken by one topology (removed by its flush).
_OWNER_KEY = "flowsubmit:topology:owner"
#: Database connections per Prefect process: three processes per topology, and several test
#: sessions share one PostgreSQL (100 connections by default).
_POOL = {
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "4",
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "6",
}


class Topology:
    """Owns one production-style Prefect: a PostgreSQL database, a Redis database index,
    two API replicas (``a`` and ``b``, each a ``LocalServer``) and one services process.

    Clients of either replica must send ``auth_string`` (``PREFECT_API_AUTH_STRING``);
    ``a.env()`` and ``b.env()`` carry it. ``api_url`` and ``env()`` are replica A's, so
    a topology can stand in for a ``LocalServer``. Replicas may be stopped and started
    again on their ports (outage tests) with ``a.stop()`` / ``a.start()``.
    """

    def __init__(
        self,
        home: Path | None = None,
        *,
        auth_string: str | None = None,
        postgres: str = POSTGRES,
        redis: str = REDIS,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self._tmp = None if home else tempfile.TemporaryDirectory(prefix="flowsubmit-topology-")
        self.home = home or Path(self._tmp.name)  # type: ignore[union-attr]
        self.home.mkdir(parents=True, exist_ok=True)
        self.auth_string = auth_string or secrets.token_urlsafe(16)
        self.postgres = postgres
        self.redis = redis
        #: Prefect settings every server process of the topology gets besides its own.
        self.server_settings = dict(server_settings or {})
        self.database = f"flowsubmit_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.redis_db: int | None = None
        self.services: subprocess.Popen[bytes] | None = None
        client = {"PREFECT_API_AUTH_STRING": self.auth_string}
        self.a = LocalServer(
            self.home, log_file=self.home / "replica-a.log", client_env=client, services=False
        )
        self.b = LocalServer(
            self.home, log_file=self.home / "replica-b.log", client_env=client, services=False
        )

    @property
    def api_url(self) -> str:
        """Replica A's API URL."""
        return self.a.api_url

    @property
    def port(self) -> int:
        """Replica A's port."""
        return self.a.port

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a client of replica A, credentials included."""
        return self.a.env(**extra)

    def server_env(self) -> dict[str, str]:
        """The settings every server process of this topology shares."""
        assert self.redis_db is not None, "start() first"
        redis_url = f"{self.redis}/{self.redis_db}"
        return {
            "PREFECT_API_DATABASE_CONNECTION_URL": f"{self.postgres}/{self.database}",
            # Migrated once by start(); replicas migrating at once would race each other.
            "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_URL": redis_url,
            "PREFECT_SERVER_DOCKET_URL": redis_url,
            "PREFECT_SERVER_API_AUTH_STRING": self.auth_string,
            **_POOL,
            **self.server_settings,
        }

    def start(self, timeout_s: float = 300.0) -> None:
        """Create the database, claim a Redis index, migrate, start both replicas and the services."""
        asyncio.run(_postgres(self.postgres, f'CREATE DATABASE "{self.database}"'))
        self.redis_db = claim_redis_db(self.redis)
        env = self.server_env()
        self.a.server_env = env
        # Every replica registers Prefect's block types at start-up; two at once collide on
        # a unique key and one exits (Prefect 3.9.1). Replica A registers them for both.
        self.b.server_env = {**env, "PREFECT_API_BLOCKS_REGISTER_ON_START": "false"}
        migrate = subprocess.run(
            [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
            env=prefect_env(self.home, extra=env),
            capture_output=True,
            timeout=timeout_s,
        )
        if migrate.returncode != 0:
            raise RuntimeError(
                f"prefect server database upgrade failed: {migrate.stderr.decode()[-2000:]}"
            )
        services_env = prefect_env(self.home, self.b.api_url, env)
        self.services = start_prefect(
            ["server", "services", "start"], services_env, self.home / "services.log"
        )
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(r.start, timeout_s) for r in (self.a, self.b)]:
                started.result()
        if self.services.poll() is not None:
            raise RuntimeError(
                f"prefect server services exited with {self.services.returncode}; see {self.home / 'services.log'}"
            )

    def stop(self) -> None:
        """Stop the services and both replicas; the data stays."""
        stop_process(self.services)
        self.services = None
        self.a.stop()
        self.b.stop()

    def close(self) -> None:
        """Stop everything, drop the database, flush the Redis index, remove the temporary home."""
        self.stop()
        try:
            asyncio.run(
                _postgres(self.postgres, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            )
        finally:
            if self.redis_db is not None:
                release_redis_db(self.redis_db, self.redis)
                self.redis_db = None
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self) -> Topology:
        try:
            self.start()
        except BaseException:  # Ctrl-C or a failure while starting: leave nothing behind
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def claim_redis_db(redis: str = REDIS) -> int:
    """Claim an empty Redis database index (1 and up; 0 is everyone's default) for one topology.

    A set-if-absent of ``_OWNER_KEY`` decides between sessions claiming at once; an index
    holding anything else is in use (or left by a crash) and skipped. The claim ends
    when the index is flushed.
    """
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    with _redis_client(redis, 0) as client:
        databases = int(str(client.config_get("databases")["databases"]))
    for db in range(1, databases):
        with _redis_client(redis, db) as client:
            if client.set(_OWNER_KEY, owner, nx=True):
                if client.dbsize() == 1:
                    return db
                client.delete(_OWNER_KEY)  # someone else's data lives here: give it back
    raise RuntimeError(f"no empty Redis database index left at {redis} (all {databases} in use)")


def release_redis_db(db: int, redis: str = REDIS) -> None:
    """Flush a claimed Redis database index, which frees it for the next claim."""
    with _redis_client(redis, db) as client:
        client.flushdb()


def _redis_client(redis: str, db: int) -> Redis:
    from redis import Redis  # a dev dependency (prefect-redis brings it)

    return Redis.from_url(f"{redis}/{db}", decode_responses=True)


async def _postgres(url: str, statement: str) -> None:
    """Run one statement outside a transaction on the server's ``postgres`` database."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"{url}/postgres", isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    """Start a topology, print how to reach it, and remove it on Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m flowsubmit.local.topology", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--auth-string", help="the API auth string (default: a random one)")
    args = parser.parse_args(argv)

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    topology = Topology(auth_string=args.auth_string)
    try:
        with topology:
            print(_describe(topology), flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped; database dropped and Redis index flushed", flush=True)


def _describe(topology: Topology) -> str:
    return "\n".join(
        [
            f"replica A:  {topology.a.api_url}   (log {topology.a.log_file})",
            f"replica B:  {topology.b.api_url}   (log {topology.b.log_file})",
            f"services:   pid {topology.services.pid if topology.services else '-'}   (log {topology.home / 'services.log'})",
            f"database:   {topology.postgres}/{topology.database}",
            f"redis:      {topology.redis}/{topology.redis_db}",
            "clients:",
            f"  export PREFECT_API_URL={topology.a.api_url}",
            f"  export PREFECT_API_AUTH_STRING={topology.auth_string}",
            "Ctrl-C stops everything and removes the data.",
        ]
    )


if __name__ == "__main__":
    main()
