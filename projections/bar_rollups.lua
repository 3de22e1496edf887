-- Rolls 1m bars into 5m, 15m and 1h bars aligned to UTC epoch buckets
-- (bucket_start_ms = start_ms - start_ms % length).
--
-- Each bucket keeps its minutes in keyed state, so a correction (higher revision) replaces the
-- minute's earlier values and a replay of the same revision changes nothing. Every change
-- rewrites the bucket: a row in the ClickHouse table bar_rollups and a member of a Redis sorted
-- set that serves the latest buckets. Bars of other timeframes are counted and skipped.
--
-- Each instrument has a watermark, the greatest end_ms seen. A bucket whose end is more than
-- lateness_ms behind the watermark is closed: its state is deleted, and minutes that arrive for
-- it later are counted as late and ignored. Closing follows event time, so replays close
-- buckets exactly as live traffic does.

local events = require("events")
local fields = require("fields")
local json = json

local MINUTE_MS = 60 * 1000
local HOUR_MS = 60 * MINUTE_MS
local DAY_MS = 24 * HOUR_MS

local ROLLUPS = {
  { timeframe = "5m", length_ms = 5 * MINUTE_MS },
  { timeframe = "15m", length_ms = 15 * MINUTE_MS },
  { timeframe = "1h", length_ms = HOUR_MS },
}
local TIMEFRAMES = { "5m", "15m", "1h" }

-- Two hours admits corrections published up to two hours (event time) after the bar, and keeps
-- about 40 buckets open per instrument (25 of 5m, 9 of 15m, 3 of 1h).
local LATENESS_MS = fields.integer_setting(settings, "lateness_ms", 2 * HOUR_MS, 0)

-- Number of buckets kept per (tenant, instrument, timeframe) in Redis. 288 is one day of 5m bars.
local REDIS_BUCKETS = fields.integer_setting(settings, "redis_buckets", 288, 1)

-- Wall-clock TTL of all state. It removes the state of instruments that stopped trading, whose
-- watermark no longer moves. Closing by watermark deletes the state of active instruments first.
-- NOTE: if the state of a still-open bucket expires and a late minute then arrives for it, the
-- bucket is rebuilt from that minute alone. The Redis member is overwritten, and in ClickHouse
-- the rebuilt row wins whenever its version (see add_minute) is higher than the fuller row's.
local STATE_TTL_MS = fields.integer_setting(settings, "state_ttl_ms", 7 * DAY_MS, 1)

local TABLE = "bar_rollups"

-- ClickHouse 18.16 DDL. ReplacingMergeTree keeps the row with the highest version per bucket
-- when parts merge, so readers use FINAL or argMax(..., version) to see only the latest rewrite.
local CREATE_TABLE = [[
CREATE TABLE IF NOT EXISTS bar_rollups (
  tenant_id String,
  instrument_id String,
  timeframe String,
  bucket_start_ms Int64,
  bucket_end_ms Int64,
  open Float64,
  high Float64,
  low Float64,
  close Float64,
  volume Float64,
  trade_count Nullable(UInt64),
  minutes UInt16,
  version UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(toDateTime(intDiv(bucket_start_ms, 1000)))
ORDER BY (tenant_id, instrument_id, timeframe, bucket_start_ms)
]]

-- Keyed state. Tenant ids contain no ':', and the instrument id comes last, so keys are unique.
local function instrument_state_key(bar)
  return "instrument:" .. bar.tenant_id .. ":" .. bar.instrument_id
end

local function bucket_state_key(bar, timeframe, bucket_start_ms)
  -- bucket_start_ms is an integer, so concatenation writes it as %d would.
  return "bucket:" .. bar.tenant_id .. ":" .. timeframe .. ":" .. bucket_start_ms .. ":" .. bar.instrument_id
end

-- The sorted set has no hash tag because every write touches only this one key.
local function redis_bars_key(tenant_id, instrument_id, timeframe)
  return "br:" .. tenant_id .. ":" .. timeframe .. ":" .. instrument_id
end

-- Layout of keyed state. Both keys are rewritten on almost every event, so the values are kept
-- small and cheap to decode and encode:
--   instrument record: { watermark_ms = ..., buckets = [length_ms, start_ms, ...] }, the open
--     buckets as flat pairs in the order they were opened.
--   bucket record: the bucket's summary (open, high, low, close, volume, trade_count, minutes,
--     version), last_start_ms, and rows: its minutes in start order as comma-separated JSON
--     arrays [start_ms, open, high, low, close, volume, trade_count or null, revision]. A minute
--     after last_start_ms, the usual case, updates the summary without decoding the other minutes.
-- State written by the previous layout ({ watermark_ms, open_buckets = [{ timeframe, start_ms,
-- end_ms }] } and { minutes = { ["<start_ms>"] = {...} } }) uses the same keys and is converted
-- when it is read, so buckets open across an upgrade keep their minutes.
-- NOTE: the previous code cannot read this layout, so a rollback must start from empty state.

local ROLLUP_BY_LENGTH = {}
local ROLLUP_BY_TIMEFRAME = {}
-- Label tables are passed to ctx.count, which only reads them, so one per timeframe suffices.
local TIMEFRAME_LABELS = {}
for _, rollup in ipairs(ROLLUPS) do
  ROLLUP_BY_LENGTH[rollup.length_ms] = rollup
  ROLLUP_BY_TIMEFRAME[rollup.timeframe] = rollup
  TIMEFRAME_LABELS[rollup.timeframe] = { timeframe = rollup.timeframe }
end

-- Row fields, as positions in a minute's array.
local START, OPEN, HIGH, LOW, CLOSE, VOLUME, TRADE_COUNT, REVISION = 1, 2, 3, 4, 5, 6, 7, 8

local function read_instrument(value)
  if value == nil or value.open_buckets == nil then
    return value
  end
  local buckets = {}
  for _, bucket in ipairs(value.open_buckets) do
    buckets[#buckets + 1] = ROLLUP_BY_TIMEFRAME[bucket.timeframe].length_ms
    buckets[#buckets + 1] = bucket.start_ms
  end
  return { watermark_ms = value.watermark_ms, buckets = buckets }
end

-- Raises the watermark to the bar's end_ms and deletes the state of the buckets this closes.
-- Returns whether the instrument record changed.
local function advance_watermark(ctx, bar, instrument)
  if bar.end_ms <= instrument.watermark_ms then
    return false
  end
  instrument.watermark_ms = bar.end_ms

  local close_before_ms = instrument.watermark_ms - LATENESS_MS
  local buckets = instrument.buckets
  local open_slots = 0
  for i = 1, #buckets, 2 do
    local length_ms, start_ms = buckets[i], buckets[i + 1]
    if start_ms + length_ms < close_before_ms then
      local timeframe = ROLLUP_BY_LENGTH[length_ms].timeframe
      ctx.state.delete(bucket_state_key(bar, timeframe, start_ms))
      ctx.count("closed_buckets", 1, TIMEFRAME_LABELS[timeframe])
    else
      buckets[open_slots + 1] = length_ms
      buckets[open_slots + 2] = start_ms
      open_slots = open_slots + 2
    end
  end
  for i = #buckets, open_slots + 1, -1 do
    buckets[i] = nil
  end
  return true
end

-- Adds the bucket to the instrument's open buckets unless it is there already. Returns whether
-- it was added.
local function track_open_bucket(instrument, length_ms, start_ms)
  local buckets = instrument.buckets
  for i = 1, #buckets, 2 do
    if buckets[i] == length_ms and buckets[i + 1] == start_ms then
      return false
    end
  end
  buckets[#buckets + 1] = length_ms
  buckets[#buckets + 1] = start_ms
  return true
end

local function minute_row(bar)
  local trade_count = bar.trade_count
  if trade_count == nil then
    trade_count = json.null
  end
  return { bar.start_ms, bar.open, bar.high, bar.low, bar.close, bar.volume, trade_count, bar.revision }
end

-- Adds a minute to a summary. Minutes must be added in start order, so that float sums do not
-- depend on the arrival order. trade_count sums the minutes that reported one and is json.null
-- if none did. version is the number of minutes plus the sum of their revisions. Each accepted
-- change adds a minute or raises a revision, so every rewrite of a bucket gets a higher version.
local function add_minute(summary, row)
  summary.high = math.max(summary.high, row[HIGH])
  summary.low = math.min(summary.low, row[LOW])
  summary.close = row[CLOSE]
  summary.volume = summary.volume + row[VOLUME]
  if row[TRADE_COUNT] ~= json.null then
    summary.trade_count = (summary.trade_count == json.null and 0 or summary.trade_count) + row[TRADE_COUNT]
  end
  summary.minutes = summary.minutes + 1
  summary.version = summary.version + 1 + row[REVISION]
  summary.last_start_ms = row[START]
end

-- Builds a bucket record from its minute rows, given in start order.
local function bucket_from_rows(rows)
  local first = rows[1]
  local bucket = {
    open = first[OPEN],
    high = first[HIGH],
    low = first[LOW],
    volume = 0,
    trade_count = json.null,
    minutes = 0,
    version = 0,
  }
  for _, row in ipairs(rows) do
    add_minute(bucket, row)
  end
  bucket.rows = string.sub(json.encode(json.array(rows)), 2, -2)
  return bucket
end

local function sorted_minute_keys(minutes)
  local keys = {}
  for key in pairs(minutes) do
    keys[#keys + 1] = key
  end
  table.sort(keys, function(a, b)
    return tonumber(a) < tonumber(b)
  end)
  return keys
end

-- Returns the bucket record stored as `value`, converting the previous layout.
local function read_bucket(value)
  if value == nil or type(value.minutes) ~= "table" then
    return value
  end
  local rows = {}
  for _, key in ipairs(sorted_minute_keys(value.minutes)) do
    local minute = value.minutes[key]
    local trade_count = minute.trade_count
    if trade_count == nil then
      trade_count = json.null
    end
    rows[#rows + 1] = { math.tointeger(tonumber(key)), minute.open, minute.high, minute.low,
                        minute.close, minute.volume, trade_count, minute.revision }
  end
  return bucket_from_rows(rows)
end

-- Returns the revision of the bucket's minute that starts at start_ms, or nil if it has none.
-- Rows contain only numbers and null, so '[' appears only where a row begins.
local function stored_revision(bucket, start_ms)
  local rows = bucket.rows
  local first = string.find(rows, "[" .. start_ms .. ",", 1, true)
  if first == nil then
    return nil
  end
  local last = string.find(rows, "]", first, true)
  return json.decode(string.sub(rows, first, last))[REVISION]
end

-- Rebuilds the bucket with `row` inserted in start order, or replacing the minute with its start.
local function merge_row(bucket, row)
  local rows = {}
  local placed = false
  for _, stored in ipairs(json.decode("[" .. bucket.rows .. "]")) do
    if not placed and row[START] <= stored[START] then
      rows[#rows + 1] = row
      placed = true
    end
    if stored[START] ~= row[START] then
      rows[#rows + 1] = stored
    end
  end
  if not placed then
    rows[#rows + 1] = row
  end
  return bucket_from_rows(rows)
end

local function write_bucket(ctx, bar, rollup, bucket_start_ms, summary)
  local bucket_end_ms = bucket_start_ms + rollup.length_ms
  ctx.insert(TABLE, {
    tenant_id = bar.tenant_id,
    instrument_id = bar.instrument_id,
    timeframe = rollup.timeframe,
    bucket_start_ms = bucket_start_ms,
    bucket_end_ms = bucket_end_ms,
    open = summary.open,
    high = summary.high,
    low = summary.low,
    close = summary.close,
    volume = summary.volume,
    trade_count = summary.trade_count,
    minutes = summary.minutes,
    version = summary.version,
  })

  local member = json.encode({
    bucket_start_ms = bucket_start_ms,
    bucket_end_ms = bucket_end_ms,
    open = summary.open,
    high = summary.high,
    low = summary.low,
    close = summary.close,
    volume = summary.volume,
    trade_count = summary.trade_count,
    minutes = summary.minutes,
  }, { sort_keys = true })
  -- Sorted keys make the member the same bytes for the same bucket in every run.
  -- The score identifies the bucket, so removing by score drops the member of the previous
  -- rewrite. The runtime applies the three commands in one MULTI/EXEC.
  local key = redis_bars_key(bar.tenant_id, bar.instrument_id, rollup.timeframe)
  ctx.redis("ZREMRANGEBYSCORE", key, bucket_start_ms, bucket_start_ms)
  ctx.redis("ZADD", key, bucket_start_ms, member)
  ctx.redis("ZREMRANGEBYRANK", key, 0, -(REDIS_BUCKETS + 1))
end

local function log_late_minute(ctx, bar, rollup, bucket_start_ms, watermark_ms)
  ctx.count("late_minutes", 1, TIMEFRAME_LABELS[rollup.timeframe])
  ctx.log("debug", "late minute ignored", {
    tenant_id = bar.tenant_id,
    instrument_id = bar.instrument_id,
    timeframe = rollup.timeframe,
    bucket_start_ms = bucket_start_ms,
    start_ms = bar.start_ms,
    revision = bar.revision,
    watermark_ms = watermark_ms,
  })
end

-- Adds the minute (`row`, from minute_row) to its bucket of one rollup timeframe and rewrites the
-- bucket if the minute changed it. Returns whether the instrument's open buckets changed.
local function apply_minute(ctx, bar, row, rollup, instrument)
  local bucket_start_ms = bar.start_ms - bar.start_ms % rollup.length_ms
  local bucket_end_ms = bucket_start_ms + rollup.length_ms
  if bucket_end_ms < instrument.watermark_ms - LATENESS_MS then
    log_late_minute(ctx, bar, rollup, bucket_start_ms, instrument.watermark_ms)
    return false
  end

  local key = bucket_state_key(bar, rollup.timeframe, bucket_start_ms)
  local bucket = read_bucket(ctx.state.get(key))
  if bucket == nil then
    bucket = bucket_from_rows({ row })
  elseif bar.start_ms > bucket.last_start_ms then
    add_minute(bucket, row)
    bucket.rows = bucket.rows .. "," .. json.encode(json.array(row))
  else
    local previous_revision = stored_revision(bucket, bar.start_ms)
    if previous_revision and bar.revision <= previous_revision then
      ctx.count("unchanged_minutes", 1, TIMEFRAME_LABELS[rollup.timeframe])
      return false
    end
    bucket = merge_row(bucket, row)
  end

  ctx.state.put(key, bucket, STATE_TTL_MS)
  write_bucket(ctx, bar, rollup, bucket_start_ms, bucket)
  return track_open_bucket(instrument, rollup.length_ms, bucket_start_ms)
end

local function on_event(event, ctx)
  local bar = events.validate_bar(event)
  if bar.timeframe ~= "1m" then
    ctx.count("skipped_bars")
    return
  end

  local instrument_key = instrument_state_key(bar)
  local instrument = read_instrument(ctx.state.get(instrument_key))
  local changed = false
  if instrument == nil then
    instrument = { watermark_ms = bar.end_ms, buckets = {} }
    changed = true
  end

  if advance_watermark(ctx, bar, instrument) then
    changed = true
  end
  local row = minute_row(bar)
  for _, rollup in ipairs(ROLLUPS) do
    if apply_minute(ctx, bar, row, rollup, instrument) then
      changed = true
    end
  end

  if changed then
    instrument.buckets = json.array(instrument.buckets)
    ctx.state.put(instrument_key, instrument, STATE_TTL_MS)
  end
end

-- GET /projections/bar_rollups/bars?tenant_id=..&instrument_id=..&timeframe=5m[&limit=N]
-- Returns the latest buckets, newest first, and an empty list when none are stored.
local function query_bars(params, ctx)
  local tenant_id, tenant_problem = fields.tenant_id(params.tenant_id)
  if not tenant_id then
    return nil, "query parameter 'tenant_id' " .. tenant_problem
  end
  local instrument_id, instrument_problem = fields.instrument_id(params.instrument_id)
  if not instrument_id then
    return nil, "query parameter 'instrument_id' " .. instrument_problem
  end
  local timeframe, timeframe_problem = fields.one_of(params.timeframe, TIMEFRAMES)
  if not timeframe then
    return nil, "query parameter 'timeframe' " .. timeframe_problem
  end
  local limit = REDIS_BUCKETS
  if params.limit ~= nil then
    local limit_problem
    limit, limit_problem = fields.integer_text(params.limit, 1, REDIS_BUCKETS)
    if not limit then
      return nil, "query parameter 'limit' " .. limit_problem
    end
  end

  local members = ctx.redis("ZREVRANGE", redis_bars_key(tenant_id, instrument_id, timeframe), 0, limit - 1)
  local bars = {}
  for i, member in ipairs(members or {}) do
    bars[i] = json.decode(member)
  end
  return {
    tenant_id = tenant_id,
    instrument_id = instrument_id,
    timeframe = timeframe,
    bars = json.array(bars),
  }
end

local function init(ctx)
  ctx.clickhouse(CREATE_TABLE)
end

return {
  name = "bar_rollups",
  topics = { settings.aggregated_topic },
  init = init,
  on_event = on_event,
  queries = { bars = query_bars },
}
