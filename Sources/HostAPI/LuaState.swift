import CLua
import CLuaJSON

/// Limits applied to one Lua state: a memory cap enforced by the allocator and an instruction
/// budget per call from the host.
public struct LuaLimits: Sendable, Equatable {
    /// Bytes the state may allocate; 0 means unlimited.
    public var memoryBytes: Int
    /// VM instructions allowed per `on_event` or query call; 0 means unlimited.
    public var instructionsPerCall: Int
    /// VM instructions allowed for loading a file and running its `init`.
    public var instructionsPerLoad: Int

    public init(memoryBytes: Int = 64 << 20, instructionsPerCall: Int = 10_000_000,
                instructionsPerLoad: Int = 100_000_000) {
        self.memoryBytes = memoryBytes
        self.instructionsPerCall = instructionsPerCall
        self.instructionsPerLoad = instructionsPerLoad
    }
}

/// A failure reported by Lua: the message (which starts with `file:line:` when Lua knows the
/// position) and the traceback captured where it was raised.
public struct LuaError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    public var traceback: String

    public init(message: String, traceback: String = "") {
        self.message = message
        self.traceback = traceback
    }

    public var description: String { message }
}

/// One `lua_State` and the limits struct its allocator and hook read.
///
/// A state belongs to the thread that created it for its whole life: it is deliberately not
/// `Sendable`, and nothing here locks.
public final class LuaState {
    public let pointer: OpaquePointer
    private let limits: UnsafeMutablePointer<clua_limits>

    public init(limits: LuaLimits) throws(LuaError) {
        cljson_install_host_decoder()
        let storage = UnsafeMutablePointer<clua_limits>.allocate(capacity: 1)
        storage.initialize(to: clua_limits())
        storage.pointee.memory_limit = limits.memoryBytes
        storage.pointee.budget_per_call = Int64(limits.instructionsPerCall)
        guard let state = clua_newstate(storage) else {
            storage.deallocate()
            throw LuaError(message: "cannot create a Lua state (out of memory)")
        }
        self.pointer = state
        self.limits = storage
    }

    private var isClosed = false

    deinit {
        close()
        limits.deallocate()
    }

    /// Closes the state, running pending finalizers; later calls do nothing. The owner calls it
    /// early when host objects that Lua closures point at must outlive the close.
    public func close() {
        guard !isClosed else { return }
        isClosed = true
        lua_close(pointer)
    }

    /// Bytes the state holds now.
    public var memoryUsed: Int { limits.pointee.memory_used }

    /// The most bytes the state has held.
    public var memoryPeak: Int { limits.pointee.memory_peak }

    /// Sets the instruction budget that the next calls run under.
    public func setInstructionBudget(_ instructions: Int) {
        limits.pointee.budget_per_call = Int64(instructions)
    }

    /// Loads a text chunk named `@path`, leaving the compiled function on the stack.
    public func load(source: [UInt8], chunkName: String) throws(LuaError) {
        let status = source.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { chars in
                clua_loadbuffer_text(pointer, chars.baseAddress, chars.count, chunkName)
            }
        }
        if status != LUA_OK {
            let message = string(at: -1) ?? "unknown load error"
            clua_pop(pointer, 1)
            throw LuaError(message: message)
        }
    }

    /// Calls the function below `arguments` values on the stack under a fresh instruction
    /// budget, with a traceback handler; leaves `results` values on success.
    public func call(arguments: Int32, results: Int32) throws(LuaError) {
        let functionIndex = lua_gettop(pointer) - arguments
        clua_pushcfunction(pointer, clua_traceback_handler)
        clua_insert(pointer, functionIndex)
        clua_arm_budget(pointer)
        limits.pointee.enforce_memory_limit = 1

        let status = clua_pcall(pointer, arguments, results, functionIndex)

        limits.pointee.enforce_memory_limit = 0
        lua_sethook(pointer, nil, 0, 0)
        if status != LUA_OK {
            let full = string(at: -1) ?? "error object is not a string"
            clua_pop(pointer, 2)
            throw Self.splitTraceback(full, memoryExceeded: status == LUA_ERRMEM)
        }
        clua_remove(pointer, functionIndex)
    }

    /// Splits what `clua_traceback_handler` produced into the message and the traceback.
    static func splitTraceback(_ full: String, memoryExceeded: Bool) -> LuaError {
        var message = full
        var traceback = ""
        if let range = full.range(of: "\nstack traceback:") {
            message = String(full[..<range.lowerBound])
            traceback = String(full[range.lowerBound...].dropFirst())
        }
        if memoryExceeded {
            message = "memory limit exceeded (\(message))"
        }
        return LuaError(message: message, traceback: traceback)
    }

    /// The string at `index`, or nil when the value there is not a string or a number.
    /// Numbers are converted in place, as `lua_tolstring` does.
    public func string(at index: Int32) -> String? {
        var length = 0
        guard let chars = lua_tolstring(pointer, index, &length) else { return nil }
        let bytes = UnsafeRawBufferPointer(start: chars, count: length)
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The bytes of the string at `index`, without conversion; nil when it is not a string.
    public func bytes(at index: Int32) -> [UInt8]? {
        guard lua_type(pointer, index) == LUA_TSTRING else { return nil }
        var length = 0
        let chars = lua_tolstring(pointer, index, &length)!
        return Array(UnsafeRawBufferPointer(start: chars, count: length))
    }

    public func pushString(_ value: String) {
        var value = value
        value.withUTF8 { buffer in
            buffer.withMemoryRebound(to: CChar.self) { chars in
                _ = lua_pushlstring(pointer, chars.baseAddress, chars.count)
            }
        }
    }

    public func pushBytes(_ value: [UInt8]) {
        value.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { chars in
                _ = lua_pushlstring(pointer, chars.baseAddress, chars.count)
            }
        }
    }

    /// Decodes JSON into a Lua value on top of the stack.
    public func pushJSON(_ bytes: UnsafeRawBufferPointer, limits jsonLimits: JSONLimits) throws(LuaError) {
        var cLimits = cljson_limits(max_depth: jsonLimits.maxDepth, max_bytes: jsonLimits.maxBytes)
        var error = [CChar](repeating: 0, count: 256)
        limits.pointee.enforce_memory_limit = 1
        defer { limits.pointee.enforce_memory_limit = 0 }
        let ok = cljson_decode(pointer, bytes.baseAddress?.assumingMemoryBound(to: CChar.self),
                               bytes.count, &cLimits, &error, error.count)
        if ok == 0 {
            throw LuaError(message: cString(error))
        }
    }

    /// Decodes JSON held in an array into a Lua value on top of the stack.
    public func pushJSON(_ bytes: [UInt8], limits jsonLimits: JSONLimits) throws(LuaError) {
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(LuaError) in try pushJSON(raw, limits: jsonLimits) }
        }
        try result.get()
    }

    /// Encodes the value at `index` as JSON.
    public func encodeJSON(at index: Int32, sortKeys: Bool = false,
                           maxDepth: Int = 64) throws(LuaError) -> [UInt8] {
        var buffer = cljson_buffer()
        defer { cljson_buffer_free(&buffer) }
        var error = [CChar](repeating: 0, count: 256)
        let flags: Int32 = sortKeys ? Int32(CLJSON_SORT_KEYS) : 0
        if cljson_encode(pointer, index, &buffer, flags, maxDepth, &error, error.count) == 0 {
            throw LuaError(message: cString(error))
        }
        return Array(UnsafeRawBufferPointer(start: buffer.data, count: buffer.length))
    }

    /// Stores the value on top of the stack in the registry and returns its reference.
    public func popReference() -> Int32 {
        luaL_ref(pointer, clua_registryindex())
    }

    public func pushReference(_ reference: Int32) {
        _ = clua_getglobal_registry(pointer, reference)
    }

    public var top: Int32 {
        get { lua_gettop(pointer) }
        set { lua_settop(pointer, newValue) }
    }

    public func pop(_ count: Int32 = 1) {
        clua_pop(pointer, count)
    }
}

@available(*, unavailable)
extension LuaState: Sendable {}

/// Limits the JSON decoder applies to event payloads.
public struct JSONLimits: Sendable, Equatable {
    /// Deepest nesting of arrays and objects accepted.
    public var maxDepth: Int
    /// Largest payload accepted, in bytes.
    public var maxBytes: Int

    public init(maxDepth: Int = 64, maxBytes: Int = 1 << 20) {
        self.maxDepth = maxDepth
        self.maxBytes = maxBytes
    }
}

/// The text of a NUL-terminated C buffer filled by a C call.
func cString(_ buffer: [CChar]) -> String {
    let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
    return String(decoding: bytes, as: UTF8.self)
}
