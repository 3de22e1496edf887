"""Measurement helpers of the benchmark: process CPU and memory from /proc, child processes
stopped by PID, small HTTP and ClickHouse requests, Kafka watermarks and percentiles.

CPU times come from /proc/<pid>/stat (utime + stime, in clock ticks of SC_CLK_TCK, all
threads of the process) and peak memory from VmHWM in /proc/<pid>/status, so figures cover
whole processes, librdkafka's and the HTTP threads included.
"""

import ctypes
import http.client
import math
import os
import signal
import socket
import subprocess
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def cpu_seconds(pid):
    """Return user + system CPU seconds of a running process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            text = stat.read()
    except FileNotFoundError:
        return None
    # The command name in brackets may contain spaces, so fields are counted after its ')'.
    fields = text[text.rindex(")") + 2:].split()
    # utime and stime are fields 14 and 15 of the line, so indexes 11 and 12 after the name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_seconds(pid):
    """Return {thread name: CPU seconds} of a process, adding up threads that share a name."""
    totals = {}
    try:
        thread_ids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return totals
    for thread_id in thread_ids:
        try:
            with open(f"/proc/{pid}/task/{thread_id}/stat", encoding="ascii", errors="replace") as stat:
                text = stat.read()
        except FileNotFoundError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return totals


def status_kib(pid, name):
    """Return a kB field of /proc/<pid>/status (VmHWM, VmRSS), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


def host_busy_seconds():
    """Return the CPU seconds all processors spent outside idle and iowait since boot."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(value) for value in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    # guest and guest_nice are already counted in user and nice.
    return (sum(values[:8]) - idle) / CLOCK_TICKS


class CpuWindow:
    """CPU seconds of named processes between start() and stop(), and of the rest of the host."""

    def __init__(self, pids):
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.before = {}
        self.after = {}
        self.host_before = 0.0
        self.host_after = 0.0

    def start(self):
        self.host_before = host_busy_seconds()
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self):
        self.after = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.host_after = host_busy_seconds()

    def seconds(self, name):
        before, after = self.before.get(name), self.after.get(name)
        if before is None or after is None:
            return None
        return after - before

    def others_seconds(self):
        """CPU seconds of every process not named here, the benchmark driver included."""
        ours = sum(self.seconds(name) or 0.0 for name in self.pids)
        return max(self.host_after - self.host_before - ours, 0.0)


def _die_with_parent():
    # Runs in the child between fork and exec: the kernel sends SIGTERM when the driver dies,
    # so a killed driver leaves no server behind.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Processes:
    """Child processes started by the driver, stopped by PID in reverse order."""

    def __init__(self, log):
        self.log = log
        self.running = []

    def start(self, name, argv, **popen_arguments):
        process = subprocess.Popen(argv, preexec_fn=_die_with_parent, **popen_arguments)
        process.bench_name = name
        self.running.append(process)
        self.log(f"started {name} (pid {process.pid})")
        return process

    def stop(self, process, timeout=30.0, sig=signal.SIGTERM):
        """Send `sig` to the process, wait up to `timeout` s, then SIGKILL. Returns the exit status."""
        if process.poll() is None:
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.log(f"{process.bench_name} (pid {process.pid}) did not stop within {timeout:.0f} s; killing it")
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        if process in self.running:
            self.running.remove(process)
        return process.returncode

    def stop_all(self):
        for process in reversed(list(self.running)):
            self.stop(process, timeout=25.0)


def free_port():
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(port, path, timeout=2.0):
    """GET http://127.0.0.1:PORT/PATH; returns (status, body bytes), or (None, b"") if unreachable."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return None, b""
    finally:
        connection.close()


def clickhouse_query(port, sql, timeout=30.0):
    """Run one statement over ClickHouse's HTTP interface and return the body as text."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/", body=sql.encode())
        response = connection.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"ClickHouse rejected '{sql[:60]}': HTTP {response.status}: {body[:200]}")
        return body
    finally:
        connection.close()


def wait_for(description, seconds, predicate, interval=0.05):
    """Call predicate until it returns a true value and return that; raise TimeoutError after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds:.0f} s waiting for {description}")
        time.sleep(interval)


def watermarks(bootstrap, topic, partitions):
    """Return {partition: (low, high)} of a topic, read from the broker."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks"})
    try:
        return {
            partition: consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            for partition in range(partitions)
        }
    finally:
        consumer.close()


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an ascending list; None when it is empty."""
    if not sorted_values:
        return None
    rank = max(math.ceil(fraction * len(sorted_values)) - 1, 0)
    return sorted_values[min(rank, len(sorted_values) - 1)]


def prometheus_values(text, name):
    """Return {labels: value} of one metric in Prometheus text format."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            labels = series[len(name):]
            values[labels] = float(value)
    return values
