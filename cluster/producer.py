"""Send live transactions to Kafka: simulated ones, or those of a file.

    python -m cluster.producer [--count N] [--rate R] [--input PATH] [--seed S]

Messages are JSON objects with the transaction fields only (the labels
`is_fraud` and `scenario` are dropped), keyed by `user_id` so that one user's
transactions stay in order on one partition. Without `--rate` they go as fast
as the broker takes them.

Simulated transactions are new purchases of the customers of the bootstrap
sample (`data/sample_transactions.csv`, `jobs.simulate --users 400 --days 30
--seed 7`), whom the demo's bootstrap model was trained on and its online state
warmed with: the same users, homes, merchants and spending. They end about now,
so that they pass the clock-skew check and look live, and span as many days as
`--count` needs (the 400 customers make about 900 purchases a day). Traffic from
strangers would not do: every first purchase of a user the state has never seen
has cold-start features (no previous event, new merchant, new country), which
the sample holds only at its very beginning, so each one is an alert.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.settings import Settings, get_settings

log = logging.getLogger(__name__)

MESSAGE_FIELDS = ("transaction_id", "user_id", "amount", "merchant", "country", "timestamp")
DEFAULT_PARTITIONS = 4
TRANSACTIONS_PER_USER_DAY = 2.0  # about what jobs.simulate draws
# The bootstrap sample's customers: data/sample_transactions.csv is
# `jobs.simulate --users 400 --days 30 --seed 7` (tests/unit/test_simulate.py).
DEMO_USERS = 400
DEMO_POPULATION = (7, 30)  # (seed, days) of that run, as cluster.simulation.simulate(population=...) takes it


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int = DEFAULT_PARTITIONS) -> None:
    """Create the topics that do not exist yet (an existing topic is left as it is)."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        missing = set(topics) - set(admin.list_topics())
        if missing:
            admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1)
                                 for t in sorted(missing)], raise_errors=False)
    finally:
        admin.close()


def simulated_transactions(count: int, seed: int = 0, days: int | None = None,
                           fraud_rate: float | None = None) -> list[dict[str, Any]]:
    """`count` simulated transactions ending about now, oldest first, without labels.

    By default, new purchases of the bootstrap sample's customers (`DEMO_POPULATION`)
    over as many days as `count` needs. With `days`, they span that many days
    instead, from a population of strangers sized to fit (for load tests that
    rename users anyway); `seed` then draws the population too.
    """
    import pandas as pd

    from cluster.simulation import DEFAULT_FRAUD_RATE, simulate

    fraud_rate = DEFAULT_FRAUD_RATE if fraud_rate is None else fraud_rate
    end = pd.Timestamp.now(tz="UTC").floor("s") - pd.Timedelta(minutes=5)
    if days is None:
        users, population = DEMO_USERS, DEMO_POPULATION
        days = math.ceil(count / (DEMO_USERS * TRANSACTIONS_PER_USER_DAY))
    else:
        users, population = max(10, int(count / (days * TRANSACTIONS_PER_USER_DAY) * 1.2)), None
    while True:
        df = simulate(users=users, days=days, seed=seed, start=end - pd.Timedelta(days=days),
                      fraud_rate=fraud_rate, population=population)
        if len(df) >= count:
            break
        if population is None:
            users *= 2
        else:
            days *= 2
    return frame_to_messages(df.tail(count))


def frame_to_messages(df) -> list[dict[str, Any]]:
    """Rows of a transactions frame as message dicts (ISO timestamps, no labels)."""
    import pandas as pd

    out = df[[c for c in MESSAGE_FIELDS if c in df.columns]].copy()
    if "timestamp" in out and pd.api.types.is_datetime64_any_dtype(out["timestamp"]):
        out["timestamp"] = out["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out.to_dict("records")


def read_transactions(path: Path) -> list[dict[str, Any]]:
    """A CSV, Parquet or JSON-lines file of transactions."""
    import pandas as pd

    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".ndjson"):
        df = pd.read_json(path, lines=True)
    else:
        df = pd.read_csv(path, dtype={"user_id": str, "merchant": str, "country": str,
                                      "transaction_id": str})
    return frame_to_messages(df)


class KafkaSender:
    """A Kafka producer on librdkafka (confluent-kafka): `send` queues a message,
    `flush` waits for every queued one and raises if any since the last flush
    was not delivered. The one producer of the project (transactions, alerts,
    dead letters, replays); kafka-python's pure-Python producer cost ~130 us of
    CPU a message here, this one ~6-9.

    Idempotent with acks=all: a retry inside the client neither duplicates nor
    reorders, so one user's transactions stay in order on their partition.
    """

    def __init__(self, bootstrap: str, *, linger_ms: int = 5, timeout_s: float = 60.0,
                 config: dict[str, Any] | None = None) -> None:
        """`config`: more librdkafka settings. The client retries each message for up
        to `message.timeout.ms` (5 minutes by default); `flush` stops waiting after
        timeout_s."""
        from confluent_kafka import Producer

        self.timeout_s = timeout_s
        self._producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                   "enable.idempotence": True, "linger.ms": linger_ms, **(config or {})})
        self._failed: list[str] = []

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed.append(f"{msg.topic()}: {err.str()}")

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._delivered)
                break
            except BufferError:  # the client's queue is full: wait for deliveries (backpressure)
                self._producer.poll(0.05)
        self._producer.poll(0)  # serve delivery reports
        self._raise_failures()  # a long stream stops at its first failure, not at the end

    def flush(self) -> None:
        """Waits for every queued message. Still queued after timeout_s (the broker is
        unreachable): ConnectionError, and a later flush waits for them again. Any
        message that failed for good: RuntimeError (also from `send`, once its
        report arrives); it is not retried, the caller sends it again if it must."""
        left = self._producer.flush(self.timeout_s)
        self._raise_failures()
        if left:
            raise ConnectionError(f"{left} Kafka messages not delivered within {self.timeout_s:g}s")

    def _raise_failures(self) -> None:
        failed, self._failed = self._failed, []
        if failed:
            raise RuntimeError(f"{len(failed)} Kafka messages were not delivered, the first: {failed[0]}")

    def close(self) -> None:
        """Delivers what is queued within 10 s; drops the rest, with a warning."""
        left = self._producer.flush(min(self.timeout_s, 10.0))
        if left:
            log.warning("closing a Kafka producer with %d messages undelivered; they are dropped", left)
            self._producer.purge()
            self._producer.flush(0)


@dataclass
class ProduceReport:
    sent: int
    seconds: float
    first_sent_at: float  # time.time() of the first send

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else float("inf")


def encode(message: dict[str, Any] | bytes) -> bytes:
    return message if isinstance(message, bytes) else json.dumps(message, separators=(",", ":")).encode()


def produce(bootstrap: str, topic: str, messages: Iterable[dict[str, Any] | bytes], *,
            rate: float | None = None, key: Callable[[Any], bytes | None] | None = None,
            progress: Callable[[int], None] | None = None, progress_every: int = 10_000) -> ProduceReport:
    """Send messages (dicts as JSON; bytes as they are), keyed by user_id, at most `rate` per second.

    Raises if the broker refused any message (after the client's own retries).
    """
    key = key or _user_key
    sender = KafkaSender(bootstrap, linger_ms=20)
    sent = 0
    started = time.monotonic()
    first_at = time.time()
    try:
        for message in _paced(messages, rate):
            sender.send(topic, key(message), encode(message))
            sent += 1
            if progress and sent % progress_every == 0:
                progress(sent)
        sender.flush()
    finally:
        sender.close()
    return ProduceReport(sent=sent, seconds=time.monotonic() - started, first_sent_at=first_at)


def _user_key(message: Any) -> bytes | None:
    if isinstance(message, dict) and message.get("user_id") is not None:
        return str(message["user_id"]).encode()
    return None


def _paced(messages: Iterable[Any], rate: float | None) -> Iterator[Any]:
    if not rate:
        yield from messages
        return
    start = time.monotonic()
    for i, message in enumerate(messages):
        due = start + i / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        yield message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.producer",
                                     description="Send live transactions to the Kafka topic.")
    parser.add_argument("--count", type=int, default=10_000, help="transactions to send (default 10000)")
    parser.add_argument("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
    parser.add_argument("--input", type=Path, default=None, help="CSV, Parquet or JSON-lines file instead of the simulator")
    parser.add_argument("--seed", type=int, default=None, help="simulator seed (default: from the clock)")
    parser.add_argument("--topic", default=None, help="default: settings.kafka_topic")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.count < 1 or (args.rate is not None and args.rate <= 0):
        print("--count and --rate must be positive", file=sys.stderr)
        return 2
    settings: Settings = get_settings()
    from cluster.dev.records import kafka_bootstrap

    bootstrap = kafka_bootstrap(settings)
    topic = args.topic or settings.kafka_topic
    ensure_topics(bootstrap, [topic])
    if args.input:
        messages = read_transactions(args.input)[: args.count]
    else:
        seed = int(time.time()) % 1_000_000 if args.seed is None else args.seed
        messages = simulated_transactions(args.count, seed=seed)
    log.info("sending %d transactions to %s%s", len(messages), topic,
             f" at {args.rate:g}/s" if args.rate else " as fast as possible")
    report = produce(bootstrap, topic, messages, rate=args.rate,
                     progress=lambda n: log.info("sent %d / %d", n, len(messages)),
                     progress_every=max(1000, len(messages) // 10))
    log.info("sent %d transactions in %.2fs (%.0f/s)", report.sent, report.seconds, report.rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
