"""Send live transactions to Kafka: simulated ones, or those of a file.

    python -m cluster.producer [--count N] [--rate R] [--input PATH] [--seed S]

Messages are JSON objects with the transaction fields only (the labels
`is_fraud` and `scenario` are dropped), keyed by `user_id` so that one user's
transactions stay in order on one partition. Without `--rate` they go as fast
as the broker takes them. Simulated transactions end about now, so that they
pass the clock-skew check and look live.
"""

from __future__ import annotations

import argparse
import json
import logging
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


def simulated_transactions(count: int, seed: int = 0, days: int = 3,
                           fraud_rate: float | None = None) -> list[dict[str, Any]]:
    """`count` simulated transactions ending about now, oldest first, without labels."""
    import pandas as pd

    from jobs.simulate import DEFAULT_FRAUD_RATE, simulate

    users = max(10, int(count / (days * TRANSACTIONS_PER_USER_DAY) * 1.2))
    while True:
        start = pd.Timestamp.now(tz="UTC").floor("s") - pd.Timedelta(days=days, minutes=5)
        df = simulate(users=users, days=days, seed=seed, start=start,
                      fraud_rate=DEFAULT_FRAUD_RATE if fraud_rate is None else fraud_rate)
        if len(df) >= count:
            break
        users *= 2
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
    """Send messages (dicts as JSON; bytes as they are), keyed by user_id, at most `rate` per second."""
    from kafka import KafkaProducer

    key = key or _user_key
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                             batch_size=256 * 1024, max_in_flight_requests_per_connection=5)
    futures = []
    sent = 0
    started = time.monotonic()
    first_at = time.time()
    try:
        for message in _paced(messages, rate):
            futures.append(producer.send(topic, key=key(message), value=encode(message)))
            sent += 1
            if len(futures) >= 5_000:
                _settle(producer, futures)
            if progress and sent % progress_every == 0:
                progress(sent)
        _settle(producer, futures)
    finally:
        producer.close(timeout=30)
    return ProduceReport(sent=sent, seconds=time.monotonic() - started, first_sent_at=first_at)


def _user_key(message: Any) -> bytes | None:
    if isinstance(message, dict) and message.get("user_id") is not None:
        return str(message["user_id"]).encode()
    return None


def _settle(producer, futures: list) -> None:
    producer.flush(timeout=60)
    for f in futures:
        f.get(timeout=60)  # raises if the broker refused a message
    futures.clear()


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
    from cluster.dev import kafka_bootstrap

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
