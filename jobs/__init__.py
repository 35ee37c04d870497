"""Entrypoints for `ray job submit`: simulate history, train a model, backfill scores."""
