"""Produce bar events at a fixed rate for a fixed time: the background load of the latency test.

Event number n (counted from --first-event) is the bar of instrument n % instruments in round
n // instruments (events.round_bar), so a second run that starts where the first stopped only
publishes newer bars. Hands events to librdkafka in 1 ms steps, which sends them in batches
after --linger-ms.
Prints one JSON line with the events sent and the rate reached.
"""

import argparse
import json
import sys
import time

from confluent_kafka import Producer

import events


def main():
    parser = argparse.ArgumentParser(description="Produce bars at a fixed rate.")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--rate", type=float, required=True, help="events per second")
    parser.add_argument("--seconds", type=float, required=True, help="how long to produce")
    parser.add_argument("--instruments", type=int, default=100_000)
    parser.add_argument("--first-event", type=int, default=0, help="number of the first event")
    parser.add_argument("--linger-ms", type=int, default=5, help="librdkafka linger.ms (its default is 5)")
    arguments = parser.parse_args()

    producer = Producer({"bootstrap.servers": arguments.bootstrap, "linger.ms": arguments.linger_ms})
    sent = 0
    full_queue_waits = 0
    start = time.monotonic()
    end = start + arguments.seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * arguments.rate) - sent
        for _ in range(due):
            number = arguments.first_event + sent
            key, payload = events.round_bar(number % arguments.instruments, number // arguments.instruments)
            while True:
                try:
                    producer.produce(arguments.topic, payload.encode(), key.encode())
                    break
                except BufferError:
                    full_queue_waits += 1
                    producer.poll(0.001)
            sent += 1
        producer.poll(0)
        time.sleep(0.001)
    elapsed = time.monotonic() - start
    unsent = producer.flush(10)
    print(json.dumps({
        "sent": sent, "seconds": round(elapsed, 3), "rate": round(sent / elapsed, 1),
        "unsent_after_flush": unsent, "full_queue_waits": full_queue_waits,
        "next_event": arguments.first_event + sent,
    }), flush=True)
    return 0 if unsent == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
