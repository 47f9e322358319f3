"""The daemon on Prefect's production topology: PostgreSQL, Redis messaging, two API replicas, auth.

The daemon talks to replica A; the served flows and the test driver talk to replica B, so
every state change is committed through B and every final event reaches A's websocket
only through Redis. ``pytest -m production`` runs these alone.
"""

from __future__ import annotations

import pytest
from redis import Redis

from flowsubmit.topology import REDIS, claim_redis_db, release_redis_db

pytestmark = pytest.mark.production


def test_two_claims_get_distinct_redis_indexes_and_a_released_one_is_empty() -> None:
    """Two claims get different Redis database indexes; releasing one empties it, so the next claim may take it."""
    first = claim_redis_db()
    try:
        second = claim_redis_db()
        with Redis.from_url(f"{REDIS}/{second}") as client:
            assert client.dbsize() == 1  # the owner key: no other claim accepts the index
            release_redis_db(second)
            assert client.dbsize() == 0  # what a claim requires
        assert first != second
    finally:
        release_redis_db(first)
