-- The Redis layout of served latest prices: key names, the scripts that write and delete
-- prices, and the read used by the latest_price query. latest_price and invalidation_rules
-- both go through this module, so their keys and rules cannot drift apart.
--
-- For tenant "acme" and instrument "BTC-USD" the keys are:
--   lp:{acme}:price:BTC-USD               hash: price, volume, timeframe, as_of_ms, revision
--   lp:{acme}:served                      set of the tenant's instrument ids that have a price hash
--   lp:{acme}:invalidated_until           max issued_ms of the tenant-scope invalidations
--   lp:{acme}:invalidated_until:BTC-USD   max issued_ms of the instrument-scope invalidations
-- The {tenant_id} hash tag puts all of a tenant's keys in one Redis Cluster slot, so each script
-- runs on one node. Tenant ids contain no ':', '{' or '}' (fields.tenant_id checks this), and the
-- instrument id always comes last, so no two (tenant, instrument) pairs share a key.
--
-- A price is served only while its as_of_ms (the bar's end_ms) is greater than both
-- invalidation watermarks. Invalidations delete only prices with as_of_ms <= issued_ms, because
-- a price from a bar that ended after the invalidation was issued is still valid.

local error = error
local math = math
local string = string
local tonumber = tonumber
local type = type

local price_store = {}

local PREFIX = "lp:"

-- Raises for ids that did not go through fields.tenant_id and fields.instrument_id, since they
-- could name another tenant's keys. Level 3 blames the caller of the public function.
local function check_ids(tenant_id, instrument_id)
  if type(tenant_id) ~= "string" or tenant_id == "" or tenant_id:find("[:{}]") then
    error("price_store: tenant_id must be a validated tenant id", 3)
  end
  if instrument_id ~= nil and (type(instrument_id) ~= "string" or instrument_id == "") then
    error("price_store: instrument_id must be a validated instrument id", 3)
  end
end

local function tenant_prefix(tenant_id)
  return PREFIX .. "{" .. tenant_id .. "}:"
end

local function price_key_prefix(tenant_id)
  return tenant_prefix(tenant_id) .. "price:"
end

local function price_key(tenant_id, instrument_id)
  return price_key_prefix(tenant_id) .. instrument_id
end

local function served_key(tenant_id)
  return tenant_prefix(tenant_id) .. "served"
end

local function tenant_watermark_key(tenant_id)
  return tenant_prefix(tenant_id) .. "invalidated_until"
end

local function instrument_watermark_key(tenant_id, instrument_id)
  return tenant_prefix(tenant_id) .. "invalidated_until:" .. instrument_id
end

-- Formats a number so that tonumber() gives back the same value and subtype. Lua's tostring
-- keeps only 14 significant digits, which would change stored prices.
local function number_text(value)
  if math.type(value) == "integer" then
    return string.format("%d", value)
  end
  local text = string.format("%.15g", value)
  if tonumber(text) ~= value then
    text = string.format("%.16g", value)
    if tonumber(text) ~= value then
      text = string.format("%.17g", value)
    end
  end
  if not text:find("[.eEn]") then
    text = text .. ".0"
  end
  return text
end

price_store.number_text = number_text

-- Redis scripts (Redis 7.0 Lua 5.1). Numbers arrive as text and are compared as doubles, which
-- is exact because bar validation caps end_ms, revision and issued_ms at 2^53.
price_store.scripts = {}

-- KEYS: price hash, served set, tenant watermark, instrument watermark.
-- ARGV: instrument_id, end_ms, revision, price, volume, timeframe.
-- Writes the price unless the hash already contains a later bar (greater end_ms, or equal end_ms
-- and equal or higher revision) or an invalidation covers end_ms. Returns "written", "stale"
-- or "invalidated". The served set gets the instrument only with a new hash: every script that
-- deletes a price hash also removes its instrument from the set, so an existing hash is
-- already a member. That saves one call per update in Redis, where this script runs per bar,
-- but a served set deleted by hand is not rebuilt by later updates of existing prices.
price_store.scripts.set_price = [[
local end_ms = tonumber(ARGV[2])
local revision = tonumber(ARGV[3])

local watermarks = redis.call('MGET', KEYS[3], KEYS[4])
local tenant_until = tonumber(watermarks[1] or '-1')
local instrument_until = tonumber(watermarks[2] or '-1')
if end_ms <= tenant_until or end_ms <= instrument_until then
  return 'invalidated'
end

local current = redis.call('HMGET', KEYS[1], 'as_of_ms', 'revision')
if current[1] then
  local current_end_ms = tonumber(current[1])
  local current_revision = tonumber(current[2]) or 0
  if current_end_ms > end_ms or (current_end_ms == end_ms and current_revision >= revision) then
    return 'stale'
  end
end

redis.call('HSET', KEYS[1], 'price', ARGV[4], 'volume', ARGV[5], 'timeframe', ARGV[6],
  'as_of_ms', ARGV[2], 'revision', ARGV[3])
if not current[1] then
  redis.call('SADD', KEYS[2], ARGV[1])
end
return 'written'
]]

-- KEYS: price hash, served set, instrument watermark. ARGV: instrument_id, issued_ms.
-- Raises the instrument watermark to issued_ms and deletes the price if as_of_ms <= issued_ms.
-- Returns the number of prices deleted (0 or 1).
price_store.scripts.invalidate_instrument = [[
local issued_ms = tonumber(ARGV[2])
if issued_ms > tonumber(redis.call('GET', KEYS[3]) or '-1') then
  redis.call('SET', KEYS[3], ARGV[2])
end

local as_of_ms = redis.call('HGET', KEYS[1], 'as_of_ms')
if not as_of_ms then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 0
end
if tonumber(as_of_ms) <= issued_ms then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  return 1
end
return 0
]]

-- KEYS: served set, tenant watermark. ARGV: issued_ms, price key prefix of the tenant.
-- Raises the tenant watermark to issued_ms and deletes every price of the tenant with
-- as_of_ms <= issued_ms, visiting only the instruments in the served set. Returns the number
-- of prices deleted.
-- The price keys are built from the set members instead of being passed in KEYS, because the
-- caller cannot know them. They carry the tenant's hash tag, so they live in the slot of KEYS[1]
-- and Redis Cluster accepts them.
price_store.scripts.invalidate_tenant = [[
local issued_ms = tonumber(ARGV[1])
if issued_ms > tonumber(redis.call('GET', KEYS[2]) or '-1') then
  redis.call('SET', KEYS[2], ARGV[1])
end

local deleted = 0
for _, instrument_id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. instrument_id
  local as_of_ms = redis.call('HGET', key, 'as_of_ms')
  if not as_of_ms then
    redis.call('SREM', KEYS[1], instrument_id)
  elseif tonumber(as_of_ms) <= issued_ms then
    redis.call('DEL', key)
    redis.call('SREM', KEYS[1], instrument_id)
    deleted = deleted + 1
  end
end
return deleted
]]

-- Returns the keys and arguments of set_price for a validated bar.
function price_store.set_price_call(bar)
  check_ids(bar.tenant_id, bar.instrument_id)
  local keys = {
    price_key(bar.tenant_id, bar.instrument_id),
    served_key(bar.tenant_id),
    tenant_watermark_key(bar.tenant_id),
    instrument_watermark_key(bar.tenant_id, bar.instrument_id),
  }
  local args = {
    bar.instrument_id,
    bar.end_ms,
    bar.revision,
    number_text(bar.close),
    number_text(bar.volume),
    bar.timeframe,
  }
  return keys, args
end

-- Returns the keys and arguments of invalidate_instrument.
function price_store.invalidate_instrument_call(tenant_id, instrument_id, issued_ms)
  check_ids(tenant_id, instrument_id)
  local keys = {
    price_key(tenant_id, instrument_id),
    served_key(tenant_id),
    instrument_watermark_key(tenant_id, instrument_id),
  }
  return keys, { instrument_id, issued_ms }
end

-- Returns the keys and arguments of invalidate_tenant.
function price_store.invalidate_tenant_call(tenant_id, issued_ms)
  check_ids(tenant_id)
  local keys = { served_key(tenant_id), tenant_watermark_key(tenant_id) }
  return keys, { issued_ms, price_key_prefix(tenant_id) }
end

-- A missing value in a host Redis reply may be nil or json.null, and tonumber turns both into nil.
local function watermark_value(reply)
  return tonumber(reply) or -1
end

local function hash_from_flat(reply)
  local hash = {}
  for i = 1, #reply - 1, 2 do
    hash[reply[i]] = reply[i + 1]
  end
  return hash
end

-- Reads the served price of an instrument with `redis` (a query ctx.redis). Returns a table
-- with price, volume, timeframe, as_of_ms and revision, or nil when no price is served, which
-- includes a price that an invalidation watermark covers. Returns nil and a message when a
-- field of the stored hash is missing or not a number.
function price_store.read_price(redis, tenant_id, instrument_id)
  check_ids(tenant_id, instrument_id)
  local key = price_key(tenant_id, instrument_id)
  local reply = redis("HGETALL", key)
  if type(reply) ~= "table" or #reply == 0 then
    return nil
  end

  local hash = hash_from_flat(reply)
  local record = {
    price = tonumber(hash.price),
    volume = tonumber(hash.volume),
    timeframe = hash.timeframe,
    as_of_ms = math.tointeger(tonumber(hash.as_of_ms)),
    revision = math.tointeger(tonumber(hash.revision)),
  }
  if not (record.price and record.volume and record.timeframe and record.as_of_ms and record.revision) then
    return nil, "invalid latest price hash at Redis key " .. key .. ": a field is missing or not a number"
  end

  local watermarks = redis("MGET", tenant_watermark_key(tenant_id), instrument_watermark_key(tenant_id, instrument_id))
  if record.as_of_ms <= watermark_value(watermarks[1]) or record.as_of_ms <= watermark_value(watermarks[2]) then
    return nil
  end
  return record
end

return price_store
