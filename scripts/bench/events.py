"""Generate 1m bar events for the benchmark, in the schema of docs/events.md.

Each (tenant, instrument) gets one bar per round, and round r covers minute r after
BASE_START_MS, so every bar of an instrument is newer than the one before and each event makes
latest_price write. Keys are "tenant:instrument", so Kafka's key partitioning keeps the bars of
an instrument in order on one partition.

Command line: write a kcat input file (KEY|JSON per line) for `kcat -P -K '|' -l FILE`:

    python3 events.py --instruments 100000 --rounds 5 --out bars.kcat
"""

import argparse
import sys

MINUTE_MS = 60_000
# 2024-03-04 10:18 UTC, a whole minute, the first bar of examples/events/bars.jsonl.
BASE_START_MS = 1_709_546_280_000
TENANTS = 4


def tenant_of(instrument_index):
    return f"t{instrument_index % TENANTS}"


def instrument_of(instrument_index):
    return f"INS-{instrument_index:06d}"


def bar_json(tenant_id, instrument_id, start_ms, price_base, step, revision=None):
    """Format one 1m bar. open, close and vwap lie between low and high, as validation requires."""
    low = price_base - 0.5
    high = price_base + 0.5
    close = price_base + ((step * 7) % 10 - 5) / 20
    volume = 1 + (step % 50) * 0.125
    text = (
        f'{{"tenant_id":"{tenant_id}","instrument_id":"{instrument_id}","timeframe":"1m",'
        f'"start_ms":{start_ms},"end_ms":{start_ms + MINUTE_MS},'
        f'"open":{price_base},"high":{high},"low":{low},"close":{close},'
        f'"volume":{volume},"trade_count":{10 + step % 90},"vwap":{price_base}'
    )
    if revision is not None:
        text += f',"revision":{revision}'
    return text + "}"


def round_bar(instrument_index, round_number):
    """Return (key, payload) of an instrument's bar in a round."""
    tenant_id = tenant_of(instrument_index)
    instrument_id = instrument_of(instrument_index)
    start_ms = BASE_START_MS + round_number * MINUTE_MS
    price_base = 100.0 + instrument_index % 1000
    payload = bar_json(tenant_id, instrument_id, start_ms, price_base, instrument_index + round_number)
    return f"{tenant_id}:{instrument_id}", payload


def write_kcat_file(path, instruments, rounds):
    """Write instruments * rounds lines, round by round. Returns the number of lines."""
    count = 0
    with open(path, "w", encoding="ascii") as out:
        for round_number in range(rounds):
            lines = []
            for instrument_index in range(instruments):
                key, payload = round_bar(instrument_index, round_number)
                lines.append(f"{key}|{payload}\n")
            out.write("".join(lines))
            count += len(lines)
    return count


def main():
    parser = argparse.ArgumentParser(description="Write bar events as kcat input (KEY|JSON lines).")
    parser.add_argument("--instruments", type=int, required=True, help="distinct (tenant, instrument) pairs")
    parser.add_argument("--rounds", type=int, required=True, help="bars per instrument")
    parser.add_argument("--out", required=True, help="output file")
    arguments = parser.parse_args()
    count = write_kcat_file(arguments.out, arguments.instruments, arguments.rounds)
    print(f"wrote {count} events to {arguments.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
