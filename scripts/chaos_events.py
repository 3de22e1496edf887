#!/usr/bin/env python3
"""Generate the seeded event stream of scripts/chaos-test.sh.

The stream has 1m bars of several tenants and instruments over consecutive minutes, with
corrections (higher revision), exact duplicates, bars delivered late, very old bars, a few
malformed events and a few hundred invalidations of both scopes. The same seed always gives
the same files:

  OUT/kcat/<topic>/p<PP>.c<C>.kcat  `key|value` lines of partition PP, chunk C, for
                                    `kcat -P -t <topic> -p PP -K '|' -l FILE`
  OUT/envelopes.jsonl               every event as a `projection-runtime test` envelope with its
                                    topic, partition, offset, key and value, each partition in
                                    offset order (non-JSON payloads are left out, see below)
  OUT/expected.json                 counts and per-partition digests for chaos_verify.py

Every bar of one (tenant, instrument) goes to one partition, so the runtime and the offline
run see its bars in the same order. Invalidations are issued either long before the first
bar or long after the last one, so their effect on the served prices does not depend on how
the two topics interleave (docs/delivery.md, section "Chaos test").
"""

import argparse
import hashlib
import json
import os
import random
import sys

MINUTE_MS = 60_000
DAY_MS = 24 * 60 * MINUTE_MS
# 2024-03-04 00:00 UTC, the day of the sample events in examples/events.
BASE_MS = 1_709_510_400_000

# The mock broker of librdkafka 2.0.2 drops the oldest message sets of a partition beyond
# 5 MiB, so the generator stops before any partition comes near that.
MAX_PARTITION_BYTES = 4 * 1024 * 1024

# (tenant, instruments). "umbrella" receives a tenant-wide invalidation issued after its last
# bar, which withdraws all its prices, so it is kept small.
TENANTS = [("acme", 500), ("globex", 500), ("initech", 500), ("umbrella", 20)]
FUTURE_TENANT = "umbrella"


def compact(value):
    return json.dumps(value, separators=(",", ":"))


class Stream:
    """The events of every partition of both topics, in offset order."""

    def __init__(self, bar_topic, bar_partitions, invalidation_topic, invalidation_partitions):
        self.bar_topic = bar_topic
        self.invalidation_topic = invalidation_topic
        self.partitions = {}
        for partition in range(bar_partitions):
            self.partitions[(bar_topic, partition)] = []
        for partition in range(invalidation_partitions):
            self.partitions[(invalidation_topic, partition)] = []


def bar_event(tenant, instrument, start_ms, price, rng, trade_counts, revision=0):
    """Return a valid 1m bar starting at start_ms and its close."""
    open_price = price
    close = round(max(0.01, open_price * (1 + rng.gauss(0, 0.002))), 2)
    high = round(max(open_price, close) + rng.random() * open_price * 0.001, 2)
    low = round(max(0.0, min(open_price, close) - rng.random() * open_price * 0.001), 2)
    bar = {
        "tenant_id": tenant,
        "instrument_id": instrument,
        "timeframe": "1m",
        "start_ms": start_ms,
        "end_ms": start_ms + MINUTE_MS,
        "open": open_price,
        "high": high,
        "low": low,
        "close": close,
        "volume": round(rng.uniform(0.001, 50.0), 3),
    }
    if trade_counts:
        bar["trade_count"] = rng.randint(1, 500)
    if revision:
        bar["revision"] = revision
    return bar, close


def corrected(bar, rng, revision):
    """Return a correction of bar: same minute, higher revision, new close and volume."""
    fixed = dict(bar)
    fixed["revision"] = revision
    fixed["close"] = round(rng.uniform(bar["low"], bar["high"]), 2)
    fixed["volume"] = round(bar["volume"] * rng.uniform(0.5, 1.5) + 0.001, 3)
    return fixed


def move_later(events, index, distance):
    """Move events[index] `distance` places later, shifting the ones between forward."""
    target = min(len(events) - 1, index + distance)
    event = events.pop(index)
    events.insert(target, event)


def series_events(tenant, instrument, minutes, rng, counts):
    """Return the bars of one series in delivery order, corrections and extras included."""
    start_ms = BASE_MS + rng.randrange(0, 30) * MINUTE_MS
    price = round(rng.uniform(5, 5000), 2)
    trade_counts = rng.random() > 0.1
    events = []
    for minute in range(minutes):
        # Each bar opens at the previous close, which bar_event rounds to two decimals.
        bar, price = bar_event(tenant, instrument, start_ms + minute * MINUTE_MS, price, rng, trade_counts)
        events.append(bar)

    extras = []
    for position, bar in enumerate(list(events)):
        roll = rng.random()
        if roll < 0.025:
            # A correction published shortly after the bar, sometimes corrected once more.
            fixed = corrected(bar, rng, 1)
            extras.append((position + rng.randint(1, 20), fixed))
            counts["corrections"] += 1
            if rng.random() < 0.2:
                extras.append((position + rng.randint(21, 40), corrected(bar, rng, 2)))
                counts["corrections"] += 1
        elif roll < 0.03:
            # A correction published more than the 2 h lateness of bar_rollups after the bar.
            extras.append((position + rng.randint(125, 130), corrected(bar, rng, 1)))
            counts["corrections"] += 1
        elif roll < 0.035:
            # An exact duplicate from upstream: valid, counted, and changes no result.
            extras.append((position + rng.randint(1, 10), dict(bar)))
            counts["duplicates"] += 1
    if rng.random() < 0.05:
        # A bar six hours older than the series, delivered after at least 10 of its bars.
        old, _ = bar_event(tenant, instrument, start_ms - 6 * 60 * MINUTE_MS, price, rng, trade_counts)
        extras.append((rng.randint(10, minutes), old))
        counts["very_old_bars"] += 1
    for position, bar in sorted(extras, key=lambda item: item[0], reverse=True):
        events.insert(min(position, len(events)), bar)

    # Out-of-order delivery: a few bars arrive after up to 8 later bars of the series.
    for index in range(len(events) - 2, 10, -1):
        if rng.random() < 0.03:
            move_later(events, index, rng.randint(1, 8))
            counts["late_bars"] += 1
    return events


def malformed_bars(rng, series_keys):
    """Return (key, payload text, reason) for bars that every bar projection rejects."""
    cases = []

    def template():
        tenant, instrument = rng.choice(series_keys)
        start_ms = BASE_MS + rng.randrange(0, 120) * MINUTE_MS
        bar = {"tenant_id": tenant, "instrument_id": instrument, "timeframe": "1m",
               "start_ms": start_ms, "end_ms": start_ms + MINUTE_MS, "open": 10.0,
               "high": 11.0, "low": 9.0, "close": 10.5, "volume": 1.5}
        return f"{tenant}:{instrument}", bar

    mutations = [
        ("close is a string", lambda bar: bar.update(close="10.5")),
        ("tenant_id is missing", lambda bar: bar.pop("tenant_id")),
        ("high is below low", lambda bar: bar.update(high=8.0)),
        ("start_ms is not on a minute", lambda bar: bar.update(start_ms=bar["start_ms"] + 1, end_ms=bar["end_ms"] + 1)),
        ("end_ms is not start_ms + 60000", lambda bar: bar.update(end_ms=bar["end_ms"] + 1)),
        ("tenant_id contains ':'", lambda bar: bar.update(tenant_id="acme:x")),
        ("volume is negative", lambda bar: bar.update(volume=-1.0)),
        ("revision is a float", lambda bar: bar.update(revision=1.5)),
        ("volume is null", lambda bar: bar.update(volume=None)),
    ]
    for copy in range(4):
        for reason, mutate in mutations:
            key, bar = template()
            mutate(bar)
            cases.append((key, compact(bar), reason))
    for _ in range(3):
        key, _ = template()
        cases.append((key, compact([1, 2, 3]), "payload is an array"))
        cases.append((key, compact("bar"), "payload is a JSON string"))
    for _ in range(3):
        key, _ = template()
        cases.append((key, "not json {", "payload is not JSON"))
    return cases


def invalidations(rng, series_keys):
    """Return (key, payload, valid) for the invalidation topic, in no particular order."""
    events = []
    # Past invalidations precede every bar, the very old ones included (6 h before the series).
    past = lambda: BASE_MS - DAY_MS - rng.randrange(0, 29 * DAY_MS)
    future = lambda: BASE_MS + 30 * DAY_MS + rng.randrange(0, DAY_MS)
    for index in range(220):
        tenant, instrument = rng.choice([key for key in series_keys if key[0] != FUTURE_TENANT])
        issued = future() if index % 3 == 0 else past()
        events.append((tenant, {"tenant_id": tenant, "scope": "instrument", "instrument_id": instrument,
                                "reason": f"chaos {index}", "issued_ms": issued}, True))
    for index in range(80):
        tenant = rng.choice([name for name, _ in TENANTS])
        issued = future() if tenant == FUTURE_TENANT and index % 10 == 0 else past()
        events.append((tenant, {"tenant_id": tenant, "scope": "tenant", "reason": f"chaos tenant {index}",
                                "issued_ms": issued}, True))
    # The future tenant-wide invalidation is certain to be there at least once.
    events.append((FUTURE_TENANT, {"tenant_id": FUTURE_TENANT, "scope": "tenant", "reason": "restated",
                                   "issued_ms": future()}, True))
    for reason, payload in [
        ("scope is unknown", {"tenant_id": "acme", "scope": "galaxy", "reason": "", "issued_ms": BASE_MS}),
        ("issued_ms is missing", {"tenant_id": "acme", "scope": "tenant", "reason": ""}),
        ("instrument_id is missing", {"tenant_id": "acme", "scope": "instrument", "reason": "", "issued_ms": BASE_MS}),
        ("issued_ms is a string", {"tenant_id": "globex", "scope": "tenant", "reason": "", "issued_ms": "1"}),
    ]:
        events.append(("acme", payload, False))
    rng.shuffle(events)
    return events


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=int, default=132, help="bars per instrument before extras")
    parser.add_argument("--chunks", type=int, default=8, help="slices of each partition to produce separately")
    parser.add_argument("--bar-topic", default="aggregation.bars.v1")
    parser.add_argument("--bar-partitions", type=int, default=16)
    parser.add_argument("--invalidation-topic", default="projection.invalidation.v1")
    parser.add_argument("--invalidation-partitions", type=int, default=4)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    stream = Stream(args.bar_topic, args.bar_partitions, args.invalidation_topic, args.invalidation_partitions)
    counts = {"corrections": 0, "duplicates": 0, "late_bars": 0, "very_old_bars": 0}

    series_keys = [(tenant, f"I{index:04d}") for tenant, size in TENANTS for index in range(size)]
    valid_bars = {}
    series_partition = {}
    for index, (tenant, instrument) in enumerate(series_keys):
        partition = index % args.bar_partitions
        series_partition[(tenant, instrument)] = partition
        bars = series_events(tenant, instrument, args.minutes, rng, counts)
        valid_bars[f"{tenant}:{instrument}"] = len(bars)
        events = stream.partitions[(args.bar_topic, partition)]
        events.extend((f"{tenant}:{instrument}", compact(bar), None) for bar in bars)

    # Each partition interleaves its series minute by minute, as a live feed would: a stable
    # sort by the index of each bar within its own series.
    for partition in range(args.bar_partitions):
        events = stream.partitions[(args.bar_topic, partition)]
        position = {}
        ordered = []
        for key, value, reason in events:
            number = position.get(key, 0)
            position[key] = number + 1
            ordered.append((number, key, value, reason))
        ordered.sort(key=lambda item: item[0])
        stream.partitions[(args.bar_topic, partition)] = [(key, value, reason) for _, key, value, reason in ordered]

    malformed = []
    for key, value, reason in malformed_bars(rng, series_keys):
        tenant, _, instrument = key.partition(":")
        partition = series_partition.get((tenant, instrument), 0)
        events = stream.partitions[(args.bar_topic, partition)]
        events.insert(rng.randrange(0, len(events) + 1), (key, value, reason))
    for key, payload, valid in invalidations(rng, series_keys):
        partition = rng.randrange(args.invalidation_partitions)
        reason = None if valid else "invalid invalidation"
        stream.partitions[(args.invalidation_topic, partition)].append((key, compact(payload), reason))

    os.makedirs(args.out, exist_ok=True)
    end_offsets = {}
    digests = {}
    partition_bytes = {}
    envelope_count = 0
    chunk_files = {chunk: [] for chunk in range(args.chunks)}
    with open(os.path.join(args.out, "envelopes.jsonl"), "w", encoding="utf-8") as envelopes:
        for (topic, partition), events in sorted(stream.partitions.items()):
            name = f"{topic}/{partition}"
            end_offsets[name] = len(events)
            size = sum(len(key) + len(value) for key, value, _ in events)
            partition_bytes[name] = size
            if size > MAX_PARTITION_BYTES:
                sys.exit(f"chaos_events: partition {name} would hold {size} bytes, over the "
                         f"{MAX_PARTITION_BYTES} that the mock broker keeps; lower --minutes")
            digest = hashlib.sha256()
            for offset, (key, value, reason) in enumerate(events):
                if "|" in key or "\n" in key + value or "\t" in key + value:
                    sys.exit(f"chaos_events: event {name}@{offset} contains '|', a tab or a newline")
                digest.update(f"{offset}\t{key}\t{value}\n".encode())
                if reason is not None:
                    malformed.append({"topic": topic, "partition": partition, "offset": offset,
                                      "reason": reason, "json": reason != "payload is not JSON"})
                try:
                    parsed = json.loads(value)
                except ValueError:
                    # The envelope's "value" must be JSON, so a payload that is not JSON
                    # cannot be replayed offline. It has no effects, only dead letters.
                    continue
                envelopes.write(compact({"topic": topic, "partition": partition, "offset": offset,
                                         "key": key, "value": parsed}) + "\n")
                envelope_count += 1
            digests[name] = digest.hexdigest()

            folder = os.path.join(args.out, "kcat", topic)
            os.makedirs(folder, exist_ok=True)
            for chunk in range(args.chunks):
                first = len(events) * chunk // args.chunks
                last = len(events) * (chunk + 1) // args.chunks
                if first == last:
                    continue
                path = os.path.join(folder, f"p{partition:02d}.c{chunk + 1}.kcat")
                with open(path, "w", encoding="utf-8") as out:
                    out.writelines(f"{key}|{value}\n" for key, value, _ in events[first:last])
                chunk_files[chunk].append({"topic": topic, "partition": partition, "file": path})

    total = sum(end_offsets.values())
    expected = {
        "seed": args.seed,
        "bar_topic": args.bar_topic,
        "invalidation_topic": args.invalidation_topic,
        "events": total,
        "envelopes": envelope_count,
        "valid_bars": sum(valid_bars.values()),
        "bars_per_series": valid_bars,
        "invalidations": sum(1 for (topic, _), events in stream.partitions.items()
                             if topic == args.invalidation_topic for event in events if event[2] is None),
        "malformed": malformed,
        "counts": counts,
        "end_offsets": end_offsets,
        "digests": digests,
        "max_partition_bytes": max(partition_bytes.values()),
        "chunks": [chunk_files[chunk] for chunk in range(args.chunks)],
    }
    with open(os.path.join(args.out, "expected.json"), "w", encoding="utf-8") as out:
        json.dump(expected, out, indent=1, sort_keys=True)
    print(f"chaos_events: {total} events ({expected['valid_bars']} valid bars, "
          f"{expected['invalidations']} invalidations, {len(malformed)} malformed) in {args.out}; "
          f"largest partition {expected['max_partition_bytes']} bytes")


if __name__ == "__main__":
    main()
