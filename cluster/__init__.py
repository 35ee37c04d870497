"""Cluster plumbing, one sub-package or module per part: `cluster.ingest` (the
Kafka ingestion actors), `cluster.store` (the audit store: models, repository,
spool, migrations), `cluster.dev` (the embedded PostgreSQL and broker, and where
servers are), `cluster.registry` (model versions), `cluster.producer` and
`cluster.deadletters` (Kafka tools), `cluster.metrics`. It may import `configs`,
`features` and `scoring`; never `jobs` or `deployments`."""
