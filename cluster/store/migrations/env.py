"""Alembic environment: runs on the connection handed over by `cluster.store.migrate`."""

from alembic import context

from cluster.store.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
