"""A produce/consume round trip with a consumer group and a commit, on the real broker."""

from __future__ import annotations

import json

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic


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
