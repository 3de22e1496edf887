/// The trusted Lua code run first in every projection state. It receives the host table and
/// returns the functions the host uses to load projection files; after it has run, nothing in
/// the state can reach `io`, `debug`, `package`, `os.execute`, `string.dump` or binary chunks.
///
/// Arguments: `host` (log function, `json`, settings, library sources keyed by module name,
/// the library folder's display path).
/// Returns: `load_projection(source, chunkname)`, `new_env()`, the `required` list and
/// `read_only(table, what)`, which the host uses to hand out ctx tables.
let sandboxPrelude = #"""
local host = ...
local real_load = load
local error, type, pairs, rawget, setmetatable, select, tostring =
  error, type, pairs, rawget, setmetatable, select, tostring
local concat = table.concat

-- The allow-list, grouped by origin. Anything else is absent from a projection's _ENV.
local allowed = {}
for _, name in ipairs({
  "assert", "error", "getmetatable", "ipairs", "next", "pairs", "pcall", "rawequal", "rawget",
  "rawlen", "rawset", "select", "tonumber", "tostring", "type", "xpcall", "_VERSION",
}) do
  allowed[name] = _G[name]
end

string.dump = nil
allowed.string = string
allowed.table = table
allowed.math = math
allowed.utf8 = utf8
allowed.os = { time = os.time, clock = os.clock, date = os.date }
allowed.json = host.json

-- The string metatable is shared by the whole state; hide it so it cannot be changed.
getmetatable("").__metatable = "the string metatable is protected"

local function read_only(data, what)
  return setmetatable({}, {
    __index = data,
    __newindex = function(_, key)
      error(what .. " is read-only (assignment to '" .. tostring(key) .. "')", 2)
    end,
    __pairs = function() return next, data, nil end,
    __len = function() return #data end,
    __metatable = false,
  })
end
allowed.settings = read_only(host.settings, "settings")

allowed.setmetatable = function(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not allowed in projections", 2)
  end
  return setmetatable(t, mt)
end

allowed.collectgarbage = function(option)
  if option == "count" then
    return collectgarbage("count")
  end
  error("collectgarbage: only \"count\" is allowed in projections", 2)
end

allowed.print = function(...)
  local parts = {}
  for i = 1, select("#", ...) do
    parts[i] = tostring((select(i, ...)))
  end
  host.log("info", concat(parts, "\t"))
end

local strict = {
  __index = function(_, name)
    error("unknown global '" .. tostring(name) .. "' (declare it local or use ctx)", 2)
  end,
  __newindex = function(_, name)
    error("assignment to undeclared global '" .. tostring(name) .. "' (declare it local)", 2)
  end,
}

local function new_env()
  local env = {}
  for name, value in pairs(allowed) do
    env[name] = value
  end
  env._G = env
  return setmetatable(env, strict)
end

allowed.load = function(chunk, chunkname, mode, env)
  if mode ~= nil and mode ~= "t" then
    error("load: binary chunks are not allowed in projections", 2)
  end
  if type(chunk) ~= "string" and type(chunk) ~= "function" then
    error("load: chunk must be a string or a function", 2)
  end
  return real_load(chunk, chunkname or "=(load)", "t", env or new_env())
end

-- require: modules of the library folder only, each in its own _ENV, loaded once per state.
local loaded, required = {}, {}
allowed.require = function(name)
  if type(name) ~= "string" or not name:match("^[%a_][%w_]*$") and
      not name:match("^[%a_][%w_]*%.[%w_%.]*[%w_]$") then
    error("require: invalid module name '" .. tostring(name) ..
      "' (use letters, digits, '_' and '.')", 2)
  end
  local cached = loaded[name]
  if cached ~= nil then
    return cached
  end
  local source = host.libraries[name]
  if source == nil then
    error("require: module '" .. name .. "' not found in " .. host.library_path ..
      " (only modules of that folder can be required)", 2)
  end
  local path = host.library_path .. "/" .. name:gsub("%.", "/") .. ".lua"
  local chunk, message = real_load(source, "@" .. path, "t", new_env())
  if chunk == nil then
    error(message, 0)
  end
  required[#required + 1] = name
  local result = chunk(name)
  if result == nil then
    result = true
  end
  loaded[name] = result
  return result
end

local function load_projection(source, chunkname)
  local chunk, message = real_load(source, chunkname, "t", new_env())
  if chunk == nil then
    error(message, 0)
  end
  return chunk()
end

return load_projection, new_env, required, read_only
"""#
