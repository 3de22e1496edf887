"""The benchmark driver behind scripts/benchmark.sh.

Starts redis-server, a private clickhouse-server and the dev Kafka broker on 127.0.0.1,
pre-produces bar events, and measures side by side:

1. throughput over the same topic: kcat into /dev/null (the ceiling), the Python baseline
   consumer, and projection-runtime with latest_price alone and with the three shipped
   projections, with CPU time per event and peak RSS;
2. produce-to-queryable latency of latest_price at 10,000 events/s, also while a SIGHUP
   reload happens every second;
3. scaling with workers, partitions and the number of loaded projections;
4. process start to listening, to /ready and to the first group join;

then prints one table, checks the targets and writes var/benchmark/results.json. Every child
process is stopped by PID when the driver ends, and gets SIGTERM from the kernel if the driver
dies first.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import confluent_kafka
import redis

import events
import measure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

MAIN_TOPIC = "bench.bars"
MAIN_PARTITIONS = 64
INVALIDATION_TOPIC = "bench.invalidations"
SCALE_PARTITIONS = (8, 32, 64)
LATENCY_TOPICS = {"steady": "bench.latency.steady", "reloading": "bench.latency.reloading",
                  "default_fetch": "bench.latency.default-fetch"}
STARTUP_TOPIC = "bench.startup"
LATENCY_RATE = 10_000
# linger.ms of the background producer in the latency test. librdkafka 2.0.2's mock broker
# scans a partition's message sets one by one for every fetch, so its CPU grows with their
# number. At the default of 5 ms most sets contain one event, and after 20 s at 10,000
# events/s the broker alone used more than half a core. 50 ms batches about 8 events per set.
BACKGROUND_LINGER_MS = 50

# A run whose stored offsets do not move for this long is reported as stalled.
STALL_SECONDS = 8.0
RUN_TIMEOUT_SECONDS = 400.0


def scale_topic(partitions):
    return f"bench.scale.p{partitions}"


class Plan:
    """Sizes of one benchmark run. QUICK=1 shrinks them to a smoke run of 2 to 3 minutes."""

    def __init__(self, quick):
        self.quick = quick
        # 100,000 instruments in both modes, so the RSS target is checked with that many.
        self.main_instruments = 100_000
        self.main_rounds = 1 if quick else 5
        # The smallest scale topic has 8 partitions and the mock keeps about 5 MB per partition,
        # so the scale topics get fewer events than the main one.
        self.scale_instruments = 10_000 if quick else 20_000
        self.scale_rounds = 3 if quick else 6
        self.latency_seconds = 6.0 if quick else 20.0
        self.default_fetch_seconds = 0.0 if quick else 5.0
        self.kcat_repeats = 1 if quick else 3
        self.startup_repeats = 1 if quick else 3
        self.projection_counts = (1, 3) if quick else (1, 3, 10)
        self.profile_seconds = 0.0 if quick else 5.0

    @property
    def main_events(self):
        return self.main_instruments * self.main_rounds

    @property
    def scale_events(self):
        return self.scale_instruments * self.scale_rounds


def log(message):
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


class Benchmark:
    def __init__(self, arguments):
        self.arguments = arguments
        self.plan = Plan(arguments.quick)
        self.binary = os.path.abspath(arguments.binary)
        self.python = arguments.python
        self.out_dir = os.path.abspath(arguments.out_dir)
        self.log_dir = os.path.join(self.out_dir, "logs")
        self.processes = measure.Processes(log)
        self.cores = os.cpu_count() or 1
        self.rows = []
        self.latency = {}
        self.startup = {}
        self.profile = {}
        self.checks = []
        self.run_counter = 0
        self.redis_port = None
        self.redis_pid = None
        self.clickhouse_port = None
        self.clickhouse_pid = None
        self.broker_pid = None
        self.bootstrap = None
        self.redis = None
        self.end_offsets = {}

    # MARK: services

    def start_services(self):
        os.makedirs(self.log_dir, exist_ok=True)
        self.redis_port = measure.free_port()
        redis_dir = os.path.join(self.out_dir, "redis")
        os.makedirs(redis_dir, exist_ok=True)
        process = self.processes.start("redis-server", [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--dir", redis_dir,
            "--save", "", "--appendonly", "no",
        ], stdout=open(os.path.join(self.log_dir, "redis.log"), "w"), stderr=subprocess.STDOUT)
        self.redis_pid = process.pid
        self.redis = redis.Redis(host="127.0.0.1", port=self.redis_port, decode_responses=True)
        measure.wait_for("redis-server to answer PING", 10, self._redis_answers)

        self.clickhouse_port = measure.free_port()
        clickhouse_dir = os.path.join(self.out_dir, "clickhouse")
        shutil.rmtree(clickhouse_dir, ignore_errors=True)
        clickhouse_out = os.path.join(self.log_dir, "clickhouse.out")
        self.processes.start("clickhouse-local.sh", [
            os.path.join(ROOT, "scripts", "clickhouse-local.sh"), clickhouse_dir, str(self.clickhouse_port),
            str(measure.free_port()), str(measure.free_port()),
        ], stdout=open(clickhouse_out, "w"), stderr=subprocess.STDOUT)
        ready_line = measure.wait_for("clickhouse-server to start", 90,
                                      lambda: self._line_starting(clickhouse_out, "clickhouse-local: ready"))
        self.clickhouse_pid = int(re.search(r"\(pid (\d+)", ready_line).group(1))

        topics = [f"{MAIN_TOPIC}:{MAIN_PARTITIONS}", f"{INVALIDATION_TOPIC}:2", f"{STARTUP_TOPIC}:{MAIN_PARTITIONS}"]
        topics += [f"{topic}:{MAIN_PARTITIONS}" for topic in LATENCY_TOPICS.values()]
        topics += [f"{scale_topic(count)}:{count}" for count in SCALE_PARTITIONS]
        broker_arguments = [self.binary, "dev-broker"]
        for topic in topics:
            broker_arguments += ["--topic", topic]
        broker_out = os.path.join(self.log_dir, "broker.out")
        process = self.processes.start("dev-broker", broker_arguments, stdout=open(broker_out, "w"),
                                       stderr=open(os.path.join(self.log_dir, "broker.log"), "w"))
        self.broker_pid = process.pid
        self.bootstrap = measure.wait_for("the dev broker's bootstrap address", 15,
                                          lambda: self._line_starting(broker_out, "127.0.0.1:"))
        log(f"redis-server :{self.redis_port}, clickhouse-server :{self.clickhouse_port}, dev broker {self.bootstrap}")

    def _redis_answers(self):
        try:
            return self.redis.ping()
        except redis.exceptions.ConnectionError:
            return False

    @staticmethod
    def _line_starting(path, prefix):
        try:
            with open(path, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    if line.startswith(prefix):
                        return line.strip()
        except FileNotFoundError:
            return None
        return None

    def reset_redis(self):
        self.redis.flushall()
        self.redis.config_resetstat()

    # MARK: events

    def produce_events(self):
        main_file = os.path.join(self.out_dir, "events-main.kcat")
        scale_file = os.path.join(self.out_dir, "events-scale.kcat")
        events.write_kcat_file(main_file, self.plan.main_instruments, self.plan.main_rounds)
        events.write_kcat_file(scale_file, self.plan.scale_instruments, self.plan.scale_rounds)
        jobs = [(MAIN_TOPIC, MAIN_PARTITIONS, main_file, self.plan.main_events)]
        jobs += [(scale_topic(count), count, scale_file, self.plan.scale_events) for count in SCALE_PARTITIONS]
        for topic, partitions, path, expected in jobs:
            started = time.monotonic()
            subprocess.run(["kcat", "-b", self.bootstrap, "-t", topic, "-P", "-K", "|", "-l", path],
                           check=True, timeout=300)
            offsets = measure.watermarks(self.bootstrap, topic, partitions)
            stored = sum(high - low for low, high in offsets.values())
            dropped = sum(low for low, _ in offsets.values())
            if stored != expected or dropped:
                raise RuntimeError(
                    f"topic {topic} contains {stored} of {expected} events ({dropped} dropped): the dev broker "
                    f"keeps about 5 MB per partition, so produce fewer events or use more partitions")
            self.end_offsets[topic] = offsets
            log(f"produced {expected} events to {topic} ({partitions} partitions) in "
                f"{time.monotonic() - started:.1f} s")

    # MARK: kcat and Python

    def run_kcat(self):
        runs = []
        for repeat in range(self.plan.kcat_repeats):
            window = measure.CpuWindow({"broker": self.broker_pid})
            window.start()
            started = time.monotonic()
            process = self.processes.start("kcat", [
                "kcat", "-C", "-b", self.bootstrap, "-t", MAIN_TOPIC, "-e", "-o", "beginning", "-q",
            ], stdout=subprocess.DEVNULL)
            status, usage = self._wait_with_usage(process, 120)
            seconds = time.monotonic() - started
            window.stop()
            if status != 0:
                raise RuntimeError(f"kcat exited with status {status}")
            runs.append((seconds, usage, window))
        runs.sort(key=lambda run: run[0])
        seconds, usage, window = runs[len(runs) // 2]
        count = self.plan.main_events
        self.rows.append({
            "section": "throughput", "case": "kcat -C -e into /dev/null (ceiling)", "kind": "kcat",
            "events": count, "seconds": seconds, "events_per_s": count / seconds, "completed": True,
            "cpu_us_per_event": {"consumer": (usage.ru_utime + usage.ru_stime) * 1e6 / count},
            "side_us_per_event": (usage.ru_utime + usage.ru_stime) * 1e6 / count,
            "broker_us_per_event": (window.seconds("broker") or 0) * 1e6 / count,
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "consumer_cpu_share": (usage.ru_utime + usage.ru_stime) / seconds,
            "others_cpu_share": window.others_seconds() / seconds / self.cores,
            "note": f"median of {len(runs)} runs, process start to EOF",
        })

    def _wait_with_usage(self, process, timeout):
        """Wait for a child and return (exit status, resource usage) from wait4."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                self.processes.running.remove(process)
                return process.returncode, usage
            if time.monotonic() > deadline:
                self.processes.stop(process, timeout=5)
                raise TimeoutError(f"{process.bench_name} did not finish within {timeout} s")
            time.sleep(0.001)

    def run_python(self):
        self.reset_redis()
        count = self.plan.main_events
        process = self.processes.start("python consumer", [
            self.python, os.path.join(HERE, "python_consumer.py"), "--bootstrap", self.bootstrap,
            "--topic", MAIN_TOPIC, "--group", self._group("python"), "--redis-port", str(self.redis_port),
            "--expect", str(count), "--timeout", str(RUN_TIMEOUT_SECONDS),
        ], stdout=subprocess.PIPE, stderr=open(os.path.join(self.log_dir, "python-consumer.log"), "w"), text=True)

        window = measure.CpuWindow({"consumer": process.pid, "redis": self.redis_pid, "broker": self.broker_pid})
        started = done = None
        peak_kib = None
        summary = {}
        for line in process.stdout:
            record = json.loads(line)
            if record["event"] == "assigned":
                window.start()
                started = time.monotonic()
            elif record["event"] in ("done", "timeout"):
                done = time.monotonic()
                window.stop()
                peak_kib = measure.status_kib(process.pid, "VmHWM")
                summary = record
                break
        self.processes.stop(process, timeout=30)

        if started is None or summary.get("event") != "done":
            raise RuntimeError(f"the Python consumer did not finish: {summary or 'no output'}; "
                               f"see {self.log_dir}/python-consumer.log")
        stored_prices = self.redis.dbsize()
        seconds = done - started
        self.rows.append(self._row("throughput", "Python: confluent-kafka + redis-py pipeline", "python", count,
                                   seconds, window, peak_kib, completed=True,
                                   note=f"{stored_prices} price hashes in Redis"))

    # MARK: the runtime

    def _group(self, label):
        self.run_counter += 1
        return f"bench-{self.run_counter:02d}-{label}"

    def start_runtime(self, label, topic, projections, workers=None, config=None):
        group = self._group(label)
        health_port, api_port = measure.free_port(), measure.free_port()
        environment = {name: value for name, value in os.environ.items() if not name.startswith("DATA_PROC_")}
        environment.update({
            "DATA_PROC_KAFKA_BOOTSTRAP": self.bootstrap,
            "DATA_PROC_KAFKA_GROUP_ID": group,
            "DATA_PROC_PROJECTION_AGGREGATED_TOPIC": topic,
            "DATA_PROC_PROJECTION_INVALIDATION_TOPIC": INVALIDATION_TOPIC,
            "DATA_PROC_REDIS_PORT": str(self.redis_port),
            "DATA_PROC_CLICKHOUSE_HTTP_PORT": str(self.clickhouse_port),
            "DATA_PROC_PROJECTION_PORT": str(health_port),
            "DATA_PROC_INTERNAL_API_PORT": str(api_port),
            "DATA_PROC_HTTP_BIND": "127.0.0.1",
        })
        if workers is not None:
            environment["DATA_PROC_WORKERS"] = str(workers)
        argv = [self.binary, "run", "--projections", projections]
        if config:
            argv += ["--config", config]
        log_path = os.path.join(self.log_dir, f"runtime-{group}.log")
        started = time.monotonic()
        process = self.processes.start(f"projection-runtime ({group})", argv, env=environment,
                                       stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
        return {"process": process, "group": group, "health_port": health_port, "api_port": api_port,
                "started": started, "log": log_path}

    def wait_ready(self, runtime, interval=0.005, timeout=60.0, joined=True):
        """Poll /ready, then /health until the consumer has joined its group (unless `joined` is
        False). Return seconds from process start to the first HTTP response, to /ready
        returning 200, and to the join (None when not waited for)."""
        listening = None
        ready = None
        deadline = runtime["started"] + timeout
        while time.monotonic() < deadline:
            if runtime["process"].poll() is not None:
                raise RuntimeError(f"projection-runtime exited with status {runtime['process'].returncode}; "
                                   f"see {runtime['log']}")
            if ready is None:
                status, _ = measure.http_get(runtime["health_port"], "/ready", timeout=1)
                now = time.monotonic()
                if status is not None and listening is None:
                    listening = now - runtime["started"]
                if status == 200:
                    ready = now - runtime["started"]
                    if not joined:
                        return listening, ready, None
            if ready is not None:
                status, body = measure.http_get(runtime["health_port"], "/health", timeout=1)
                if status == 200 and b'"state":"joined"' in (body or b""):
                    return listening, ready, time.monotonic() - runtime["started"]
            time.sleep(interval)
        raise TimeoutError(f"projection-runtime was not ready and joined within {timeout:.0f} s; "
                           f"see {runtime['log']}")

    def stored_progress(self, group, topic):
        """Return how many events of `topic` have offsets stored in Redis, and whether all have."""
        stored = self.redis.hgetall(f"prt:offsets:{{{group}}}")
        consumed = 0
        complete = True
        for partition, (low, high) in self.end_offsets[topic].items():
            offset = int(stored.get(f"{topic}/{partition}", low))
            consumed += min(offset, high) - low
            complete = complete and offset >= high
        return consumed, complete

    def _unfinished_partitions(self, group, topic):
        stored = self.redis.hgetall(f"prt:offsets:{{{group}}}")
        return [partition for partition, (low, high) in sorted(self.end_offsets[topic].items())
                if int(stored.get(f"{topic}/{partition}", low)) < high]

    def measure_runtime(self, section, case, topic, projections, workers=None, config=None,
                        with_clickhouse=False, profile_seconds=0.0):
        """Run the runtime over a pre-produced topic until its offsets in Redis reach the end."""
        self.reset_redis()
        label = re.sub(r"[^a-z0-9]+", "-", case.lower()).strip("-")[:48]
        runtime = self.start_runtime(label, topic, projections, workers=workers, config=config)
        pids = {"consumer": runtime["process"].pid, "redis": self.redis_pid, "broker": self.broker_pid}
        if with_clickhouse:
            pids["clickhouse"] = self.clickhouse_pid
        window = measure.CpuWindow(pids)
        expected = sum(high - low for low, high in self.end_offsets[topic].values())
        try:
            self.wait_ready(runtime, interval=0.01)
            window.start()
            threads_before = measure.thread_cpu_seconds(runtime["process"].pid)
            started = time.monotonic()
            profiler = self._start_profiler(runtime["process"].pid, profile_seconds) if profile_seconds else None
            consumed, complete = 0, False
            last_progress = started
            outcome = "completed"
            while True:
                consumed_now, complete = self.stored_progress(runtime["group"], topic)
                now = time.monotonic()
                if consumed_now > consumed:
                    consumed, last_progress = consumed_now, now
                if complete:
                    last_progress = now
                    break
                if runtime["process"].poll() is not None:
                    raise RuntimeError(f"projection-runtime exited during the run; see {runtime['log']}")
                if now - last_progress > STALL_SECONDS:
                    outcome = "stalled"
                    break
                if now - started > RUN_TIMEOUT_SECONDS:
                    outcome = "timed out"
                    break
                time.sleep(0.02)
            window.stop()
            threads_after = measure.thread_cpu_seconds(runtime["process"].pid)
            peak_kib = measure.status_kib(runtime["process"].pid, "VmHWM")
            # Resident memory at the end, split into private memory and shared library pages.
            anonymous_kib = measure.status_kib(runtime["process"].pid, "RssAnon") or 0
            file_kib = measure.status_kib(runtime["process"].pid, "RssFile") or 0
            _, metrics_body = measure.http_get(runtime["health_port"], "/metrics", timeout=5)
            served = sum(self.redis.scard(f"lp:{{{events.tenant_of(index)}}}:served")
                         for index in range(events.TENANTS))
            command_stats = self._redis_command_stats()
            owners = self.redis.hgetall(f"prt:owners:{{{runtime['group']}}}")
            unfinished = self._unfinished_partitions(runtime["group"], topic)
            if profiler:
                profiler.join()
        finally:
            self.processes.stop(runtime["process"], timeout=30)
        lost_claims = self._count_log_lines(runtime["log"], "claimed by another process")
        seconds = max(last_progress - started, 1e-3)
        note_parts = []
        if outcome != "completed":
            note_parts.append(f"{outcome.upper()} at {consumed}/{expected} events")
        if lost_claims:
            note_parts.append(f"{lost_claims} batches dropped as 'claimed by another process'")
        lua_bytes = sum(measure.prometheus_values(metrics_body.decode(errors="replace"),
                                                  "projection_lua_memory_bytes").values())
        row = self._row(section, case, "runtime", consumed, seconds, window, peak_kib,
                        completed=outcome == "completed", note="; ".join(note_parts))
        row.update({
            "workers": workers or self.cores, "topic": topic, "partitions": len(self.end_offsets[topic]),
            "expected_events": expected, "served_latest_prices": served,
            "lua_memory_mib": lua_bytes / 2**20, "redis_commands": command_stats,
            "rss_anonymous_at_end_mib": anonymous_kib / 1024, "rss_file_at_end_mib": file_kib / 1024,
            "lost_claim_batches": lost_claims, "log": os.path.relpath(runtime["log"], ROOT),
            # The claim token (one per worker) of each unfinished partition, which distinguishes a
            # partition that another process took from one that the runtime stopped on by itself.
            "unfinished_partitions": {str(partition): owners.get(f"{topic}/{partition}")
                                      for partition in unfinished},
            "claim_tokens": len(set(owners.values())),
            "thread_cpu_share": {name: round((seconds_after - threads_before.get(name, 0.0)) / seconds, 3)
                                 for name, seconds_after in sorted(threads_after.items())
                                 if seconds_after - threads_before.get(name, 0.0) > 0.01},
        })
        self.rows.append(row)
        log(f"{case}: {row['events_per_s']:,.0f} events/s, {outcome}")
        return row

    def _row(self, section, case, kind, count, seconds, window, peak_kib, completed, note=""):
        count = max(count, 1)
        consumer = window.seconds("consumer") or 0.0
        redis_seconds = window.seconds("redis") or 0.0
        clickhouse = window.seconds("clickhouse") or 0.0
        return {
            "section": section, "case": case, "kind": kind, "events": count, "seconds": seconds,
            "events_per_s": count / seconds, "completed": completed,
            "cpu_us_per_event": {"consumer": consumer * 1e6 / count, "redis": redis_seconds * 1e6 / count,
                                 "clickhouse": clickhouse * 1e6 / count},
            "side_us_per_event": (consumer + redis_seconds + clickhouse) * 1e6 / count,
            "broker_us_per_event": (window.seconds("broker") or 0.0) * 1e6 / count,
            "peak_rss_mib": (peak_kib or 0) / 1024,
            "others_cpu_share": window.others_seconds() / seconds / self.cores,
            "consumer_cpu_share": consumer / seconds,
            "note": note,
        }

    def _redis_command_stats(self):
        stats = {}
        for name, values in self.redis.info("commandstats").items():
            command = name.removeprefix("cmdstat_")
            if values["calls"] >= 100:
                stats[command] = {"calls": values["calls"], "usec_per_call": values["usec_per_call"]}
        return stats

    @staticmethod
    def _count_log_lines(path, text):
        with open(path, encoding="utf-8", errors="replace") as lines:
            return sum(1 for line in lines if text in line)

    # MARK: projection folders

    def projections_folder(self, name, copies=1, with_all=False):
        """Build a projections folder under var/benchmark: latest_price, its copies, or all three."""
        folder = os.path.join(self.out_dir, "projections", name)
        shutil.rmtree(folder, ignore_errors=True)
        if with_all:
            shutil.copytree(os.path.join(ROOT, "projections"), folder)
            return folder
        os.makedirs(os.path.join(folder, "lib"))
        for library in ("events.lua", "fields.lua", "price_store.lua"):
            shutil.copy(os.path.join(ROOT, "projections", "lib", library), os.path.join(folder, "lib", library))
        shutil.copy(os.path.join(ROOT, "projections", "latest_price.lua"), folder)
        with open(os.path.join(ROOT, "projections", "latest_price.lua"), encoding="utf-8") as source:
            projection = source.read()
        with open(os.path.join(ROOT, "projections", "lib", "price_store.lua"), encoding="utf-8") as source:
            store = source.read()
        for number in range(2, copies + 1):
            # Each copy writes its own keys (prefix lpN:) through its own copy of price_store.
            copy = self._replace_once(projection, 'require("price_store")', f'require("price_store_{number}")')
            copy = self._replace_once(copy, 'name = "latest_price"', f'name = "latest_price_{number}"')
            store_copy = self._replace_once(store, 'local PREFIX = "lp:"', f'local PREFIX = "lp{number}:"')
            with open(os.path.join(folder, f"latest_price_{number}.lua"), "w", encoding="utf-8") as out:
                out.write(copy)
            with open(os.path.join(folder, "lib", f"price_store_{number}.lua"), "w", encoding="utf-8") as out:
                out.write(store_copy)
        return folder

    @staticmethod
    def _replace_once(text, old, new):
        if text.count(old) != 1:
            raise RuntimeError(f"cannot copy latest_price: expected '{old}' once in the shipped file, "
                               f"found it {text.count(old)} times")
        return text.replace(old, new)

    def write_config(self, name, properties):
        path = os.path.join(self.out_dir, f"{name}.yaml")
        with open(path, "w", encoding="utf-8") as out:
            out.write("kafka:\n  properties:\n")
            for key, value in properties.items():
                out.write(f"    {key}: {value}\n")
        return path

    # MARK: sections

    def run_throughput(self):
        latest_only = self.projections_folder("latest_price")
        for workers in range(self.cores, 0, -1):
            label = f"workers={workers}" + (" (default)" if workers == self.cores else "")
            self.measure_runtime("throughput", f"runtime latest_price, {label}", MAIN_TOPIC, latest_only,
                                 workers=None if workers == self.cores else workers)
        workers = self.effective_workers()
        small_queue = self.write_config("small-fetch-queue", {"queued.max.messages.kbytes": 4096})
        self.measure_runtime("throughput", f"runtime latest_price, workers={workers}, "
                             "queued.max.messages.kbytes=4096", MAIN_TOPIC, latest_only,
                             workers=workers, config=small_queue)
        self.clickhouse_query("DROP TABLE IF EXISTS bar_rollups")
        row = self.measure_runtime("throughput", f"runtime 3 projections, workers={workers}", MAIN_TOPIC,
                                   self.projections_folder("all", with_all=True), workers=workers,
                                   with_clickhouse=True)
        row["clickhouse_rows"] = int(self.clickhouse_query("SELECT count() FROM bar_rollups").strip() or 0)

    def clickhouse_query(self, sql):
        return measure.clickhouse_query(self.clickhouse_port, sql)

    def effective_workers(self):
        """Return the worker count of the fastest completed latest_price run, for the later runs."""
        candidates = [row for row in self.rows if row["kind"] == "runtime" and row["completed"]
                      and row["case"].startswith("runtime latest_price, workers=") and "queued" not in row["case"]]
        if not candidates:
            return 1
        return max(candidates, key=lambda row: row["events_per_s"])["workers"]

    def run_scaling(self):
        workers = self.effective_workers()
        latest_only = self.projections_folder("latest_price")
        for partitions in SCALE_PARTITIONS:
            self.measure_runtime("partitions", f"runtime latest_price, {partitions} partitions, workers={workers}",
                                 scale_topic(partitions), latest_only, workers=workers)
        for count in self.plan.projection_counts:
            if count == 1:
                continue  # the 64-partition run above
            folder = self.projections_folder(f"copies-{count}", copies=count)
            self.measure_runtime("projections", f"runtime {count} copies of latest_price, 64 partitions, "
                                 f"workers={workers}", scale_topic(64), folder, workers=workers)

    def run_latency(self):
        """Measure latency in phases, each with a fresh topic and runtime, because the dev broker
        slows down as its log grows."""
        workers = self.effective_workers()
        fast_fetch = self.write_config("latency", {"fetch.wait.max.ms": 1})
        phases = [("steady", LATENCY_TOPICS["steady"], fast_fetch, False, self.plan.latency_seconds),
                  ("reloading", LATENCY_TOPICS["reloading"], fast_fetch, True, self.plan.latency_seconds)]
        if self.plan.default_fetch_seconds:
            phases.append(("default_fetch", LATENCY_TOPICS["default_fetch"], None, False,
                           self.plan.default_fetch_seconds))
        for name, topic, config, reloading, seconds in phases:
            log(f"latency: {name}")
            folder = self.projections_folder(f"latency-{name}")
            self.reset_redis()
            runtime = self.start_runtime(f"latency-{name}", topic, folder, workers=workers, config=config)
            try:
                self.wait_ready(runtime)
                time.sleep(1.0)
                reloads = ReloadLoop(runtime["process"].pid, os.path.join(folder, "latest_price.lua"))
                if reloading:
                    reloads.start()
                try:
                    phase = self._latency_phase(runtime, topic, seconds)
                finally:
                    if reloading:
                        reloads.stop()
                samples = phase.pop("samples")
                if reloading:
                    _, metrics_body = measure.http_get(runtime["health_port"], "/metrics", timeout=5)
                    phase["sighups_sent"] = len(reloads.times)
                    phase["reloads_by_result"] = measure.prometheus_values(metrics_body.decode(errors="replace"),
                                                                           "projection_reloads_total")
                    phase.update(self._split_by_reload(samples, reloads.times))
            finally:
                self.processes.stop(runtime["process"], timeout=30)
            phase["fetch_wait_max_ms"] = 1 if config else 500
            self.latency[name] = phase
        self.latency["workers"] = workers
        self.latency["background_linger_ms"] = BACKGROUND_LINGER_MS

    def _latency_phase(self, runtime, topic, seconds):
        """Produce LATENCY_RATE events/s and probe latest_price for `seconds`, and return the figures."""
        window = measure.CpuWindow({"consumer": runtime["process"].pid, "redis": self.redis_pid})
        window.start()
        started = time.monotonic()
        producer = self.processes.start("paced producer", [
            self.python, os.path.join(HERE, "paced_producer.py"), "--bootstrap", self.bootstrap, "--topic", topic,
            "--rate", str(LATENCY_RATE), "--seconds", str(seconds),
            "--instruments", str(self.plan.main_instruments), "--linger-ms", str(BACKGROUND_LINGER_MS),
        ], stdout=subprocess.PIPE, text=True)
        probe = self.processes.start("latency probe", [
            self.python, os.path.join(HERE, "latency_probe.py"), "--bootstrap", self.bootstrap, "--topic", topic,
            "--api-port", str(runtime["api_port"]), "--seconds", str(seconds),
        ], stdout=subprocess.PIPE, text=True)

        probe_output, _ = probe.communicate(timeout=seconds + 60)
        producer_output, _ = producer.communicate(timeout=60)
        self.processes.stop(probe)
        self.processes.stop(producer)
        elapsed = time.monotonic() - started
        window.stop()

        probe_result = json.loads(probe_output)
        producer_result = json.loads(producer_output)
        latencies = sorted(probe_result["latencies_ms"])
        return {
            "seconds": seconds, "produced_rate": producer_result["rate"], "probes": probe_result["probes"],
            "timeouts": probe_result["timeouts"], "queries": probe_result["queries"],
            "p50_ms": measure.percentile(latencies, 0.50), "p99_ms": measure.percentile(latencies, 0.99),
            "max_ms": latencies[-1] if latencies else None,
            "runtime_cpu_share": (window.seconds("consumer") or 0) / elapsed,
            "runtime_peak_rss_mib": (measure.status_kib(runtime["process"].pid, "VmHWM") or 0) / 1024,
            "redis_commands": self._redis_command_stats(),
            "redis_cpu_share": (window.seconds("redis") or 0) / elapsed,
            "others_cpu_share": window.others_seconds() / elapsed / self.cores,
            "samples": probe_result["samples"],
        }

    @staticmethod
    def _split_by_reload(samples, reload_times, after_seconds=0.3):
        """Return the p99 of probes published up to `after_seconds` after a SIGHUP and of the others."""
        near, far = [], []
        for published, latency in samples:
            value = latency if latency is not None else float("inf")
            is_near = any(0 <= published - sent < after_seconds for sent in reload_times)
            (near if is_near else far).append(value)
        near.sort()
        far.sort()
        return {
            "window_after_sighup_ms": after_seconds * 1000,
            "probes_after_sighup": len(near), "p99_after_sighup_ms": measure.percentile(near, 0.99),
            "max_after_sighup_ms": near[-1] if near else None,
            "probes_elsewhere": len(far), "p99_elsewhere_ms": measure.percentile(far, 0.99),
        }

    def run_startup(self):
        folder = self.projections_folder("latest_price")
        samples = []
        for _ in range(self.plan.startup_repeats):
            self.reset_redis()
            runtime = self.start_runtime("startup", STARTUP_TOPIC, folder)
            try:
                listening, ready, _ = self.wait_ready(runtime, interval=0.002, joined=False)
                idle_kib = measure.status_kib(runtime["process"].pid, "VmRSS")
                idle_anonymous_kib = measure.status_kib(runtime["process"].pid, "RssAnon")
                _, _, joined = self.wait_ready(runtime, interval=0.002)
            finally:
                self.processes.stop(runtime["process"], timeout=30)
            samples.append({"listening_ms": listening * 1000, "ready_ms": ready * 1000, "joined_ms": joined * 1000,
                            "rss_at_ready_mib": (idle_kib or 0) / 1024,
                            "rss_anonymous_at_ready_mib": (idle_anonymous_kib or 0) / 1024})
        samples.sort(key=lambda sample: sample["ready_ms"])
        self.startup = {"samples": samples, "median": samples[len(samples) // 2]}

    def run_profile(self):
        if not self.plan.profile_seconds or not shutil.which("perf"):
            self.profile = {"skipped": "QUICK=1 or perf is missing"}
            return
        workers = self.effective_workers()
        rows_before = len(self.rows)
        self.measure_runtime("profile", f"runtime latest_price under perf, workers={workers}", MAIN_TOPIC,
                             self.projections_folder("latest_price"), workers=workers,
                             profile_seconds=self.plan.profile_seconds)
        # Sampling slows the run, so its figures stay out of the table.
        self.rows = self.rows[:rows_before]

    def _start_profiler(self, pid, seconds):
        data = os.path.join(self.out_dir, "perf.data")
        thread = threading.Thread(target=self._profile, args=(pid, seconds, data), daemon=True)
        thread.start()
        return thread

    def _profile(self, pid, seconds, data):
        time.sleep(0.5)
        record = subprocess.run(["perf", "record", "-F", "499", "--call-graph", "dwarf,16384", "-p", str(pid),
                                 "-o", data, "--", "sleep", str(seconds)],
                                capture_output=True, text=True, timeout=seconds + 60)
        if record.returncode != 0:
            self.profile = {"error": record.stderr.strip()[-300:]}
            return
        inclusive = self._perf_report(data, ["--children", "--sort", "symbol"])
        by_library = self._perf_report(data, ["--no-children", "--sort", "dso"])
        self_time = self._perf_report(data, ["--no-children", "--sort", "dso,symbol"])
        path = os.path.join(self.out_dir, "profile.txt")
        with open(path, "w", encoding="utf-8") as out:
            out.write(f"perf record -F 499 --call-graph dwarf -p <runtime> for {seconds:.0f} s under load\n\n")
            out.write("== share of samples by library (self time)\n" + "\n".join(by_library[:15]) + "\n\n")
            out.write("== inclusive time by function (children included)\n" + "\n".join(inclusive[:60]) + "\n\n")
            out.write("== self time by function\n" + "\n".join(self_time[:40]) + "\n")
        self.profile = {"file": os.path.relpath(path, ROOT), "by_library": by_library[:10],
                        "inclusive": inclusive[:45], "self": self_time[:25]}

    @staticmethod
    def _perf_report(data, options):
        report = subprocess.run(["perf", "report", "-i", data, "--stdio", "-g", "none", "--percent-limit", "0.3"]
                                + options, capture_output=True, text=True, timeout=300)
        lines = [line.rstrip() for line in report.stdout.splitlines() if "%" in line and not line.startswith("#")]
        demangler = shutil.which("swift-demangle")
        if demangler and lines:
            demangled = subprocess.run([demangler, "--simplified"], input="\n".join(lines),
                                       capture_output=True, text=True, timeout=60)
            lines = demangled.stdout.splitlines()
        return [re.sub(r"\s{2,}", "  ", line).strip()[:180] for line in lines]

    # MARK: results

    def finish_rows(self):
        kcat = next((row for row in self.rows if row["kind"] == "kcat"), None)
        python = next((row for row in self.rows if row["kind"] == "python"), None)
        for row in self.rows:
            row["ratio_to_kcat"] = row["events_per_s"] / kcat["events_per_s"] if kcat else None
            row["ratio_to_python"] = row["events_per_s"] / python["events_per_s"] if python else None

    def evaluate_targets(self):
        default_row = next((row for row in self.rows if row["case"].startswith("runtime latest_price, workers=")
                            and "(default)" in row["case"]), None)
        completed = [row for row in self.rows if row["case"].startswith("runtime latest_price, workers=")
                     and "queued" not in row["case"] and row["completed"]]
        chosen = default_row if default_row and default_row["completed"] else (
            max(completed, key=lambda row: row["events_per_s"]) if completed else default_row)
        which = chosen["case"].removeprefix("runtime latest_price, ") if chosen else "none"
        if default_row and chosen is not default_row:
            which += f"; the default run did not complete ({default_row['note']})"

        def add(target, value, limit, passed, unit, detail=""):
            self.checks.append({"target": target, "value": value, "limit": limit, "unit": unit,
                                "passed": bool(passed), "detail": detail})

        if chosen:
            # The ratios exist only when the baselines section ran in the same invocation.
            if chosen["ratio_to_kcat"] is not None:
                add("latest_price throughput >= 0.5 x kcat", chosen["ratio_to_kcat"], 0.5,
                    chosen["ratio_to_kcat"] >= 0.5, "x", which)
            if chosen["ratio_to_python"] is not None:
                add("latest_price throughput >= 5 x Python", chosen["ratio_to_python"], 5.0,
                    chosen["ratio_to_python"] >= 5.0, "x", which)
            add("peak RSS <= 64 MiB with 100,000 instruments", chosen["peak_rss_mib"], 64.0,
                chosen["peak_rss_mib"] <= 64.0, "MiB",
                f"{which}; {chosen.get('served_latest_prices', 0)} prices served")
        steady = self.latency.get("steady")
        if steady:
            add("p99 latency <= 5 ms at 10k events/s", steady["p99_ms"], 5.0,
                steady["p99_ms"] is not None and steady["p99_ms"] <= 5.0 and not steady["timeouts"], "ms",
                f"{steady['timeouts']} probes not visible within 2 s")
        reloading = self.latency.get("reloading")
        if reloading:
            add("p99 latency <= 20 ms with a reload every second", reloading["p99_ms"], 20.0,
                reloading["p99_ms"] is not None and reloading["p99_ms"] <= 20.0 and not reloading["timeouts"], "ms",
                f"{reloading['timeouts']} probes not visible within 2 s")
        if self.startup:
            median = self.startup["median"]
            add("process start to /ready <= 300 ms", median["ready_ms"], 300.0, median["ready_ms"] <= 300.0, "ms",
                f"median of {len(self.startup['samples'])}; start to listening {median['listening_ms']:.0f} ms")

    def print_table(self):
        header = ["section", "case", "events/s", "x kcat", "x python", "CPU us/ev", "side us/ev", "broker",
                  "RSS MiB", "notes"]
        table = [header]
        for row in self.rows:
            cpu = row["cpu_us_per_event"]["consumer"]
            table.append([
                row["section"], row["case"], f"{row['events_per_s']:,.0f}", _ratio(row.get("ratio_to_kcat")),
                _ratio(row.get("ratio_to_python")), f"{cpu:.1f}", f"{row['side_us_per_event']:.1f}",
                f"{row['broker_us_per_event']:.1f}", f"{row['peak_rss_mib']:.0f}",
                _join([row["note"], f"others used {row['others_cpu_share']:.0%} CPU"
                       if row["others_cpu_share"] > 0.05 else ""]),
            ])
        for name, label in (("steady", "10k ev/s, fetch.wait.max.ms=1"),
                            ("reloading", "10k ev/s + SIGHUP every 1 s"),
                            ("default_fetch", "10k ev/s, default fetch.wait.max.ms")):
            phase = self.latency.get(name)
            if not phase:
                continue
            detail = (f"p50 {_ms(phase['p50_ms'])} p99 {_ms(phase['p99_ms'])} max {_ms(phase['max_ms'])}; "
                      f"{phase['probes']} probes, {phase['timeouts']} lost; runtime CPU {phase['runtime_cpu_share']:.0%}")
            if "p99_after_sighup_ms" in phase:
                detail += (f"; p99 {_ms(phase['p99_after_sighup_ms'])} for probes sent <= 300 ms after a SIGHUP, "
                           f"{_ms(phase['p99_elsewhere_ms'])} for the rest")
            table.append(["latency", label, f"{phase['produced_rate']:,.0f}", "", "", "", "", "", "", detail])
        if self.startup:
            median = self.startup["median"]
            slowest = max(sample["ready_ms"] for sample in self.startup["samples"])
            slowest_join = max(sample["joined_ms"] for sample in self.startup["samples"])
            table.append(["start", "process start -> listening / -> /ready / -> joined", "", "", "", "", "", "", "",
                          f"{median['listening_ms']:.0f} ms / {median['ready_ms']:.0f} ms / "
                          f"{median['joined_ms']:.0f} ms (median of {len(self.startup['samples'])}, "
                          f"slowest /ready {slowest:.0f} ms, slowest join {slowest_join:.0f} ms); "
                          f"RSS at ready {median['rss_at_ready_mib']:.0f} MiB"])
        widths = [max(len(str(line[column])) for line in table) for column in range(len(header))]
        for index, line in enumerate(table):
            cells = [str(cell).rjust(width) if 2 <= column <= 8 else str(cell).ljust(width)
                     for column, (cell, width) in enumerate(zip(line, widths))]
            print("  ".join(cells).rstrip())
            if index == 0:
                print("  ".join("-" * width for width in widths))
        print()
        for check in self.checks:
            verdict = "PASS" if check["passed"] else "MISS"
            value = "n/a" if check["value"] is None else f"{check['value']:.2f}"
            print(f"{verdict}  {check['target']}: {value} {check['unit']} ({check['detail']})")

    def machine(self):
        model = ""
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()

        def version(argv, marker=""):
            try:
                output = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                return None
            lines = [line.strip() for line in (output.stdout + output.stderr).splitlines() if marker in line]
            return lines[0] if lines else None

        return {
            "cpu_model": model, "cores": self.cores, "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                         * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "kernel": platform.release(), "load_average_at_start": os.getloadavg(),
            "projection_runtime": version([self.binary, "--version"]),
            "redis_server": version(["redis-server", "--version"]), "kcat": version(["kcat", "-V"], marker="Version"),
            "python": platform.python_version(), "confluent_kafka": confluent_kafka.__version__,
            "librdkafka_in_python": confluent_kafka.libversion()[0], "redis_py": redis.__version__,
        }

    def write_results(self, machine, started):
        results = {
            "command": "QUICK=1 make benchmark" if self.plan.quick else "make benchmark",
            "quick": self.plan.quick, "binary": os.path.relpath(self.binary, ROOT) if self.binary.startswith(ROOT)
            else self.binary,
            "git_commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                         text=True).stdout.strip(),
            "machine": machine, "duration_s": round(time.monotonic() - started, 1),
            "events": {"main_topic": MAIN_TOPIC, "main_partitions": MAIN_PARTITIONS,
                       "main_events": self.plan.main_events, "main_instruments": self.plan.main_instruments,
                       "scale_events": self.plan.scale_events, "scale_instruments": self.plan.scale_instruments},
            "rows": self.rows, "latency": self.latency, "startup": self.startup, "profile": self.profile,
            "targets": self.checks,
        }
        path = os.path.join(self.out_dir, "results.json")
        with open(path, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
        log(f"wrote {os.path.relpath(path, ROOT)}")

    def run(self):
        started = time.monotonic()
        machine = self.machine()
        self.start_services()
        self.produce_events()
        sections = [
            ("baselines", self.run_kcat), ("baselines", self.run_python), ("throughput", self.run_throughput),
            ("scaling", self.run_scaling), ("latency", self.run_latency), ("startup", self.run_startup),
            ("profile", self.run_profile),
        ]
        for name, run_section in sections:
            if self.arguments.only and name not in self.arguments.only:
                continue
            log(f"{name}: {run_section.__name__.removeprefix('run_')}")
            run_section()
        self.finish_rows()
        self.evaluate_targets()
        self.print_table()
        self.write_results(machine, started)


class ReloadLoop:
    """Changes a projection file and sends SIGHUP to the runtime once a second, in a thread."""

    def __init__(self, pid, path):
        self.pid = pid
        self.path = path
        # Unix time of each SIGHUP sent.
        self.times = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.thread.join()

    def _loop(self):
        while not self.stopping.wait(1.0):
            # A changed file gets a new version, so every SIGHUP compiles and swaps a projection.
            with open(self.path, "a", encoding="utf-8") as projection:
                projection.write(f"-- benchmark reload {len(self.times) + 1}\n")
            self.times.append(time.time())
            os.kill(self.pid, signal.SIGHUP)


def _ratio(value):
    return "" if value is None else f"{value:.2f}"


def _ms(value):
    return "n/a" if value is None else f"{value:.1f} ms"


def _join(parts):
    return "; ".join(part for part in parts if part)


def main():
    parser = argparse.ArgumentParser(description="Benchmark projection-runtime against kcat and a Python consumer.")
    parser.add_argument("--binary", required=True, help="the projection-runtime executable")
    parser.add_argument("--python", default=sys.executable, help="Python with confluent-kafka and redis")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "var", "benchmark"))
    parser.add_argument("--quick", action="store_true", help="fewer events and shorter phases (2 to 3 minutes)")
    parser.add_argument("--only", type=lambda text: text.split(","), default=None,
                        help="comma-separated sections to run: baselines, throughput, scaling, latency, "
                             "startup, profile (sections after throughput use 1 worker when it is skipped)")
    arguments = parser.parse_args()

    benchmark = Benchmark(arguments)
    # SIGTERM and SIGHUP end the run like Ctrl-C, so the finally block stops every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        benchmark.run()
    finally:
        benchmark.processes.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
