"""On the real broker: a produce/consume round trip with a consumer group and a
commit, and the project's producer (`cluster.producer.KafkaSender`)."""

from __future__ import annotations

import json

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from cluster.producer import KafkaSender, ensure_topics
from tests.ports import free_port


def test_round_trip_with_group_commit(servers, unique_name):
    bootstrap = servers["kafka_bootstrap_servers"]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(unique_name, num_partitions=2, replication_factor=1)])
    admin.close()

    producer = KafkaProducer(bootstrap_servers=bootstrap, value_serializer=lambda v: json.dumps(v).encode())
    for i in range(20):
        producer.send(unique_name, key=f"user-{i % 3}".encode(), value={"i": i})
    producer.flush()
    producer.close()

    def consume(expect: int) -> list[int]:
        consumer = KafkaConsumer(
            unique_name, bootstrap_servers=bootstrap, group_id=unique_name,
            enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=6000,
            heartbeat_interval_ms=1000, consumer_timeout_ms=10000,
        )
        seen = []
        for message in consumer:
            seen.append(json.loads(message.value)["i"])
            if len(seen) == expect:
                break
        consumer.commit()
        committed = sum(consumer.committed(TopicPartition(unique_name, p)) or 0 for p in (0, 1))
        consumer.close()
        return seen, committed

    seen, committed = consume(20)
    assert sorted(seen) == list(range(20)) and committed == 20
    # The group resumes after its committed offsets: nothing is redelivered.
    producer = KafkaProducer(bootstrap_servers=bootstrap, value_serializer=lambda v: json.dumps(v).encode())
    producer.send(unique_name, key=b"user-0", value={"i": 20})
    producer.flush()
    producer.close()
    seen, committed = consume(1)
    assert seen == [20] and committed == 21


def test_sender_delivers_every_message_in_order_per_key(servers, unique_name):
    bootstrap = servers["kafka_bootstrap_servers"]
    ensure_topics(bootstrap, [unique_name], partitions=3)
    sender = KafkaSender(bootstrap)
    try:
        for i in range(3_000):
            sender.send(unique_name, f"user-{i % 7}".encode(), json.dumps({"i": i}).encode())
        sender.flush()
    finally:
        sender.close()

    consumer = KafkaConsumer(unique_name, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=10_000)
    by_key: dict[bytes, list[int]] = {}
    seen = 0
    for message in consumer:
        by_key.setdefault(message.key, []).append(json.loads(message.value)["i"])
        seen += 1
        if seen == 3_000:
            break
    consumer.close()
    assert seen == 3_000
    assert sorted(by_key) == [f"user-{k}".encode() for k in range(7)]
    for key, values in by_key.items():  # one user's messages in the order sent, none twice
        k = int(key.decode().split("-")[1])
        assert values == list(range(k, 3_000, 7))


def test_sender_flush_names_what_is_undelivered_when_the_broker_is_unreachable():
    sender = KafkaSender(f"127.0.0.1:{free_port()}", timeout_s=1.0)
    sender.send("nowhere", b"k", b"v")
    with pytest.raises(ConnectionError, match="1 Kafka messages not delivered within 1s"):
        sender.flush()
    sender.close()  # drops the message with a warning instead of blocking


def test_sender_names_a_message_that_failed_for_good():
    sender = KafkaSender(f"127.0.0.1:{free_port()}", timeout_s=5.0, config={"message.timeout.ms": 500})
    sender.send("nowhere", b"k", b"v")
    with pytest.raises(RuntimeError, match="1 Kafka messages were not delivered, the first: nowhere: .*timed out"):
        sender.flush()
    sender.close()
