-- Validation of the events on the bar and invalidation topics (schemas in docs/events.md).
--
-- A malformed event raises an error that names the event kind and the field, so that the host
-- can count and dead-letter it. Nothing is skipped silently.

local error = error
local fields = require("fields")
local string = string
local type = type

local events = {}

local function raise_invalid(kind, name, problem)
  error(string.format("invalid %s event: field '%s' %s", kind, name, problem), 0)
end

local function required(kind, event, name, check, ...)
  local value, problem = check(event[name], ...)
  if problem then
    raise_invalid(kind, name, problem)
  end
  return value
end

local function optional(kind, event, name, default, check, ...)
  if fields.is_absent(event[name]) then
    return default
  end
  return required(kind, event, name, check, ...)
end

local function require_object(kind, event)
  if type(event) ~= "table" then
    error(string.format("invalid %s event: expected a JSON object, got %s", kind, type(event)), 0)
  end
end

local function check_price_range(bar)
  if bar.high < bar.low then
    raise_invalid("bar", "high", string.format("must be at least low (%s), got %s", bar.low, bar.high))
  end
  if bar.open < bar.low or bar.open > bar.high then
    raise_invalid("bar", "open", string.format("must lie between low and high, got %s", bar.open))
  end
  if bar.close < bar.low or bar.close > bar.high then
    raise_invalid("bar", "close", string.format("must lie between low and high, got %s", bar.close))
  end
end

local MINUTE_MS = 60 * 1000

-- Rollups add whole minutes to UTC buckets, so a 1m bar must cover exactly one whole minute.
local function check_minute_span(bar)
  if bar.start_ms % MINUTE_MS ~= 0 then
    raise_invalid("bar", "start_ms", string.format("must be a multiple of %d for timeframe 1m, got %d", MINUTE_MS, bar.start_ms))
  end
  if bar.end_ms ~= bar.start_ms + MINUTE_MS then
    raise_invalid("bar", "end_ms", string.format("must be start_ms + %d for timeframe 1m, got %d", MINUTE_MS, bar.end_ms))
  end
end

-- Validates a bar from the aggregated topic and returns a new table with its fields.
-- Absent optional fields come back as nil (trade_count, vwap) or 0 (revision).
function events.validate_bar(event)
  require_object("bar", event)

  local bar = {}
  bar.tenant_id = required("bar", event, "tenant_id", fields.tenant_id)
  bar.instrument_id = required("bar", event, "instrument_id", fields.instrument_id)
  bar.timeframe = required("bar", event, "timeframe", fields.non_empty_string)
  bar.start_ms = required("bar", event, "start_ms", fields.integer, 0)
  bar.end_ms = required("bar", event, "end_ms", fields.integer, 0)
  bar.open = required("bar", event, "open", fields.number)
  bar.high = required("bar", event, "high", fields.number)
  bar.low = required("bar", event, "low", fields.number)
  bar.close = required("bar", event, "close", fields.number)
  bar.volume = required("bar", event, "volume", fields.number, 0)
  bar.trade_count = optional("bar", event, "trade_count", nil, fields.integer, 0)
  bar.vwap = optional("bar", event, "vwap", nil, fields.number)
  bar.revision = optional("bar", event, "revision", 0, fields.integer, 0)

  if bar.end_ms <= bar.start_ms then
    raise_invalid("bar", "end_ms", string.format("must be greater than start_ms (%d), got %d", bar.start_ms, bar.end_ms))
  end
  if bar.timeframe == "1m" then
    check_minute_span(bar)
  end
  check_price_range(bar)
  return bar
end

-- Validates an invalidation and returns a new table with its fields. instrument_id is nil for
-- scope "tenant", and ignored there if the event carries one.
function events.validate_invalidation(event)
  require_object("invalidation", event)

  local invalidation = {}
  invalidation.tenant_id = required("invalidation", event, "tenant_id", fields.tenant_id)
  invalidation.scope = required("invalidation", event, "scope", fields.one_of, { "instrument", "tenant" })
  if invalidation.scope == "instrument" then
    invalidation.instrument_id = required("invalidation", event, "instrument_id", fields.instrument_id)
  end
  invalidation.reason = required("invalidation", event, "reason", fields.string)
  invalidation.issued_ms = required("invalidation", event, "issued_ms", fields.integer, 0)
  return invalidation
end

return events
