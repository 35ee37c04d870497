"""The audit store: SQLAlchemy models, the repositories that write and read
them, and Alembic migrations applied once per database under an advisory lock."""
