-- Keeps the last closes of each (tenant, instrument, timeframe) and serves them, newest first.
--
-- Keyed state contains the kept closes, so the handler never reads Redis. Every change rewrites
-- one Redis string with the whole list as JSON, which the query reads back. A bar with the
-- end_ms of a kept close replaces it (a correction or a replay). A bar older than every kept
-- close, when the list is full, changes nothing.

-- How many closes to keep: settings.last_closes_count, or 3 when the setting is absent.
local KEEP = settings.last_closes_count or 3
if math.type(KEEP) ~= "integer" or KEEP < 1 then
  error("settings.last_closes_count must be a positive integer, got " .. tostring(KEEP), 0)
end

-- Drops the state of instruments that stop trading.
local STATE_TTL_MS = 7 * 24 * 60 * 60 * 1000

local TYPE_NAMES = { string = "a string", integer = "an integer", number = "a number" }

-- Returns event[name] when it has the expected type ("string", "integer" or "number"), and
-- raises an error naming the field otherwise.
local function field(event, name, expected)
  local value = event[name]
  if type(value) ~= expected and math.type(value) ~= expected then
    local got = value == json.null and "null" or type(value)
    error(string.format("invalid bar: field '%s' must be %s, got %s", name, TYPE_NAMES[expected], got), 0)
  end
  return value
end

local function series_id(tenant_id, instrument_id, timeframe)
  return tenant_id .. ":" .. instrument_id .. ":" .. timeframe
end

-- The Redis key of one series. The {tenant_id} hash tag keeps a tenant's keys in one
-- Redis Cluster slot.
-- NOTE: tenant ids are assumed to contain no ':', '{' or '}' (docs/events.md). This file does
-- not check it, but fields.tenant_id in projections/lib does.
local function redis_key(tenant_id, instrument_id, timeframe)
  return "lc:{" .. tenant_id .. "}:" .. instrument_id .. ":" .. timeframe
end

-- Inserts the close into `closes` (newest first) and trims the list to KEEP entries.
-- Returns false when the close is too old to be kept.
local function insert_close(closes, end_ms, close)
  local position = #closes + 1
  for i, kept in ipairs(closes) do
    if kept.end_ms == end_ms then
      kept.close = close
      return true
    end
    if kept.end_ms < end_ms then
      position = i
      break
    end
  end
  if position > KEEP then
    return false
  end
  table.insert(closes, position, { end_ms = end_ms, close = close })
  closes[KEEP + 1] = nil
  return true
end

local function on_event(event, ctx)
  local tenant_id = field(event, "tenant_id", "string")
  local instrument_id = field(event, "instrument_id", "string")
  local timeframe = field(event, "timeframe", "string")
  local end_ms = field(event, "end_ms", "integer")
  local close = field(event, "close", "number")

  local key = series_id(tenant_id, instrument_id, timeframe)
  local closes = ctx.state.get(key) or json.array()
  if not insert_close(closes, end_ms, close) then
    ctx.count("old_bars", 1, { timeframe = timeframe })
    return
  end

  ctx.state.put(key, closes, STATE_TTL_MS)
  ctx.redis("SET", redis_key(tenant_id, instrument_id, timeframe), json.encode(closes, { sort_keys = true }))
end

-- The default query. Parameters: tenant_id, instrument_id, timeframe.
local function query_closes(params, ctx)
  for _, name in ipairs({ "tenant_id", "instrument_id", "timeframe" }) do
    if params[name] == nil or params[name] == "" then
      return nil, "query parameter '" .. name .. "' is missing"
    end
  end
  local stored = ctx.redis("GET", redis_key(params.tenant_id, params.instrument_id, params.timeframe))
  if stored == nil then
    return nil
  end
  return {
    tenant_id = params.tenant_id,
    instrument_id = params.instrument_id,
    timeframe = params.timeframe,
    closes = json.decode(stored),
  }
end

return {
  name = "last_closes",
  topics = { settings.aggregated_topic },
  on_event = on_event,
  queries = { default = query_closes },
}
