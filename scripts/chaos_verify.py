#!/usr/bin/env python3
"""Check the end state of a chaos run of scripts/chaos-test.sh against the offline replay.

Subcommands:

  ports N   print N free TCP ports on 127.0.0.1, separated by spaces
  behind    print the partitions whose offset stored in Redis is short of their end offset
  verify    compare the live Redis and ClickHouse with the offline replay and the generator's
            counts, print the summary table, and exit 1 when an event was lost or applied
            twice, or any key or row differs

Python 3 standard library only. Every connection goes to 127.0.0.1.
"""

import argparse
import collections
import hashlib
import json
import math
import socket
import sys
import urllib.error
import urllib.request

# Differences listed one by one in the details file, per kind.
MAX_LISTED = 50


# --- Redis ----------------------------------------------------------------------------------


class ReplyError(Exception):
    """An error reply from Redis, such as WRONGTYPE."""


class Redis:
    """A minimal RESP2 client: pipelines of commands, replies as bytes, ints and lists."""

    BATCH = 1000

    def __init__(self, port, host="127.0.0.1", timeout=60):
        self.endpoint = f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def close(self):
        self.reader.close()
        self.sock.close()

    @staticmethod
    def encode(arguments):
        parts = [b"*%d\r\n" % len(arguments)]
        for argument in arguments:
            data = argument if isinstance(argument, bytes) else str(argument).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

    def pipeline(self, commands):
        """Send commands in batches and return their replies in order. Error replies come back
        as ReplyError values instead of being raised."""
        replies = []
        for start in range(0, len(commands), self.BATCH):
            batch = commands[start:start + self.BATCH]
            self.sock.sendall(b"".join(self.encode(command) for command in batch))
            replies.extend(self.read_reply() for _ in batch)
        return replies

    def call(self, *arguments):
        reply = self.pipeline([arguments])[0]
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def read_reply(self):
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"Redis at {self.endpoint} closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            return ReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self.reader.read(length + 2)
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self.read_reply() for _ in range(count)]
        raise ConnectionError(f"Redis at {self.endpoint} sent an unknown reply type {kind!r}")

    def keys(self):
        """Return every key, read with SCAN."""
        keys = set()
        cursor = b"0"
        while True:
            cursor, page = self.call("SCAN", cursor, "COUNT", 1000)
            keys.update(page)
            if cursor == b"0":
                return keys

    def snapshot(self, keys):
        """Return {key: (type, value)} with values compared by type: string bytes, hash dict,
        sorted set list of (member, score), set frozenset, list list."""
        keys = sorted(keys)
        types = self.pipeline([("TYPE", key) for key in keys])
        reads = {
            b"string": lambda key: ("GET", key),
            b"hash": lambda key: ("HGETALL", key),
            b"zset": lambda key: ("ZRANGE", key, 0, -1, "WITHSCORES"),
            b"set": lambda key: ("SMEMBERS", key),
            b"list": lambda key: ("LRANGE", key, 0, -1),
        }
        readable = [(key, kind) for key, kind in zip(keys, types) if kind in reads]
        values = self.pipeline([reads[kind](key) for key, kind in readable])
        snapshot = {}
        for key, kind in zip(keys, types):
            if kind == b"none":
                continue  # deleted between SCAN and TYPE
            snapshot[key] = (kind.decode(), None)
        for (key, kind), value in zip(readable, values):
            if kind == b"hash":
                value = dict(zip(value[0::2], value[1::2]))
            elif kind == b"zset":
                value = list(zip(value[0::2], value[1::2]))
            elif kind == b"set":
                value = frozenset(value)
            snapshot[key] = (kind.decode(), value)
        return snapshot


# --- ClickHouse -----------------------------------------------------------------------------


def clickhouse(port, query):
    """Run a query over ClickHouse's HTTP interface and return the TabSeparated rows."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=query.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"ClickHouse rejected {query!r}: {error.read().decode()[:500]}") from None
    return [line.split("\t") for line in text.splitlines()]


def nullable(text):
    return None if text == "\\N" else text


def floats_equal(left, right):
    if left is None or right is None:
        return left is right
    return math.isclose(float(left), float(right), rel_tol=1e-9, abs_tol=1e-9)


# --- Inputs ---------------------------------------------------------------------------------


def read_offline(path):
    """Read the insert and error lines of `projection-runtime test`.

    Returns the bar_rollups rows reduced to the highest version per bucket (a later row wins
    a tie, as in ReplacingMergeTree), the chaos_events rows by source, and the failures as
    (topic, partition, offset, projection).
    """
    rollups = {}
    events = {}
    failures = set()
    rows_of_event = collections.Counter()
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            effect = json.loads(line)
            origin = (effect.get("topic"), effect.get("partition"), effect.get("offset"))
            if effect["effect"] == "error":
                failures.add(origin + (effect.get("projection"),))
                continue
            if effect["effect"] != "insert":
                continue
            # The runtime numbers an event's rows across projections and tables, in the
            # order the projections (sorted by name) produced them, which is the line order.
            index = rows_of_event[origin]
            rows_of_event[origin] += 1
            row = effect["row"]
            if effect["table"] == "bar_rollups":
                key = (row["tenant_id"], row["instrument_id"], row["timeframe"], row["bucket_start_ms"])
                if key not in rollups or row["version"] >= rollups[key]["version"]:
                    rollups[key] = row
            elif effect["table"] == "chaos_events":
                events[origin + (index,)] = row
    return rollups, events, failures


def read_consumed(path):
    """Return {topic/partition: (count, sha256)} of the `kcat -C` dump, in offset order. A
    partition whose offsets do not run 0, 1, 2, ... gets the count -1."""
    digests = {}
    counts = collections.Counter()
    broken = set()
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            topic, partition, offset, key, value = line.rstrip("\n").split("\t", 4)
            name = f"{topic}/{partition}"
            digest = digests.setdefault(name, hashlib.sha256())
            digest.update(f"{offset}\t{key}\t{value}\n".encode())
            if int(offset) != counts[name]:
                broken.add(name)
            counts[name] += 1
    return {name: (-1 if name in broken else counts[name], digest.hexdigest())
            for name, digest in digests.items()}


def read_dead_letters(paths):
    """Return a Counter of (topic, partition, offset, projection) over `kcat -J` dumps."""
    letters = collections.Counter()
    for path in paths:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if not line.startswith("{"):
                    continue
                message = json.loads(line)
                flat = message.get("headers") or []
                headers = dict(zip(flat[0::2], flat[1::2]))
                letters[(headers.get("x-dead-letter-topic"), int(headers.get("x-dead-letter-partition", -1)),
                         int(headers.get("x-dead-letter-offset", -1)), headers.get("x-dead-letter-projection"))] += 1
    return letters


# --- Checks ---------------------------------------------------------------------------------


class Report:
    def __init__(self, details_path):
        self.details = open(details_path, "w", encoding="utf-8")
        self.problems = []

    def problem(self, text):
        self.problems.append(text)

    def list(self, title, items):
        items = list(items)
        if not items:
            return
        self.details.write(f"## {title}: {len(items)}\n")
        for item in items[:MAX_LISTED]:
            self.details.write(f"  {item}\n")
        if len(items) > MAX_LISTED:
            self.details.write(f"  ... {len(items) - MAX_LISTED} more\n")
        self.details.write("\n")


def show(value, limit=160):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def compare_redis(live_port, scratch_port, report):
    """Compare every key but the runtime's own prt:* keys. Returns (compared, differing)."""
    live = Redis(live_port)
    scratch = Redis(scratch_port)
    try:
        live_keys = {key for key in live.keys() if not key.startswith(b"prt:")}
        scratch_keys = {key for key in scratch.keys() if not key.startswith(b"prt:")}
        live_values = live.snapshot(live_keys)
        scratch_values = scratch.snapshot(scratch_keys)
    finally:
        live.close()
        scratch.close()

    only_live = sorted(set(live_values) - set(scratch_values))
    only_scratch = sorted(set(scratch_values) - set(live_values))
    differing = []
    for key in sorted(set(live_values) & set(scratch_values)):
        live_type, live_value = live_values[key]
        scratch_type, scratch_value = scratch_values[key]
        if live_type != scratch_type:
            differing.append(f"{key.decode(errors='replace')}: type {live_type} live, {scratch_type} expected")
        elif live_value != scratch_value:
            differing.append(f"{key.decode(errors='replace')} ({live_type}): live {show(live_value)}, "
                             f"expected {show(scratch_value)}")
    report.list("Redis keys only in the live Redis", (key.decode(errors="replace") for key in only_live))
    report.list("Redis keys missing from the live Redis", (key.decode(errors="replace") for key in only_scratch))
    report.list("Redis keys with other values", differing)
    compared = len(set(live_values) | set(scratch_values))
    return compared, len(only_live) + len(only_scratch) + len(differing)


def check_counters(live_port, expected, report):
    """Compare chaos:count:{tenant}:instrument with the bars sent. Returns (lost, duplicated)."""
    live = Redis(live_port)
    try:
        names = sorted(expected["bars_per_series"])
        keys = []
        for name in names:
            tenant, instrument = name.split(":", 1)
            keys.append(f"chaos:count:{{{tenant}}}:{instrument}")
        values = live.pipeline([("GET", key) for key in keys])
        known = {key.encode() for key in keys}
        stray = sorted(key for key in live.keys() if key.startswith(b"chaos:count:") and key not in known)
    finally:
        live.close()
    lost = duplicated = 0
    wrong = []
    for name, key, value in zip(names, keys, values):
        count = int(value) if value is not None else 0
        sent = expected["bars_per_series"][name]
        if count != sent:
            wrong.append(f"{key}: {count}, expected {sent}")
        lost += max(0, sent - count)
        duplicated += max(0, count - sent)
    report.list("event counters that differ from the bars sent", wrong)
    report.list("event counters of no generated instrument", (key.decode() for key in stray))
    return lost, duplicated + len(stray)


def compare_rollups(port, expected_rows, report):
    """Compare bar_rollups FINAL with the offline rows. Returns (compared, differing)."""
    live = {}
    for fields in clickhouse(port, "SELECT tenant_id, instrument_id, timeframe, bucket_start_ms, bucket_end_ms, "
                                   "open, high, low, close, volume, trade_count, minutes, version "
                                   "FROM bar_rollups FINAL FORMAT TabSeparated"):
        key = (fields[0], fields[1], fields[2], int(fields[3]))
        live[key] = fields
    differing = []
    for key in sorted(set(live) & set(expected_rows)):
        fields = live[key]
        row = expected_rows[key]
        trade_count = nullable(fields[10])
        problems = []
        if int(fields[4]) != row["bucket_end_ms"]:
            problems.append("bucket_end_ms")
        for position, column in enumerate(["open", "high", "low", "close", "volume"], start=5):
            if not floats_equal(fields[position], row[column]):
                problems.append(column)
        if (None if trade_count is None else int(trade_count)) != row["trade_count"]:
            problems.append("trade_count")
        if int(fields[11]) != row["minutes"] or int(fields[12]) != row["version"]:
            problems.append("minutes/version")
        if problems:
            differing.append(f"{key}: {', '.join(problems)} differ: live {fields[4:]}, expected "
                             f"{json.dumps(row, sort_keys=True)}")
    only_live = sorted(set(live) - set(expected_rows))
    missing = sorted(set(expected_rows) - set(live))
    report.list("bar_rollups rows with other values", differing)
    report.list("bar_rollups rows only in the live table", only_live)
    report.list("bar_rollups rows missing from the live table", missing)
    return len(set(live) | set(expected_rows)), len(differing) + len(only_live) + len(missing)


def compare_events(port, expected_rows, report):
    """Compare chaos_events FINAL with the offline rows.

    Returns (compared, differing, lost events, duplicated rows).
    """
    live = collections.defaultdict(list)
    for fields in clickhouse(port, "SELECT _source_topic, _source_partition, _source_offset, _source_index, "
                                   "tenant_id, instrument_id, start_ms, revision, volume "
                                   "FROM chaos_events FINAL FORMAT TabSeparated"):
        key = (fields[0], int(fields[1]), int(fields[2]), int(fields[3]))
        live[key[:3]].append((key, fields[4:]))

    expected_by_event = {key[:3]: key for key in expected_rows}
    lost = [event for event in expected_by_event if event not in live]
    duplicated = []
    differing = []
    for event, rows in live.items():
        expected_key = expected_by_event.get(event)
        if expected_key is None:
            duplicated.extend(f"{key}: a row for an event without one" for key, _ in rows)
            continue
        for key, fields in rows:
            if key != expected_key:
                duplicated.append(f"{key}: a second row of the event, expected only {expected_key}")
                continue
            row = expected_rows[key]
            if (fields[0], fields[1], int(fields[2]), int(fields[3])) != (
                    row["tenant_id"], row["instrument_id"], row["start_ms"], row["revision"]) \
                    or not floats_equal(fields[4], row["volume"]):
                differing.append(f"{key}: live {fields}, expected {json.dumps(row, sort_keys=True)}")
    report.list("chaos_events: events without a row (lost)", sorted(lost))
    report.list("chaos_events: extra rows (duplicated)", duplicated)
    report.list("chaos_events rows with other values", differing)
    compared = len(expected_rows) + len(duplicated)
    return compared, len(differing) + len(lost) + len(duplicated), len(lost), len(duplicated)


def check_broker(expected, consumed, report):
    """Check that the broker contains exactly the generated events. Returns whether it does."""
    wrong = []
    for name, count in sorted(expected["end_offsets"].items()):
        stored = consumed.get(name, (0, ""))
        if stored != (count, expected["digests"][name]):
            wrong.append(f"{name}: the broker has {stored[0]} messages, {count} were planned, or their content differs")
    report.list("partitions whose content differs from the generated plan", wrong)
    return not wrong


def check_dead_letters(expected, failures, letters, report):
    """Compare dead letters with the offline failures. Returns (expected, missing, extra copies)."""
    expected_letters = set(failures)
    bar_projections = {projection for topic, _, _, projection in failures if topic == expected["bar_topic"]}
    for event in expected["malformed"]:
        if not event["json"]:
            # Not replayable offline; every projection of the topic fails to decode it.
            for projection in bar_projections:
                expected_letters.add((event["topic"], event["partition"], event["offset"], projection))
    missing = sorted(expected_letters - set(letters))
    unexpected = sorted(set(letters) - expected_letters)
    copies = sum(letters.values()) - len(letters)
    report.list("dead letters missing", missing)
    report.list("dead letters of events no projection failed on", unexpected)
    return len(expected_letters), len(missing) + len(unexpected), copies


def check_failures_match_plan(expected, failures, report):
    """Every malformed event, and only those, must fail offline."""
    planned = {(event["topic"], event["partition"], event["offset"])
               for event in expected["malformed"] if event["json"]}
    failed = {failure[:3] for failure in failures}
    report.list("malformed events that did not fail offline", sorted(planned - failed))
    report.list("valid events that failed offline", sorted(failed - planned))
    return planned == failed


def verify(args):
    with open(args.expected, encoding="utf-8") as file:
        expected = json.load(file)
    report = Report(args.details)

    broker_ok = check_broker(expected, read_consumed(args.consumed), report)
    if not broker_ok:
        report.problem("the broker does not hold the generated events (setup error, not a runtime result)")

    rollups, event_rows, failures = read_offline(args.offline)
    if args.offline_status not in (0, 1):
        report.problem(f"projection-runtime test exited with status {args.offline_status}")
    if len(event_rows) != expected["valid_bars"]:
        report.problem(f"the offline replay produced {len(event_rows)} chaos_events rows, "
                       f"but the generator made {expected['valid_bars']} valid bars")
    if not check_failures_match_plan(expected, failures, report):
        report.problem("offline failures do not match the generator's malformed events")

    redis_compared, redis_differing = compare_redis(args.live_redis, args.scratch_redis, report)
    counter_lost, counter_duplicated = check_counters(args.live_redis, expected, report)
    rollups_compared, rollups_differing = compare_rollups(args.clickhouse, rollups, report)
    events_compared, events_differing, rows_lost, rows_duplicated = compare_events(args.clickhouse, event_rows, report)
    letters = read_dead_letters(args.dead_letters)
    letters_expected, letters_wrong, letter_copies = check_dead_letters(expected, failures, letters, report)

    lost = counter_lost + rows_lost
    duplicated = counter_duplicated + rows_duplicated
    if lost:
        report.problem(f"{lost} lost (Redis counters {counter_lost}, ClickHouse rows {rows_lost})")
    if duplicated:
        report.problem(f"{duplicated} duplicated (Redis counters {counter_duplicated}, ClickHouse rows {rows_duplicated})")
    if redis_differing:
        report.problem(f"{redis_differing} Redis keys differ")
    if rollups_differing or events_differing:
        report.problem(f"{rollups_differing + events_differing} ClickHouse rows differ")
    if letters_wrong:
        report.problem(f"{letters_wrong} dead letters missing or unexpected")
    report.details.close()

    malformed = len(expected["malformed"])
    table = [
        ("seed", str(expected["seed"])),
        ("events produced", f"{expected['events']:,} ({expected['valid_bars']:,} valid bars, "
                            f"{expected['invalidations']} invalidations, {malformed} malformed)"),
        ("broker contains the generated events", "yes" if broker_ok else "NO"),
        ("runtime kills (SIGKILL)", str(args.kills)),
        ("restarts runtime / redis / clickhouse",
         f"{args.runtime_restarts} / {args.redis_restarts} / {args.clickhouse_restarts}"),
        ("lost events", f"{lost} (Redis counters {counter_lost}, ClickHouse rows {rows_lost})"),
        ("duplicated events", f"{duplicated} (Redis counters {counter_duplicated}, ClickHouse rows {rows_duplicated})"),
        ("Redis keys compared / differing", f"{redis_compared:,} / {redis_differing}"),
        ("ClickHouse bar_rollups compared / differing", f"{rollups_compared:,} / {rollups_differing}"),
        ("ClickHouse chaos_events compared / differing", f"{events_compared:,} / {events_differing}"),
        ("dead letters", f"{sum(letters.values())} messages for {letters_expected} expected "
                         f"(event, projection) failures of {malformed} malformed events; "
                         f"{letters_wrong} missing or unexpected, {letter_copies} extra copies"),
    ]
    if args.runtime_log:
        messages, workers = read_runtime_log(args.runtime_log)
        fenced = messages["partitions were claimed by another process; dropping this batch"]
        table.insert(3, ("workers per runtime process", str(workers)))
        table.append(("runtime log: write outages / batches dropped as fenced",
                      f"{messages['a write failed; pausing consumption and retrying']} / {fenced}"))
        # Only one runtime process runs at a time and its workers own disjoint partitions, so
        # no other owner exists: every such drop is a false fence, and the runtime skips the
        # partitions' events until their next assignment.
        if fenced:
            report.problem(f"batches dropped as fenced although no other process owned their partitions: {fenced} "
                           f"(lines 'partitions were claimed by another process' in {args.runtime_log})")
    table.append(("result", "PASS" if not report.problems else "FAIL"))
    width = max(len(name) for name, _ in table)
    print("chaos test summary")
    for name, value in table:
        print(f"  {name.ljust(width)}  {value}")
    for problem in report.problems:
        print(f"  problem: {problem}")
    print(f"  details: {args.details}")
    return 0 if not report.problems else 1


def read_runtime_log(path):
    """Return a Counter of the `msg` field of the runtime's JSON log lines, and the worker
    count that the first start logged (None when absent)."""
    messages = collections.Counter()
    workers = None
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                messages["(not JSON)"] += 1
                continue
            messages[entry.get("msg")] += 1
            if workers is None and entry.get("msg") == "starting workers":
                workers = entry.get("workers")
    return messages, workers


def behind(args):
    with open(args.expected, encoding="utf-8") as file:
        end_offsets = json.load(file)["end_offsets"]
    redis = Redis(args.redis_port)
    try:
        flat = redis.call("HGETALL", f"prt:offsets:{{{args.group}}}")
    finally:
        redis.close()
    stored = {field.decode(): int(value) for field, value in zip(flat[0::2], flat[1::2])}
    for name, end in sorted(end_offsets.items()):
        if stored.get(name, 0) < end:
            print(f"  {name}: stored offset {stored.get(name, 0)}, end offset {end}")
    return 0


def free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ports = commands.add_parser("ports", help="print free TCP ports on 127.0.0.1")
    ports.add_argument("count", type=int)

    lag = commands.add_parser("behind", help="print the partitions that are not fully applied")
    lag.add_argument("--redis-port", type=int, required=True)
    lag.add_argument("--group", required=True, help="the runtime's consumer group id")
    lag.add_argument("--expected", required=True, help="expected.json of chaos_events.py")

    check = commands.add_parser("verify", help="compare the live sinks with the offline replay")
    check.add_argument("--expected", required=True, help="expected.json of chaos_events.py")
    check.add_argument("--consumed", required=True, help="kcat -C dump of both topics: topic, partition, offset, key, value by tabs")
    check.add_argument("--offline", required=True, help="insert and error lines of projection-runtime test")
    check.add_argument("--offline-status", type=int, required=True, help="exit status of projection-runtime test")
    check.add_argument("--dead-letters", nargs="*", default=[], help="kcat -J dumps of the dead-letter topics")
    check.add_argument("--live-redis", type=int, required=True, help="port of the runtime's Redis")
    check.add_argument("--scratch-redis", type=int, required=True, help="port of the Redis of the offline replay")
    check.add_argument("--clickhouse", type=int, required=True, help="ClickHouse HTTP port")
    check.add_argument("--details", required=True, help="file for the listed differences")
    check.add_argument("--runtime-log", help="the runtime's log, for counts of outages and dropped batches")
    check.add_argument("--kills", type=int, default=0)
    check.add_argument("--runtime-restarts", type=int, default=0)
    check.add_argument("--redis-restarts", type=int, default=0)
    check.add_argument("--clickhouse-restarts", type=int, default=0)
    args = parser.parse_args()

    if args.command == "behind":
        return behind(args)
    if args.command == "ports":
        print(" ".join(str(port) for port in free_ports(args.count)))
        return 0
    return verify(args)


if __name__ == "__main__":
    sys.exit(main())
