-- Validation of the events on the bar and invalidation topics (schemas in docs/events.md).
--
-- A malformed event raises an error that names the event kind and the field, so that the host
-- can count and dead-letter it. Nothing is skipped silently.

local error = error
local fields = require("fields")
local json = json
local math = math
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

-- Fast paths for validate_bar. Each accepts exactly the values its fields check accepts and
-- hands anything else to that check, which raises with the usual message. They exist because
-- every bar passes through them and the generic path costs several calls per field.
local MAX_INTEGER = fields.MAX_INTEGER
local HUGE = math.huge
local math_type = math.type
local find = string.find

local function bar_integer(event, name, minimum)
  local value = event[name]
  if math_type(value) == "integer" and value >= minimum and value <= MAX_INTEGER then
    return value
  end
  return required("bar", event, name, fields.integer, minimum)
end

local function bar_number(event, name, minimum)
  local value = event[name]
  if type(value) == "number" and value == value and value ~= HUGE and value ~= -HUGE
      and (minimum == nil or value >= minimum) then
    return value
  end
  return required("bar", event, name, fields.number, minimum)
end

local function bar_non_empty_string(event, name, check)
  local value = event[name]
  if type(value) == "string" and value ~= "" then
    return value
  end
  return required("bar", event, name, check)
end

local function optional_bar_integer(event, name, default, minimum)
  local value = event[name]
  if value == nil or value == json.null then
    return default
  end
  return bar_integer(event, name, minimum)
end

local function optional_bar_number(event, name)
  local value = event[name]
  if value == nil or value == json.null then
    return nil
  end
  return bar_number(event, name, nil)
end

-- Validates a bar from the aggregated topic and returns a new table with its fields.
-- Absent optional fields come back as nil (trade_count, vwap) or 0 (revision).
function events.validate_bar(event)
  require_object("bar", event)

  local bar = {}
  local tenant_id = event.tenant_id
  if type(tenant_id) == "string" and tenant_id ~= "" and not find(tenant_id, "[:{}]") then
    bar.tenant_id = tenant_id
  else
    bar.tenant_id = required("bar", event, "tenant_id", fields.tenant_id)
  end
  bar.instrument_id = bar_non_empty_string(event, "instrument_id", fields.instrument_id)
  bar.timeframe = bar_non_empty_string(event, "timeframe", fields.non_empty_string)
  bar.start_ms = bar_integer(event, "start_ms", 0)
  bar.end_ms = bar_integer(event, "end_ms", 0)
  bar.open = bar_number(event, "open", nil)
  bar.high = bar_number(event, "high", nil)
  bar.low = bar_number(event, "low", nil)
  bar.close = bar_number(event, "close", nil)
  bar.volume = bar_number(event, "volume", 0)
  bar.trade_count = optional_bar_integer(event, "trade_count", nil, 0)
  bar.vwap = optional_bar_number(event, "vwap")
  bar.revision = optional_bar_integer(event, "revision", 0, 0)

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
