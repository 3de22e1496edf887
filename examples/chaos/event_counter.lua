-- Counts every valid bar once per (tenant, instrument), for scripts/chaos-test.sh.
--
-- The writes are deliberately not idempotent: INCR and INCRBYFLOAT add again when an event is
-- applied twice, and ClickHouse gets one row per event. After a run with crashes, the counters
-- equal the number of bars sent only if every event was applied exactly once, so an excess
-- measures duplication and a deficit measures loss. Rows carry their Kafka source columns, so a
-- replayed insert replaces the first copy, and `count()` with FINAL gives the events applied.
--
-- It needs projections/lib (events.lua) beside it: the chaos test copies both into one folder.

local events = require("events")

local TABLE = "chaos_events"

-- ClickHouse 18.16 DDL. The client fills the four _source_ columns with the event's Kafka topic,
-- partition and offset and the row's index among all rows that the event produced.
local CREATE_TABLE = [[
CREATE TABLE IF NOT EXISTS chaos_events (
  _source_topic String,
  _source_partition Int32,
  _source_offset Int64,
  _source_index UInt32,
  tenant_id String,
  instrument_id String,
  start_ms Int64,
  revision UInt64,
  volume Float64
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(toDateTime(intDiv(start_ms, 1000)))
ORDER BY (_source_topic, _source_partition, _source_offset, _source_index)
]]

local function on_event(event, ctx)
  -- The same validation as the shipped projections, so malformed bars fail here too and
  -- are dead-lettered instead of counted.
  local bar = events.validate_bar(event)

  -- The tenant's hash tag keeps these keys in the slot of the tenant's other keys.
  local suffix = "{" .. bar.tenant_id .. "}:" .. bar.instrument_id
  ctx.redis("INCR", "chaos:count:" .. suffix)
  ctx.redis("INCRBYFLOAT", "chaos:volume:" .. suffix, bar.volume)
  ctx.insert(TABLE, {
    tenant_id = bar.tenant_id,
    instrument_id = bar.instrument_id,
    start_ms = bar.start_ms,
    revision = bar.revision,
    volume = bar.volume,
  })
end

local function init(ctx)
  ctx.clickhouse(CREATE_TABLE)
end

return {
  name = "event_counter",
  topics = { settings.aggregated_topic },
  init = init,
  on_event = on_event,
}
