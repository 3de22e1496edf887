"""Measure produce-to-queryable latency of latest_price.

Publishes probe bars (tenant "probe", instruments PROBE-00.. PROBE-15, spread over partitions)
at --rate per second. Each probe bar carries its publish time in microseconds as its price and
revision, with the same end_ms, so it is newer than the probe before it. After publishing,
the prober requests GET /projections/latest_price for that instrument every --poll-ms until
the response contains that price, and records the time since publishing.

Each figure is an upper bound: it includes up to one poll interval plus one request. A probe
not visible after --probe-timeout seconds counts as a timeout. Prints one JSON object with
the latencies in milliseconds and, per probe, its publish time (Unix seconds) with its
latency, so that slow probes can be matched with reloads.
"""

import argparse
import http.client
import json
import sys
import time

from confluent_kafka import Producer

PROBE_INSTRUMENTS = 16
# One minute, 2023-11-14 22:13 UTC, the same for every probe bar: revision orders them.
PROBE_START_MS = 1_699_999_980_000


def probe_bar(instrument_id, published_us):
    return (
        f'{{"tenant_id":"probe","instrument_id":"{instrument_id}","timeframe":"1m",'
        f'"start_ms":{PROBE_START_MS},"end_ms":{PROBE_START_MS + 60_000},'
        f'"open":{published_us},"high":{published_us},"low":{published_us},"close":{published_us},'
        f'"volume":1,"revision":{published_us}}}'
    )


class PriceReader:
    """Reads latest_price over one keep-alive HTTP connection, reconnecting after errors."""

    def __init__(self, port):
        self.port = port
        self.connection = None
        self.errors = 0

    def price(self, instrument_id):
        path = f"/projections/latest_price?tenant_id=probe&instrument_id={instrument_id}"
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            self.connection.request("GET", path)
            response = self.connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self.errors += 1
            if self.connection is not None:
                self.connection.close()
            self.connection = None
            return None
        if response.status != 200:
            return None
        return json.loads(body).get("price")


def main():
    parser = argparse.ArgumentParser(description="Measure produce-to-queryable latency.")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--api-port", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate", type=float, default=50, help="probes per second")
    parser.add_argument("--poll-ms", type=float, default=0.5, help="pause between two queries")
    parser.add_argument("--probe-timeout", type=float, default=2.0, help="seconds before a probe counts as lost")
    arguments = parser.parse_args()

    producer = Producer({"bootstrap.servers": arguments.bootstrap, "linger.ms": 0})
    reader = PriceReader(arguments.api_port)
    latencies_ms = []
    samples = []
    timeouts = 0
    queries = 0
    start = time.monotonic()
    probe = 0
    while time.monotonic() - start < arguments.seconds:
        instrument_id = f"PROBE-{probe % PROBE_INSTRUMENTS:02d}"
        published_us = time.time_ns() // 1000
        producer.produce(arguments.topic, probe_bar(instrument_id, published_us).encode(),
                         f"probe:{instrument_id}".encode())
        producer.poll(0)
        deadline = time.monotonic() + arguments.probe_timeout
        while True:
            price = reader.price(instrument_id)
            queries += 1
            if price is not None and abs(price - published_us) < 0.5:
                latency_ms = (time.time_ns() // 1000 - published_us) / 1000
                latencies_ms.append(latency_ms)
                samples.append([published_us / 1e6, latency_ms])
                break
            if time.monotonic() > deadline:
                timeouts += 1
                samples.append([published_us / 1e6, None])
                break
            time.sleep(arguments.poll_ms / 1000)
        probe += 1
        next_probe = start + probe / arguments.rate
        pause = next_probe - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    producer.flush(10)
    print(json.dumps({
        "probes": probe, "timeouts": timeouts, "queries": queries, "http_errors": reader.errors,
        "latencies_ms": latencies_ms, "samples": samples,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
