"""Cluster plumbing: embedded PostgreSQL and Kafka-protocol broker (`cluster.dev`),
the audit store (SQLAlchemy models, repository, Alembic migrations), the model
registry, and the Kafka producer, ingestion actors and dead-letter tools."""
