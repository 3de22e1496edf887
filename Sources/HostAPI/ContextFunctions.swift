import CLua
import CLuaJSON

// The `ctx` functions. Each runs behind `clua_push_host_function`'s trampoline and follows its
// rule: only C API calls that cannot raise or allocate in Lua here; errors and values that need
// allocation go back through `clua_result`.

typealias HostFunction = @convention(c) (
    OpaquePointer?, UnsafeMutableRawPointer?, UnsafeMutablePointer<clua_result>?
) -> Void

/// Calls `body` with the scope behind `context`; the trampoline always passes all three.
private func withScope(
    _ L: OpaquePointer?, _ context: UnsafeMutableRawPointer?,
    _ result: UnsafeMutablePointer<clua_result>?,
    _ body: (OpaquePointer, ProjectionScope, UnsafeMutablePointer<clua_result>) -> Void
) {
    guard let L, let context, let result else { return }
    let scope = Unmanaged<ProjectionScope>.fromOpaque(context).takeUnretainedValue()
    body(L, scope, result)
}

/// The bytes of a string argument, or nil when the argument is not a string.
private func stringArgument(_ L: OpaquePointer, _ index: Int32) -> [UInt8]? {
    guard lua_type(L, index) == LUA_TSTRING else { return nil }
    var length = 0
    let chars = lua_tolstring(L, index, &length)!
    return Array(UnsafeRawBufferPointer(start: chars, count: length))
}

/// A Redis argument: strings as they are, integers in decimal, floats in the shortest form that
/// reads back as the same value. Returns nil for other types and for NaN and infinities.
private func redisArgument(_ L: OpaquePointer, _ index: Int32) -> [UInt8]? {
    switch lua_type(L, index) {
    case LUA_TSTRING:
        return stringArgument(L, index)
    case LUA_TNUMBER:
        if lua_isinteger(L, index) != 0 {
            return Array(String(clua_tointegerx(L, index, nil)).utf8)
        }
        let value = clua_tonumberx(L, index, nil)
        guard value.isFinite else { return nil }
        return Array(value.description.utf8)
    default:
        return nil
    }
}

private func typeName(_ L: OpaquePointer, _ index: Int32) -> String {
    String(cString: lua_typename(L, lua_type(L, index)))
}

/// The type of a rejected argument, naming NaN and infinities, which are numbers Redis cannot take.
private func describe(_ L: OpaquePointer, _ index: Int32) -> String {
    guard lua_type(L, index) == LUA_TNUMBER, lua_isinteger(L, index) == 0 else { return typeName(L, index) }
    let value = clua_tonumberx(L, index, nil)
    return value.isNaN ? "NaN" : (value.isInfinite ? "an infinite number" : "number")
}

/// Encodes the argument at `index` as JSON without touching the Lua heap.
private func jsonArgument(_ L: OpaquePointer, _ index: Int32, sortKeys: Bool = false)
    -> Result<[UInt8], LuaError>
{
    var buffer = cljson_buffer()
    defer { cljson_buffer_free(&buffer) }
    var error = [CChar](repeating: 0, count: 256)
    let flags: Int32 = sortKeys ? Int32(CLJSON_SORT_KEYS) : 0
    if cljson_encode(L, index, &buffer, flags, 64, &error, error.count) == 0 {
        return .failure(LuaError(message: cString(error)))
    }
    return .success(Array(UnsafeRawBufferPointer(start: buffer.data, count: buffer.length)))
}

/// Reads the array at `index` (strings and numbers) as Redis arguments.
private func redisArgumentList(_ L: OpaquePointer, _ index: Int32, what: String)
    -> Result<[[UInt8]], LuaError>
{
    if lua_type(L, index) <= LUA_TNIL {
        return .success([])
    }
    guard lua_type(L, index) == LUA_TTABLE else {
        return .failure(LuaError(message: "\(what) must be an array, got \(typeName(L, index))"))
    }
    var list: [[UInt8]] = []
    let count = lua_rawlen(L, index)
    list.reserveCapacity(Int(count))
    for position in 0..<count {
        lua_rawgeti(L, index, lua_Integer(position) + 1)
        defer { clua_pop(L, 1) }
        guard let argument = redisArgument(L, -1) else {
            let got = describe(L, -1)
            return .failure(LuaError(
                message: "\(what)[\(position + 1)] must be a string or a finite number, got \(got)"))
        }
        list.append(argument)
    }
    return .success(list)
}

// MARK: - on_event

/// ctx.state.get(key) -> value or nil
let stateGetFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        guard let key = stringArgument(L, 1) else {
            return scope.fail(result, "ctx.state.get: key must be a string, got \(typeName(L, 1))")
        }
        let value = scope.stateValue(key: key) ?? []
        scope.finish(result, kind: Int32(CLUA_RESULT_JSON), bytes: value)
    }
}

/// ctx.state.put(key, value [, ttl_ms])
let statePutFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        guard let key = stringArgument(L, 1) else {
            return scope.fail(result, "ctx.state.put: key must be a string, got \(typeName(L, 1))")
        }
        if lua_type(L, 2) <= LUA_TNIL {
            return scope.fail(result, "ctx.state.put: value is nil (use ctx.state.delete to remove a key)")
        }
        var ttl: Int64?
        if lua_type(L, 3) > LUA_TNIL {
            var isInteger: Int32 = 0
            let value = clua_tointegerx(L, 3, &isInteger)
            guard isInteger != 0, value > 0 else {
                return scope.fail(result, "ctx.state.put: ttl_ms must be a positive integer (milliseconds)")
            }
            ttl = value
        }
        switch jsonArgument(L, 2, sortKeys: scope.sortObjectKeys) {
        case .failure(let error):
            scope.fail(result, "ctx.state.put: value cannot be stored: \(error.message)")
        case .success(let value):
            scope.recordState(StateChange(key: key, value: value, ttlMs: ttl))
        }
    }
}

/// ctx.state.delete(key)
let stateDeleteFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        guard let key = stringArgument(L, 1) else {
            return scope.fail(result, "ctx.state.delete: key must be a string, got \(typeName(L, 1))")
        }
        scope.recordState(StateChange(key: key, value: nil))
    }
}

/// Reads `ctx.redis(command, ...)` arguments, checking the command against `allowed` and, when
/// `arity` is given, the number of words against it (see `redisWriteCommands`). `hint` follows
/// the message when the command itself is not allowed.
private func redisCommand(_ L: OpaquePointer, allowed: Set<String>, arity: [String: Int] = [:],
                          kind: String, hint: String) -> Result<[[UInt8]], LuaError>
{
    guard let name = stringArgument(L, 1) else {
        return .failure(LuaError(message: "ctx.redis: command must be a string, got \(typeName(L, 1))"))
    }
    let command = String(decoding: name, as: UTF8.self).uppercased()
    guard allowed.contains(command) else {
        return .failure(LuaError(message: "ctx.redis: \(command) is not a \(kind) command allowed here (\(hint))"))
    }
    let count = lua_gettop(L)
    if let expected = arity[command] {
        // lua_gettop counts the command name too, as Redis's arity does.
        let words = Int(count)
        if expected >= 0 ? words != expected : words < -expected {
            let least = expected < 0 ? "at least " : ""
            let needed = abs(expected) - 1
            return .failure(LuaError(message: "ctx.redis: \(command) takes \(least)\(needed) "
                + "argument\(needed == 1 ? "" : "s") after the command name, got \(words - 1)"))
        }
        if let maximum = redisWriteMaximumWords[command], words > maximum {
            return .failure(LuaError(message:
                "ctx.redis: \(command) takes at most \(maximum - 1) arguments after the command name, got \(words - 1)"))
        }
        if let rule = redisWritePairs[command], (words - rule.from) % 2 != 0 {
            return .failure(LuaError(message:
                "ctx.redis: \(command) takes \(rule.pairs), got \(words - rule.from) arguments there, an odd number"))
        }
    }
    var arguments = [Array(command.utf8)]
    arguments.reserveCapacity(Int(count))
    if count > 1 {
        for index in 2...count {
            guard let argument = redisArgument(L, index) else {
                return .failure(LuaError(message:
                    "ctx.redis: argument \(index - 1) of \(command) must be a string or a finite number, got \(describe(L, index))"))
            }
            arguments.append(argument)
        }
    }
    return .success(arguments)
}

/// ctx.redis(command, ...) in on_event: queues a write command.
let redisWriteFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        switch redisCommand(L, allowed: redisWriteCommandNames, arity: redisWriteCommands, kind: "write",
                            hint: "handlers queue writes only; read keyed state instead") {
        case .failure(let error):
            scope.fail(result, error.message)
        case .success(let arguments):
            scope.effects.append(.redis(arguments: arguments))
        }
    }
}

/// ctx.redis_script(name, keys, args): queues EVALSHA of a declared script.
let redisScriptFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        guard let nameBytes = stringArgument(L, 1) else {
            return scope.fail(result, "ctx.redis_script: name must be a string, got \(typeName(L, 1))")
        }
        let name = String(decoding: nameBytes, as: UTF8.self)
        guard let script = scope.scripts[name] else {
            let known = scope.scripts.keys.sorted().joined(separator: ", ")
            return scope.fail(result, "ctx.redis_script: no script '\(name)' in this projection's scripts (declared: \(known.isEmpty ? "none" : known))")
        }
        let keys = redisArgumentList(L, 2, what: "ctx.redis_script keys")
        let arguments = redisArgumentList(L, 3, what: "ctx.redis_script args")
        switch (keys, arguments) {
        case (.failure(let error), _), (_, .failure(let error)):
            scope.fail(result, error.message)
        case (.success(let keys), .success(let arguments)):
            scope.effects.append(.redisScript(name: name, sha1: script.sha1, keys: keys,
                                              arguments: arguments))
        }
    }
}

private func isIdentifier(_ bytes: [UInt8], allowDots: Bool) -> Bool {
    guard let first = bytes.first, first == UInt8(ascii: "_") || isLetter(first) else { return false }
    return bytes.allSatisfy { byte in
        isLetter(byte) || (byte >= 48 && byte <= 57) || byte == UInt8(ascii: "_")
            || (allowDots && byte == UInt8(ascii: "."))
    }
}

private func isLetter(_ byte: UInt8) -> Bool {
    (byte >= 65 && byte <= 90) || (byte >= 97 && byte <= 122)
}

/// ctx.insert(table, row): queues a ClickHouse row.
let insertFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        guard let table = stringArgument(L, 1), isIdentifier(table, allowDots: true) else {
            return scope.fail(result, "ctx.insert: table must be a name such as 'bar_rollups' or 'db.table'")
        }
        guard lua_type(L, 2) == LUA_TTABLE else {
            return scope.fail(result, "ctx.insert: row must be a table, got \(typeName(L, 2))")
        }
        switch jsonArgument(L, 2, sortKeys: scope.sortObjectKeys) {
        case .failure(let error):
            scope.fail(result, "ctx.insert: row cannot be encoded: \(error.message)")
        case .success(let row):
            guard row.first == UInt8(ascii: "{") else {
                return scope.fail(result, "ctx.insert: row must be an object with column names as keys")
            }
            scope.effects.append(.insert(table: String(decoding: table, as: UTF8.self), row: row))
        }
    }
}

// MARK: - every phase

/// ctx.log(level, message [, fields])
let logFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        guard let levelName = stringArgument(L, 1),
              let level = LogLevel(rawValue: String(decoding: levelName, as: UTF8.self)) else {
            return scope.fail(result, "ctx.log: level must be \"debug\", \"info\", \"warn\" or \"error\"")
        }
        guard let message = stringArgument(L, 2) else {
            return scope.fail(result, "ctx.log: message must be a string, got \(typeName(L, 2))")
        }
        var fields: [UInt8] = []
        if lua_type(L, 3) > LUA_TNIL {
            switch jsonArgument(L, 3, sortKeys: true) {
            case .failure(let error):
                return scope.fail(result, "ctx.log: fields cannot be encoded: \(error.message)")
            case .success(let encoded):
                fields = encoded
            }
        }
        scope.effects.append(.log(level: level, message: String(decoding: message, as: UTF8.self),
                                  fields: fields))
    }
}

/// ctx.count(name [, by [, labels]])
let countFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        guard let name = stringArgument(L, 1), isIdentifier(name, allowDots: false),
              !name.contains(where: { $0 >= 65 && $0 <= 90 }) else {
            return scope.fail(result, "ctx.count: name must match [a-z_][a-z0-9_]*")
        }
        var by = 1.0
        if lua_type(L, 2) > LUA_TNIL {
            guard lua_type(L, 2) == LUA_TNUMBER else {
                return scope.fail(result, "ctx.count: by must be a number, got \(typeName(L, 2))")
            }
            by = clua_tonumberx(L, 2, nil)
            guard by.isFinite, by >= 0 else {
                return scope.fail(result, "ctx.count: by must be a finite number >= 0 (counters only go up)")
            }
        }
        var labels: [UInt8] = []
        if lua_type(L, 3) > LUA_TNIL {
            switch jsonArgument(L, 3, sortKeys: true) {
            case .failure(let error):
                return scope.fail(result, "ctx.count: labels cannot be encoded: \(error.message)")
            case .success(let encoded):
                labels = encoded
            }
        }
        scope.effects.append(.count(name: String(decoding: name, as: UTF8.self), by: by, labels: labels))
    }
}

// MARK: - init

/// ctx.clickhouse(sql) in init: queues a statement that the runtime runs at load.
let clickhouseStatementFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        guard let sql = stringArgument(L, 1), !sql.isEmpty else {
            return scope.fail(result, "ctx.clickhouse: sql must be a non-empty string")
        }
        scope.effects.append(.clickhouseStatement(sql: String(decoding: sql, as: UTF8.self)))
    }
}

// MARK: - queries

private func runQueryRead(_ scope: ProjectionScope, _ result: UnsafeMutablePointer<clua_result>,
                          _ read: (QueryBackend) -> QueryReply) {
    guard let backend = scope.queryBackend else {
        return scope.fail(result, "no query backend is attached (queries run in the live runtime)")
    }
    var bytes: [UInt8] = []
    read(backend).serialize(into: &bytes)
    scope.finish(result, kind: Int32(CLUA_RESULT_REPLY), bytes: bytes)
}

/// ctx.redis(command, ...) in a query: runs a read command and returns its reply.
let redisReadFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        switch redisCommand(L, allowed: redisReadCommands, kind: "read", hint: "queries may only read") {
        case .failure(let error):
            scope.fail(result, error.message)
        case .success(let arguments):
            runQueryRead(scope, result) { $0.redis(arguments) }
        }
    }
}

/// ctx.clickhouse(sql) in a query: runs a SELECT and returns its rows.
let clickhouseSelectFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        guard let sql = stringArgument(L, 1), !sql.isEmpty else {
            return scope.fail(result, "ctx.clickhouse: sql must be a non-empty string")
        }
        runQueryRead(scope, result) { $0.clickhouse(String(decoding: sql, as: UTF8.self)) }
    }
}

/// ctx.clickhouse_quote(value): a ClickHouse string literal with `\` and `'` escaped.
let clickhouseQuoteFunction: HostFunction = { L, context, result in
    withScope(L, context, result) { L, scope, result in
        guard let value = stringArgument(L, 1) else {
            return scope.fail(result, "ctx.clickhouse_quote: value must be a string, got \(typeName(L, 1))")
        }
        var quoted: [UInt8] = [UInt8(ascii: "'")]
        quoted.reserveCapacity(value.count + 2)
        for byte in value {
            if byte == UInt8(ascii: "'") || byte == UInt8(ascii: "\\") {
                quoted.append(UInt8(ascii: "\\"))
            }
            quoted.append(byte)
        }
        quoted.append(UInt8(ascii: "'"))
        scope.finish(result, kind: Int32(CLUA_RESULT_STRING), bytes: quoted)
    }
}
