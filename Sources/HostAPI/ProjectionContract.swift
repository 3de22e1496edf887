import CLua

/// Reading the table a projection file returns, and building the `ctx` tables it is called with.
extension ProjectionInstance {
    static let contractFields: Set<String> = [
        "name", "topics", "on_event", "queries", "init", "scripts",
    ]

    /// Checks the returned table (on top of the stack) and keeps references to its functions.
    func readContract() throws(ProjectionFailure) {
        let L = state.pointer
        let table = lua_gettop(L)
        defer { state.top = table - 1 }

        try rejectUnknownFields(table)
        try readName(table)
        try readTopics(table)

        guard rawField(table, "on_event") == LUA_TFUNCTION else {
            throw validationFailure("on_event must be a function(event, ctx)")
        }
        onEventReference = state.popReference()

        switch rawField(table, "init") {
        case LUA_TNIL:
            state.pop()
        case LUA_TFUNCTION:
            initReference = state.popReference()
            hasInit = true
        default:
            throw validationFailure("init must be a function(ctx) or absent")
        }

        try readQueries(table)
        try readScripts(table)
    }

    /// Pushes `table[name]` without metamethods and returns its type.
    private func rawField(_ table: Int32, _ name: String) -> Int32 {
        state.pushString(name)
        return lua_rawget(state.pointer, table)
    }

    private func validationFailure(_ message: String) -> ProjectionFailure {
        ProjectionFailure(phase: .validate, projection: name, file: code.file, message: message)
    }

    private func rejectUnknownFields(_ table: Int32) throws(ProjectionFailure) {
        let L = state.pointer
        lua_pushnil(L)
        while lua_next(L, table) != 0 {
            let key = lua_type(L, -2) == LUA_TSTRING ? state.string(at: -2) : nil
            state.pop()
            guard let key, Self.contractFields.contains(key) else {
                state.pop()
                let known = Self.contractFields.sorted().joined(separator: ", ")
                throw validationFailure(
                    "unknown field \(key.map { "'\($0)'" } ?? "of a non-string key") in the projection table (known fields: \(known))")
            }
        }
    }

    private func readName(_ table: Int32) throws(ProjectionFailure) {
        switch rawField(table, "name") {
        case LUA_TNIL:
            name = code.stem
        case LUA_TSTRING:
            name = state.string(at: -1) ?? ""
        default:
            state.pop()
            throw validationFailure("name must be a string")
        }
        state.pop()
        guard Self.isProjectionName(name) else {
            throw validationFailure(
                "invalid projection name '\(name)': use lower-case letters, digits and '_', starting with a letter (it appears in URLs and metric labels)")
        }
        scope.projection = name
    }

    static func isProjectionName(_ name: String) -> Bool {
        guard let first = name.utf8.first, first >= 97, first <= 122, name.utf8.count <= 64 else {
            return false
        }
        return name.utf8.allSatisfy { ($0 >= 97 && $0 <= 122) || ($0 >= 48 && $0 <= 57) || $0 == 95 }
    }

    private func readTopics(_ table: Int32) throws(ProjectionFailure) {
        let L = state.pointer
        guard rawField(table, "topics") == LUA_TTABLE else {
            state.pop()
            throw validationFailure("topics must be a non-empty array of topic names")
        }
        defer { state.pop() }
        let count = Int(lua_rawlen(L, -1))
        for index in 1...max(count, 1) {
            guard lua_rawgeti(L, -1, lua_Integer(index)) == LUA_TSTRING,
                  let topic = state.string(at: -1), !topic.isEmpty else {
                state.pop()
                throw validationFailure("topics[\(index)] must be a non-empty topic name (topics must be a non-empty array)")
            }
            state.pop()
            if !topics.contains(topic) {
                topics.append(topic)
            }
        }
    }

    private func readQueries(_ table: Int32) throws(ProjectionFailure) {
        let L = state.pointer
        switch rawField(table, "queries") {
        case LUA_TNIL:
            state.pop()
            return
        case LUA_TTABLE:
            break
        default:
            state.pop()
            throw validationFailure("queries must be a table of functions(params, ctx)")
        }
        let queries = lua_gettop(L)
        defer { state.top = queries - 1 }
        lua_pushnil(L)
        while lua_next(L, queries) != 0 {
            guard lua_type(L, -2) == LUA_TSTRING, let queryName = state.string(at: -2),
                  Self.isProjectionName(queryName) else {
                throw validationFailure("query names must be lower-case identifiers such as 'default' or 'bars'")
            }
            guard lua_type(L, -1) == LUA_TFUNCTION else {
                throw validationFailure("queries.\(queryName) must be a function(params, ctx)")
            }
            queryReferences[queryName] = state.popReference()
        }
        queryNames = queryReferences.keys.sorted()
    }

    private func readScripts(_ table: Int32) throws(ProjectionFailure) {
        let L = state.pointer
        switch rawField(table, "scripts") {
        case LUA_TNIL:
            state.pop()
            return
        case LUA_TTABLE:
            break
        default:
            state.pop()
            throw validationFailure("scripts must be a table of Redis Lua script sources")
        }
        let scriptsIndex = lua_gettop(L)
        defer { state.top = scriptsIndex - 1 }
        var byName: [String: RedisScript] = [:]
        lua_pushnil(L)
        while lua_next(L, scriptsIndex) != 0 {
            guard lua_type(L, -2) == LUA_TSTRING, let scriptName = state.string(at: -2),
                  lua_type(L, -1) == LUA_TSTRING, let source = state.bytes(at: -1), !source.isEmpty else {
                throw validationFailure("scripts must map names to non-empty Redis Lua sources")
            }
            byName[scriptName] = RedisScript(name: scriptName, source: source)
            state.pop()
        }
        scripts = byName.values.sorted { $0.name < $1.name }
        scope.scripts = byName
    }

    // MARK: - ctx tables

    /// Builds the three ctx tables once; per-event fields are set before each call. Projections
    /// see read-only views, so nothing one event writes into ctx reaches the next.
    func buildContexts() throws(ProjectionFailure) {
        let L = state.pointer

        clua_newtable(L)
        setContextName()
        clua_newtable(L)
        setFunction("get", stateGetFunction)
        setFunction("put", statePutFunction)
        setFunction("delete", stateDeleteFunction)
        try makeReadOnly("ctx.state")
        lua_setfield(L, -2, "state")
        setFunction("redis", redisWriteFunction)
        setFunction("redis_script", redisScriptFunction)
        setFunction("insert", insertFunction)
        setFunction("log", logFunction)
        setFunction("count", countFunction)
        lua_pushvalue(L, -1)
        eventFieldsReference = state.popReference()
        try makeReadOnly("ctx")
        eventContextReference = state.popReference()

        clua_newtable(L)
        setContextName()
        setFunction("clickhouse", clickhouseStatementFunction)
        setFunction("log", logFunction)
        try makeReadOnly("ctx")
        initContextReference = state.popReference()

        clua_newtable(L)
        setContextName()
        setFunction("redis", redisReadFunction)
        setFunction("clickhouse", clickhouseSelectFunction)
        setFunction("clickhouse_quote", clickhouseQuoteFunction)
        setFunction("log", logFunction)
        try makeReadOnly("ctx")
        queryContextReference = state.popReference()

        clua_newtable(L)
        try makeReadOnly("ctx.headers")
        emptyHeadersReference = state.popReference()
    }

    /// Replaces the table on top of the stack with a read-only view of it.
    private func makeReadOnly(_ what: String) throws(ProjectionFailure) {
        let L = state.pointer
        state.pushReference(readOnlyReference)
        clua_insert(L, -2)
        state.pushString(what)
        do {
            try state.call(arguments: 2, results: 1)
        } catch {
            throw ProjectionFailure(phase: .load, projection: name, file: code.file,
                                    message: "cannot build \(what): \(error.message)")
        }
    }

    private func setContextName() {
        state.pushString(name)
        lua_setfield(state.pointer, -2, "projection")
    }

    private func setFunction(_ field: String, _ function: HostFunction) {
        clua_push_host_function(state.pointer, function,
                                Unmanaged.passUnretained(scope).toOpaque())
        lua_setfield(state.pointer, -2, field)
    }
}
