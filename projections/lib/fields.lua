-- Checks for event fields, query parameters and settings.
--
-- Each check returns the value, or nil and a problem phrase that completes a sentence such as
-- "field 'close' ..." ("is missing", "must be a number, got string \"12\"").

local error = error
local ipairs = ipairs
local json = json
local math = math
local string = string
local table = table
local tonumber = tonumber
local tostring = tostring
local type = type

local fields = {}

-- Redis scripts compare end_ms and revision as doubles, which are exact only up to 2^53.
fields.MAX_INTEGER = 1 << 53

local function describe(value)
  if value == json.null then
    return "null"
  end
  if type(value) == "string" then
    return string.format("string %q", value:sub(1, 60))
  end
  if type(value) == "number" then
    return string.format("%s %s", math.type(value), tostring(value))
  end
  return type(value)
end

local function is_absent(value)
  return value == nil or value == json.null
end

fields.is_absent = is_absent

-- Checks for an integer in [minimum, 2^53].
function fields.integer(value, minimum)
  if is_absent(value) then
    return nil, "is missing"
  end
  if math.type(value) ~= "integer" then
    return nil, "must be an integer, got " .. describe(value)
  end
  if value < minimum or value > fields.MAX_INTEGER then
    return nil, string.format("must be between %d and %d, got %d", minimum, fields.MAX_INTEGER, value)
  end
  return value
end

-- Checks for a finite number (integer or float), at least `minimum` when one is given.
function fields.number(value, minimum)
  if is_absent(value) then
    return nil, "is missing"
  end
  if type(value) ~= "number" then
    return nil, "must be a number, got " .. describe(value)
  end
  if value ~= value or value == math.huge or value == -math.huge then
    return nil, "must be a finite number, got " .. tostring(value)
  end
  if minimum and value < minimum then
    return nil, string.format("must be at least %s, got %s", tostring(minimum), tostring(value))
  end
  return value
end

function fields.string(value)
  if is_absent(value) then
    return nil, "is missing"
  end
  if type(value) ~= "string" then
    return nil, "must be a string, got " .. describe(value)
  end
  return value
end

local function non_empty_string(value)
  local text, problem = fields.string(value)
  if not text then
    return nil, problem
  end
  if text == "" then
    return nil, "must not be empty"
  end
  return text
end

fields.non_empty_string = non_empty_string

-- Tenant ids become Redis Cluster hash tags ({tenant_id}) and the first part of
-- "tenant_id:instrument_id" keys, so braces and colons would make keys ambiguous.
function fields.tenant_id(value)
  local text, problem = non_empty_string(value)
  if not text then
    return nil, problem
  end
  if text:find("[:{}]") then
    return nil, "must not contain ':', '{' or '}', got " .. describe(text)
  end
  return text
end

-- Instrument ids always come last in keys, so any non-empty string is safe.
fields.instrument_id = non_empty_string

-- Checks a query parameter that must be one of `choices` (an array of strings).
function fields.one_of(value, choices)
  local text, problem = non_empty_string(value)
  if not text then
    return nil, problem
  end
  for _, choice in ipairs(choices) do
    if text == choice then
      return text
    end
  end
  return nil, string.format("must be one of %s, got %s", table.concat(choices, ", "), describe(text))
end

-- Checks a query parameter that must be a decimal integer in [minimum, maximum].
function fields.integer_text(value, minimum, maximum)
  local text, problem = non_empty_string(value)
  if not text then
    return nil, problem
  end
  local number = text:match("^%d+$") and math.tointeger(tonumber(text))
  if not number or number < minimum or number > maximum then
    return nil, string.format("must be an integer from %d to %d, got %s", minimum, maximum, describe(text))
  end
  return number
end

-- Reads an optional integer setting. Raises at load time when the configured value is invalid,
-- because a projection must not start with a setting it cannot honour.
function fields.integer_setting(settings, name, default, minimum)
  local value = settings[name]
  if value == nil then
    return default
  end
  local number, problem = fields.integer(value, minimum)
  if not number then
    error(string.format("invalid setting '%s': %s", name, problem), 2)
  end
  return number
end

return fields
