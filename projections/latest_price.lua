-- Serves the close of the latest bar of each (tenant, instrument).
--
-- The latest bar is the one with the greatest end_ms, and at equal end_ms the higher revision.
-- Older bars, replays and equal revisions change nothing, so out-of-order delivery is harmless.
-- Keyed state stores the best (end_ms, revision) sent to Redis, so bars that cannot win are
-- dropped without a Redis read. The set_price script re-checks the order and the invalidation
-- watermarks in Redis, so a lost or outdated state only costs a redundant script call.

local events = require("events")
local fields = require("fields")
local price_store = require("price_store")

local DAY_MS = 24 * 60 * 60 * 1000

-- Wall-clock TTL of the per-instrument state, which drops instruments that stopped trading.
-- Losing the state is safe (see above).
local STATE_TTL_MS = fields.integer_setting(settings, "state_ttl_ms", 7 * DAY_MS, 1)

local function state_key(bar)
  return bar.tenant_id .. ":" .. bar.instrument_id
end

local function can_win(best, bar)
  if best == nil then
    return true
  end
  if bar.end_ms ~= best.end_ms then
    return bar.end_ms > best.end_ms
  end
  return bar.revision > best.revision
end

local function on_event(event, ctx)
  local bar = events.validate_bar(event)
  local key = state_key(bar)
  if not can_win(ctx.state.get(key), bar) then
    ctx.count("superseded_bars")
    return
  end

  ctx.state.put(key, { end_ms = bar.end_ms, revision = bar.revision }, STATE_TTL_MS)
  local keys, args = price_store.set_price_call(bar)
  ctx.redis_script("set_price", keys, args)
end

-- GET /projections/latest_price?tenant_id=..&instrument_id=..
local function query_price(params, ctx)
  local tenant_id, tenant_problem = fields.tenant_id(params.tenant_id)
  if not tenant_id then
    return nil, "query parameter 'tenant_id' " .. tenant_problem
  end
  local instrument_id, instrument_problem = fields.instrument_id(params.instrument_id)
  if not instrument_id then
    return nil, "query parameter 'instrument_id' " .. instrument_problem
  end

  local record, err = price_store.read_price(ctx.redis, tenant_id, instrument_id)
  if err then
    error(err, 0)
  end
  if not record then
    return nil
  end
  return {
    tenant_id = tenant_id,
    instrument_id = instrument_id,
    price = record.price,
    as_of_ms = record.as_of_ms,
    timeframe = record.timeframe,
    volume = record.volume,
  }
end

return {
  name = "latest_price",
  topics = { settings.aggregated_topic },
  on_event = on_event,
  queries = { default = query_price },
  scripts = { set_price = price_store.scripts.set_price },
}
