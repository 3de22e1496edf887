import CLua

/// The result of handing one event to one projection.
public enum EventOutcome {
    /// The handler returned; its effects, state changes included, in the order it made them.
    case handled([Effect])
    /// The handler raised or exceeded a limit; none of its effects or state changes apply.
    case failed(ProjectionFailure)
}

/// The result of a query call.
public enum QueryOutcome: Equatable {
    /// The query returned a value, encoded as JSON.
    case found([UInt8])
    /// The query returned nil: no data.
    case notFound
    /// The query returned nil and a message: a missing or invalid parameter.
    case badRequest(String)
    /// The projection has no query of that name.
    case unknownQuery(available: [String])
    case failed(ProjectionFailure)
}

extension ProjectionInstance {
    /// Runs `init(ctx)` and returns the statements and logs it queued.
    public func runInit(nowMs: Int64) throws(ProjectionFailure) -> [Effect] {
        guard hasInit else { return [] }
        scope.begin(store: nil, scope: nil, nowMs: nowMs)
        state.setInstructionBudget(limits.instructionsPerLoad)
        defer { state.setInstructionBudget(limits.instructionsPerCall) }

        state.pushReference(initReference)
        state.pushReference(initContextReference)
        do {
            try state.call(arguments: 1, results: 0)
        } catch {
            throw ProjectionFailure(phase: .initialize, projection: name, file: code.file, error: error)
        }
        return scope.effects
    }

    /// Decodes the payload into this state and runs `on_event`. State changes are applied to
    /// `store` only when the handler returns without error.
    public func handle(_ message: EventMessage, store: KeyedStateStore, nowMs: Int64) -> EventOutcome {
        let base = state.top
        defer { state.top = base }
        let stateScope = StateScope(projection: name, topic: message.topic, partition: message.partition)
        scope.begin(store: store, scope: stateScope, nowMs: nowMs)

        state.pushReference(onEventReference)
        do {
            try state.pushJSON(message.payload, limits: jsonLimits)
        } catch {
            return .failed(ProjectionFailure(phase: .decode, projection: name, file: code.file,
                                             message: "invalid event payload: \(error.message)"))
        }
        pushEventContext(message)

        do {
            try state.call(arguments: 2, results: 0)
        } catch {
            return .failed(ProjectionFailure(phase: .onEvent, projection: name, file: code.file, error: error))
        }

        let changes = scope.effects.compactMap { effect -> StateChange? in
            if case .state(let change) = effect { return change }
            return nil
        }
        if !changes.isEmpty {
            store.apply(scope: stateScope, changes: changes, nowMs: nowMs)
        }
        return .handled(scope.effects)
    }

    /// Sets the per-event fields of the event ctx and pushes it. Fields are set raw, so a
    /// metatable a projection put on ctx cannot run here, outside a protected call.
    private func pushEventContext(_ message: EventMessage) {
        let L = state.pointer
        state.pushReference(eventFieldsReference)
        let ctx = lua_gettop(L)

        setRaw(ctx, "topic") { state.pushString(message.topic) }
        setRaw(ctx, "partition") { lua_pushinteger(L, lua_Integer(message.partition)) }
        setRaw(ctx, "offset") { lua_pushinteger(L, lua_Integer(message.offset)) }
        setRaw(ctx, "key") {
            if let key = message.key { state.pushBytes(key) } else { lua_pushnil(L) }
        }
        setRaw(ctx, "timestamp_ms") {
            if let timestamp = message.timestampMs { lua_pushinteger(L, lua_Integer(timestamp)) } else { lua_pushnil(L) }
        }
        setRaw(ctx, "headers") {
            if message.headers.isEmpty {
                state.pushReference(emptyHeadersReference)
                return
            }
            lua_createtable(L, 0, Int32(message.headers.count))
            for header in message.headers {
                state.pushString(header.name)
                if let value = header.value { state.pushBytes(value) } else { lua_pushboolean(L, 0) }
                lua_rawset(L, -3)
            }
        }
        state.pop()
        state.pushReference(eventContextReference)
    }

    private func setRaw(_ table: Int32, _ field: String, push: () -> Void) {
        state.pushString(field)
        push()
        lua_rawset(state.pointer, table)
    }

    /// Runs the query `queryName` with the request's parameters.
    public func query(_ queryName: String, parameters: [String: String], backend: QueryBackend?,
                      nowMs: Int64) -> QueryOutcome {
        guard let reference = queryReferences[queryName] else {
            return .unknownQuery(available: queryNames)
        }
        let L = state.pointer
        let base = state.top
        defer { state.top = base }
        scope.begin(store: nil, scope: nil, nowMs: nowMs)
        scope.queryBackend = backend
        defer { scope.queryBackend = nil }

        state.pushReference(reference)
        lua_createtable(L, 0, Int32(parameters.count))
        for (key, value) in parameters {
            state.pushString(key)
            state.pushString(value)
            lua_rawset(L, -3)
        }
        state.pushReference(queryContextReference)
        do {
            try state.call(arguments: 2, results: 2)
        } catch {
            return .failed(ProjectionFailure(phase: .query, projection: name, file: code.file, error: error))
        }
        return queryResult()
    }

    /// Reads the two values a query returned (on top of the stack).
    private func queryResult() -> QueryOutcome {
        let L = state.pointer
        if lua_type(L, -2) <= LUA_TNIL {
            if lua_type(L, -1) <= LUA_TNIL {
                return .notFound
            }
            return .badRequest(state.string(at: -1) ?? "invalid request")
        }
        do {
            return .found(try state.encodeJSON(at: -2, sortKeys: scope.sortObjectKeys))
        } catch {
            return .failed(ProjectionFailure(
                phase: .query, projection: name, file: code.file,
                message: "the query result cannot be encoded as JSON: \(error.message)"))
        }
    }

    /// Effects the last call queued, such as log lines from a query.
    public var lastEffects: [Effect] { scope.effects }
}
