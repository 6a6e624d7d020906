"""Database: SQLAlchemy models, Alembic migrations and session helpers.

Public API:

- `database_url(env) -> str`: the database URL from SLLM_DATABASE_URL, else
  SQLite under SLLM_HOME.
- `Database(url, *, pool_size=10, echo=False)`: engine, `session(write=False)`,
  `connect(write=False)` (a Core connection in a transaction),
  `autocommit(write=False, *, durable=True)` (each statement commits by itself),
  `prepare(statement, *, write, durable=True)` -> `Prepared` (compiled once, `.run(params)`
  on the driver: the hot path's statements),
  `upgrade()`, `current_revision()`, `dispose()`, and `url`, `dialect`, `engine`.
- Models (one table each): `Namespace`, `ApiKey`, `Function`, `Activation`,
  `Invoker`, `Instance`; their declarative `Base` (`Base.metadata`);
  `table(Model)`: a model's Core `Table`.
- `postgres_unreachable(admin_url)`, `scratch_postgres_database(admin_url, prefix)`:
  throw-away databases for tests and benchmarks.
"""

from sllm.db._database import Database, Prepared, database_url
from sllm.db._models import (
    Activation,
    ApiKey,
    Base,
    Function,
    Instance,
    Invoker,
    MigrationRequest,
    Namespace,
    table,
)
from sllm.db._scratch import postgres_unreachable, scratch_postgres_database

__all__ = [
    "Activation",
    "ApiKey",
    "Base",
    "Database",
    "Function",
    "Instance",
    "Invoker",
    "MigrationRequest",
    "Namespace",
    "Prepared",
    "database_url",
    "postgres_unreachable",
    "scratch_postgres_database",
    "table",
]
