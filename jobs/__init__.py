"""Entrypoints for `ray job submit` (simulate history, train a model, backfill
scores), each `main(argv) -> int`, idempotent. The top layer with `deployments`:
it may import `configs`, `features`, `scoring` and `cluster`, never `deployments`."""
