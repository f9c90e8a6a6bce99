"""Fixtures for every test directory: real PostgreSQL and Redis servers (tests/stores.py), started once
per session on first use."""

from tests.demo_suite import demo_suite  # noqa: F401  (the suite on the demo catalogue, once per session)
from tests.stores import pg_url, postgres, postgres_server, redis_db, redis_server  # noqa: F401  (fixtures)
