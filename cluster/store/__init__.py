"""The audit store: SQLAlchemy models, the repositories that write and read
them, the local spool in front of them while PostgreSQL is down, and Alembic
migrations applied once per database under an advisory lock. Imports `configs`
and `cluster.dev.records` (for the URL) only."""
