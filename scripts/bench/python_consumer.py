"""The Python baseline: a latest-price consumer of the kind projection-runtime replaces.

For each bar of a poll batch (up to --batch messages) it runs json.loads and keeps the bar
only if its (end_ms, revision) is greater than the pair last kept for its (tenant, instrument)
in a dict. A kept bar queues an HSET of the price fields on a redis-py pipeline, which by
default sends one MULTI/EXEC. After the batch it executes the pipeline and then commits the
consumed offsets synchronously. It does no field validation, no invalidation watermarks and
keeps its dict in memory only, so it does less work per event than latest_price.

Prints one JSON line on stdout when the first assignment arrives ("assigned") and one when
--expect events were consumed ("done"), so the benchmark driver can sample CPU at both
moments. Exits 1 when --timeout seconds pass first.
"""

import argparse
import json
import sys
import time

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException


def emit(kind, **fields):
    print(json.dumps({"event": kind, "time": time.time(), **fields}), flush=True)


def main():
    parser = argparse.ArgumentParser(description="Consume bars and write latest prices to Redis.")
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True, help="consumer group id")
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--expect", type=int, required=True, help="stop after this many events")
    parser.add_argument("--batch", type=int, default=500, help="messages per poll batch")
    parser.add_argument("--timeout", type=float, default=300, help="give up after this many seconds")
    arguments = parser.parse_args()

    assigned = False

    def on_assign(consumer, partitions):
        nonlocal assigned
        if not assigned and partitions:
            assigned = True
            emit("assigned", partitions=len(partitions))

    consumer = Consumer({
        "bootstrap.servers": arguments.bootstrap,
        "group.id": arguments.group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    consumer.subscribe([arguments.topic], on_assign=on_assign)
    client = redis.Redis(host="127.0.0.1", port=arguments.redis_port)

    latest = {}
    consumed = 0
    written = 0
    deadline = time.monotonic() + arguments.timeout
    while consumed < arguments.expect:
        if time.monotonic() > deadline:
            emit("timeout", consumed=consumed, written=written)
            consumer.close()
            return 1
        messages = consumer.consume(num_messages=arguments.batch, timeout=0.1)
        if not messages:
            continue
        pipeline = client.pipeline()
        for message in messages:
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(message.error())
            consumed += 1
            bar = json.loads(message.value())
            key = (bar["tenant_id"], bar["instrument_id"])
            version = (bar["end_ms"], bar.get("revision", 0))
            kept = latest.get(key)
            if kept is not None and version <= kept:
                continue
            latest[key] = version
            pipeline.hset(f"py:{{{key[0]}}}:price:{key[1]}", mapping={
                "price": bar["close"],
                "volume": bar["volume"],
                "timeframe": bar["timeframe"],
                "as_of_ms": bar["end_ms"],
                "revision": version[1],
            })
            written += 1
        pipeline.execute()
        consumer.commit(asynchronous=False)

    emit("done", consumed=consumed, written=written, instruments=len(latest))
    consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
