import CLua
import CLuaJSON

/// One projection compiled into a Lua state of its own, ready to handle events, run `init` or
/// answer queries.
///
/// Each projection gets its own state so that the memory cap is per projection and an error or
/// a runaway loop in one cannot disturb another. An instance belongs to the thread that created
/// it (it is not `Sendable`); other threads build their own instance from the same
/// `ProjectionCode`.
public final class ProjectionInstance {
    public let code: ProjectionCode
    public internal(set) var name: String
    public internal(set) var topics: [String] = []
    public internal(set) var queryNames: [String] = []
    public internal(set) var hasInit = false
    public internal(set) var scripts: [RedisScript] = []
    /// Library modules the file required while loading, in the order it required them.
    public internal(set) var requiredLibraries: [String] = []

    let state: LuaState
    let scope: ProjectionScope
    let jsonLimits: JSONLimits
    let limits: LuaLimits

    var onEventReference: Int32 = LUA_NOREF
    var initReference: Int32 = LUA_NOREF
    var queryReferences: [String: Int32] = [:]
    var eventContextReference: Int32 = LUA_NOREF
    var initContextReference: Int32 = LUA_NOREF
    var queryContextReference: Int32 = LUA_NOREF
    var emptyHeadersReference: Int32 = LUA_NOREF
    /// The table behind the read-only event ctx, where the host sets per-event fields.
    var eventFieldsReference: Int32 = LUA_NOREF
    var readOnlyReference: Int32 = LUA_NOREF

    /// Compiles `code` in a fresh sandboxed state and checks the table it returns.
    public init(code: ProjectionCode, limits: LuaLimits = LuaLimits(),
                jsonLimits: JSONLimits = JSONLimits(), sortObjectKeys: Bool = false) throws(ProjectionFailure) {
        self.code = code
        self.name = code.stem
        self.limits = limits
        self.jsonLimits = jsonLimits
        self.scope = ProjectionScope(projection: code.stem, scripts: [:])
        scope.sortObjectKeys = sortObjectKeys
        do {
            self.state = try LuaState(limits: limits)
        } catch {
            throw ProjectionFailure(phase: .load, projection: nil, file: code.file, error: error)
        }

        state.setInstructionBudget(limits.instructionsPerLoad)
        defer { state.setInstructionBudget(limits.instructionsPerCall) }
        try openLibraries()
        let loadProjection = try runPrelude()
        try loadFile(with: loadProjection)
        try readContract()
        try buildContexts()
    }

    deinit {
        // The ctx closures point at `scope` without retaining it; close the state first.
        withExtendedLifetime(scope) { state.close() }
    }

    /// Bytes the projection's state holds now, and the most it has held.
    public var memoryUsed: Int { state.memoryUsed }
    public var memoryPeak: Int { state.memoryPeak }

    private var contextPointer: UnsafeMutableRawPointer {
        Unmanaged.passUnretained(scope).toOpaque()
    }

    private func fail(_ phase: ProjectionFailure.Phase, _ message: String) -> ProjectionFailure {
        ProjectionFailure(phase: phase, projection: phase == .load ? nil : name, file: code.file,
                          message: message)
    }

    // MARK: - Loading

    /// Opens the standard libraries the sandbox starts from; the prelude strips them down.
    private func openLibraries() throws(ProjectionFailure) {
        let L = state.pointer
        let libraries: [(String, lua_CFunction)] = [
            ("_G", luaopen_base), ("string", luaopen_string), ("table", luaopen_table),
            ("math", luaopen_math), ("utf8", luaopen_utf8), ("os", luaopen_os),
        ]
        for (name, open) in libraries {
            luaL_requiref(L, name, open, 1)
            state.pop()
        }
    }

    /// Runs the sandbox prelude and returns the registry reference of `load_projection`.
    private func runPrelude() throws(ProjectionFailure) -> Int32 {
        let L = state.pointer
        do {
            try state.load(source: Array(sandboxPrelude.utf8), chunkName: "=sandbox prelude")
            clua_newtable(L)
            clua_push_host_function(L, logFunction,
                                    contextPointer)
            lua_setfield(L, -2, "log")
            _ = cljson_open(L)
            lua_setfield(L, -2, "json")
            try state.pushJSON(code.settings, limits: jsonLimits)
            lua_setfield(L, -2, "settings")
            clua_newtable(L)
            for (module, source) in code.libraries.modules {
                state.pushBytes(source)
                lua_setfield(L, -2, module)
            }
            lua_setfield(L, -2, "libraries")
            state.pushString(code.libraries.path)
            lua_setfield(L, -2, "library_path")
            try state.call(arguments: 1, results: 4)
        } catch {
            throw ProjectionFailure(phase: .load, projection: nil, file: code.file,
                                    message: "sandbox setup failed: \(error.message)")
        }
        readOnlyReference = state.popReference()
        requiredListReference = state.popReference()
        state.pop()  // new_env: the host does not need it
        return state.popReference()
    }

    private var requiredListReference: Int32 = LUA_NOREF

    /// Compiles and runs the file, leaving the table it returned on the stack.
    private func loadFile(with loadProjection: Int32) throws(ProjectionFailure) {
        state.pushReference(loadProjection)
        state.pushBytes(code.source)
        state.pushString("@" + code.file)
        do {
            try state.call(arguments: 2, results: 1)
        } catch {
            throw ProjectionFailure(phase: .load, projection: nil, file: code.file, error: error)
        }
        requiredLibraries = readStringArray(reference: requiredListReference)
        guard lua_type(state.pointer, -1) == LUA_TTABLE else {
            let got = String(cString: lua_typename(state.pointer, lua_type(state.pointer, -1)))
            state.pop()
            throw fail(.validate, "the file must return a projection table, but it returned \(got)")
        }
    }

    private func readStringArray(reference: Int32) -> [String] {
        state.pushReference(reference)
        defer { state.pop() }
        var items: [String] = []
        let count = lua_rawlen(state.pointer, -1)
        for index in 0..<count {
            lua_rawgeti(state.pointer, -1, lua_Integer(index) + 1)
            items.append(state.string(at: -1) ?? "")
            state.pop()
        }
        return items
    }
}
