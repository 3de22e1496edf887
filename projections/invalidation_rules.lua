-- Applies invalidations to the prices served by latest_price.
--
-- Scope "instrument" covers one instrument and scope "tenant" covers every instrument of the
-- tenant. Each invalidation raises a watermark to issued_ms and deletes the served prices with
-- as_of_ms <= issued_ms. The latest_price query then returns 404 until a bar with
-- end_ms > issued_ms arrives, because set_price rejects bars at or below the watermark. Prices
-- newer than issued_ms stay, since they come from bars that ended after the invalidation.

local events = require("events")
local price_store = require("price_store")

local function on_event(event, ctx)
  local invalidation = events.validate_invalidation(event)

  if invalidation.scope == "instrument" then
    local keys, args = price_store.invalidate_instrument_call(
      invalidation.tenant_id, invalidation.instrument_id, invalidation.issued_ms)
    ctx.redis_script("invalidate_instrument", keys, args)
  else
    local keys, args = price_store.invalidate_tenant_call(invalidation.tenant_id, invalidation.issued_ms)
    ctx.redis_script("invalidate_tenant", keys, args)
  end

  ctx.count("invalidations", 1, { scope = invalidation.scope })
  ctx.log("info", "invalidation queued", {
    tenant_id = invalidation.tenant_id,
    scope = invalidation.scope,
    instrument_id = invalidation.instrument_id,
    issued_ms = invalidation.issued_ms,
    reason = invalidation.reason,
  })
end

return {
  name = "invalidation_rules",
  topics = { settings.invalidation_topic },
  on_event = on_event,
  scripts = {
    invalidate_instrument = price_store.scripts.invalidate_instrument,
    invalidate_tenant = price_store.scripts.invalidate_tenant,
  },
}
