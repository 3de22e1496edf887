---@meta projection-runtime

-- Editor definitions for projection files, read by lua-language-server (LuaLS) through
-- .luarc.json. The runtime never loads this file. docs/projections.md is the guide, and the
-- host code in Sources/HostAPI (ContextFunctions.swift, ProjectionContract.swift and
-- SandboxPrelude.swift) is the source of truth.

-- MARK: JSON

---The value that JSON `null` decodes to. It is not `nil`, so a field that is present and null
---reads as `json.null`, and `json.null` encodes back to `null`.
---@class JsonNull

---A value that the JSON codec can encode: tables must be arrays (keys 1..n) or objects
---(string keys), numbers must be finite and strings valid UTF-8.
---@alias JsonValue nil|boolean|integer|number|string|table|JsonNull

---The JSON codec the host uses for events, state values, rows, logs and query results.
---@class JsonLibrary
---@field null JsonNull The sentinel for JSON `null`.
json = {}

---Decodes JSON text. Arrays come back tagged as arrays (see `json.is_array`), integers within
---64 bits as Lua integers and other numbers as floats.
---Raises an error naming the byte offset when the text is not valid JSON or nests deeper than
---64 levels.
---@param text string
---@return JsonValue
function json.decode(text) end

---Encodes a value as compact JSON. Object keys come out in table order unless
---`options.sort_keys` is true. An empty untagged table encodes as `{}`.
---Raises an error naming the path of the bad value (for example `$.rows[3].px`) for
---functions, NaN, infinities, sparse or mixed tables, cycles, invalid UTF-8 and nesting
---deeper than 64 levels.
---@param value JsonValue
---@param options? { sort_keys?: boolean }
---@return string
function json.encode(value, options) end

---Tags `t` (or a new table) as an array, so that it encodes as `[]` even when empty.
---Replaces any other metatable of `t`.
---@generic T: table
---@param t? T
---@return T
function json.array(t) end

---Removes the array tag from `t`, or returns a new table, so that an empty table encodes
---as `{}`.
---@generic T: table
---@param t? T
---@return T
function json.object(t) end

---Returns whether `value` is a table tagged as an array (decoded from a JSON array or made
---with `json.array`).
---@param value any
---@return boolean
function json.is_array(value) end

-- MARK: settings

---The read-only `settings` global: the topic names every projection gets, plus the values
---configured for this projection's file stem. A missing key reads as nil. Assigning to a key
---raises "settings is read-only".
---@class ProjectionSettings
---@field aggregated_topic string The topic of aggregated OHLCV bars (default `aggregation.bars.v1`).
---@field invalidation_topic string The topic of cache-invalidation events (default `projection.invalidation.v1`).
---@field [string] string|integer|number|boolean|nil
settings = {}

-- MARK: os

---The part of `os` that the sandbox keeps. Other `os` functions are absent.
---@class ProjectionOs
os = {}

---Wall-clock time in seconds since the epoch, or the time of the date table `date`.
---@param date? table
---@return integer
function os.time(date) end

---CPU time used by the process, in seconds.
---@return number
function os.clock() end

---Formats a time as `os.date` in Lua 5.4 does (the process time zone unless `format` starts
---with `!`).
---@param format? string
---@param time? integer
---@return string|table
function os.date(format, time) end

-- MARK: ctx

---`ctx.state`: keyed state of this projection for the topic and partition of the current
---event. Reads see the handler's own earlier writes at once. Writes apply only when the
---handler returns without error.
---@class ProjectionState
local ProjectionState = {}

---Returns the value of `key` (a fresh decoded copy), or nil when the key is absent or its TTL
---has passed.
---@param key string
---@return JsonValue
function ProjectionState.get(key) end

---Stores `value` under `key`. The value must be JSON-encodable and not nil. Each put replaces
---the key's TTL: `ttl_ms` sets a new one and leaving it out removes it.
---Raises for a non-string key, a nil value, a value that cannot be encoded, or a `ttl_ms` that
---is not a positive integer.
---@param key string
---@param value JsonValue
---@param ttl_ms? integer Time to live in wall-clock milliseconds from when the change applies.
function ProjectionState.put(key, value, ttl_ms) end

---Deletes `key`.
---@param key string
function ProjectionState.delete(key) end

---The `ctx` argument of `on_event`. Every function queues an effect or a state change,
---and nothing does I/O while the handler runs.
---@class ProjectionEventContext
---@field projection string The projection's name.
---@field topic string The Kafka topic of the event.
---@field partition integer The Kafka partition of the event.
---@field offset integer The Kafka offset of the event.
---@field key string|nil The Kafka message key, or nil when the message has none.
---@field timestamp_ms integer|nil The message timestamp in epoch milliseconds, or nil.
---@field headers table<string, string|false> Message headers by name. A header without a value is `false`.
---@field state ProjectionState
local ProjectionEventContext = {}

---Queues a Redis write command. The name is case-insensitive and must be one of the write
---commands the host allows (SET, HSET, ZADD, XADD, DEL, EXPIRE, ...). Arguments are strings
---or finite numbers: integers are sent in decimal, floats in the shortest form that reads
---back as the same value.
---Raises for a read command (GET, HGET, ...), an unknown command, or an argument of another type.
---@param command string
---@param ... string|number
function ProjectionEventContext.redis(command, ...) end

---Queues EVALSHA of the script `name` from the projection's `scripts` table, by the SHA-1 of
---its source. `keys` and `args` are arrays of strings or finite numbers, and nil means empty.
---Raises when the projection declares no script of that name.
---@param name string
---@param keys? (string|number)[]
---@param args? (string|number)[]
function ProjectionEventContext.redis_script(name, keys, args) end

---Queues one row for the ClickHouse table `table` (`name` or `database.name`). The row must
---encode as a JSON object with column names as keys.
---@param table string
---@param row table<string, JsonValue>
function ProjectionEventContext.insert(table, row) end

---Queues a log line. `fields` is a table of structured fields, encoded as JSON with sorted keys.
---@param level "debug"|"info"|"warn"|"error"
---@param message string
---@param fields? table<string, JsonValue>
function ProjectionEventContext.log(level, message, fields) end

---Increments the projection counter `name` (`[a-z_][a-z0-9_]*`) by `by` (default 1, a finite
---number >= 0), with optional labels.
---@param name string
---@param by? number
---@param labels? table<string, JsonValue>
function ProjectionEventContext.count(name, by, labels) end

---The `ctx` argument of `init`, which runs once when a version of the file loads.
---@class ProjectionInitContext
---@field projection string The projection's name.
local ProjectionInitContext = {}

---Queues a ClickHouse statement (such as `CREATE TABLE IF NOT EXISTS`) that runs before the
---version serves.
---@param sql string A non-empty statement.
function ProjectionInitContext.clickhouse(sql) end

---Queues a log line.
---@param level "debug"|"info"|"warn"|"error"
---@param message string
---@param fields? table<string, JsonValue>
function ProjectionInitContext.log(level, message, fields) end

---The `ctx` argument of a query function. Queries may read Redis and ClickHouse, but they
---cannot read keyed state or write anything.
---@class ProjectionQueryContext
---@field projection string The projection's name.
local ProjectionQueryContext = {}

---Runs a Redis read command (GET, HGET, HGETALL, MGET, ZRANGE, ZREVRANGE, ...) and returns
---its reply: nil for a missing value, an integer, a string, or an array of replies.
---A Redis error reply is raised as a Lua error.
---@param command string
---@param ... string|number
---@return any
function ProjectionQueryContext.redis(command, ...) end

---Runs a ClickHouse SELECT and returns its rows as Lua tables.
---Build string literals with `ctx.clickhouse_quote`, never by concatenating parameters.
---@param sql string
---@return table
function ProjectionQueryContext.clickhouse(sql) end

---Returns `value` as a ClickHouse string literal in single quotes, with `\` and `'` escaped.
---@param value string
---@return string
function ProjectionQueryContext.clickhouse_quote(value) end

---Queues a log line.
---@param level "debug"|"info"|"warn"|"error"
---@param message string
---@param fields? table<string, JsonValue>
function ProjectionQueryContext.log(level, message, fields) end

-- MARK: the projection table

---A query function. Return a value for 200 with that value as JSON, nil for 404, or nil and
---a message for 400.
---@alias ProjectionQuery fun(params: table<string, string>, ctx: ProjectionQueryContext): any, string?

---The table a projection file returns. Fields other than these are rejected at load.
---@class (exact) Projection
---@field name? string Lower-case letters, digits and `_`, starting with a letter, at most 64 bytes. Defaults to the file name without `.lua`.
---@field topics string[] The Kafka topics to consume, at least one.
---@field on_event fun(event: JsonValue, ctx: ProjectionEventContext) Called once per event with the decoded payload.
---@field init? fun(ctx: ProjectionInitContext) Runs once when a version loads, for ClickHouse DDL.
---@field queries? table<string, ProjectionQuery> Query functions by name: lower-case letters, digits and `_`, starting with a letter.
---@field scripts? table<string, string> Redis Lua script sources by name, for `ctx.redis_script`.
