"""Kafka ingestion: consumer-group actors that score, audit, then commit.

    python -m cluster.ingest [--actors N]    # on a running Ray cluster, until Ctrl-C

Each ingestion actor is one member of `settings.kafka_consumer_group` and runs
one loop on its own thread:

1. poll at most `settings.ingest_poll_max_records` messages; one batch may be
   scored while the one before it is audited, never more (nothing else is
   polled until the older one is committed: that is the backpressure);
2. validate every message; poison (oversized, not JSON, invalid fields, a
   transaction id already recorded with another payload) becomes a dead letter;
   a message without `transaction_id` gets one derived from its position, so a
   redelivery maps to the same audit row; an id already audited with the same
   payload is skipped, never re-scored;
3. score the valid ones with one call of the scoring application;
4. publish dead letters and alerts (anomalies) and flush the producer;
5. write the dead-letter rows, then the audit rows, each in one idempotent
   insert, retried with exponential backoff while PostgreSQL is unreachable;
6. commit, per partition, the offset after the batch's last message.

Nothing is committed that is not audited or dead-lettered; anything audited but
not committed (a crash, a rebalance) is redelivered and skipped as a duplicate.
Any other failure rewinds the consumer to the first offsets of the batches in
flight (at most two) and retries them after a backoff. Alerts are published before the audit insert,
so they are delivered at least once.

The scoring application is reached through `ScoreBatch`, a plain callable (with
an optional `submit` that returns before the scores, as `ServeScorer` has), so
the loop runs against hand-written fakes in unit tests.

The package: `batch` (one batch's steps), `worker` (the loop of one member),
`retry` (what is transient, the backoff), `actors` (the Ray actors, their
consumer and scorer), `__main__` (the command).
"""

from cluster.ingest.actors import (
    SCORING_APP,
    Ingestion,
    IngestActor,
    ServeScorer,
    audit_store,
    make_consumer,
    start_ingestion,
    stop_ingestion,
)
from cluster.ingest.batch import SOURCE, Batch, BatchOutcome, BatchProcessor, Message, ScoreBatch, decode, position
from cluster.ingest.retry import Backoff, BatchAbandoned, is_transient
from cluster.ingest.worker import MAX_ATTEMPTS, IngestWorker

__all__ = ["MAX_ATTEMPTS", "SCORING_APP", "SOURCE", "Backoff", "Batch", "BatchAbandoned", "BatchOutcome",
           "BatchProcessor", "IngestActor", "IngestWorker", "Ingestion", "Message", "ScoreBatch", "ServeScorer",
           "audit_store", "decode", "is_transient", "make_consumer", "position", "start_ingestion",
           "stop_ingestion"]
