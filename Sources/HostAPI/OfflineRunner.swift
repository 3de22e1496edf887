import CLua

/// Runs the lines of an events file through a projection set without any server and returns the
/// effects as deterministic JSON lines: `projection-runtime test`.
///
/// Each line is either a bare payload (when a topic is given) or an envelope
/// `{"topic": ..., "value": {...}, "key": ..., "partition": ..., "offset": ...,
/// "timestamp_ms": ..., "headers": {...}}`. A bad line is reported with its number and the run
/// goes on. Keyed state lives in memory for the whole run, and the clock is fixed at 0, so the
/// same input always gives the same output.
public final class OfflineRunner {
    private let runner: ProjectionRunner
    private let store = InMemoryStateStore()
    private let envelopes: EnvelopeReader
    private let formatter = EffectFormatter()
    private let defaultTopic: String?
    private var nextOffsets: [String: Int64] = [:]

    /// Failures met so far, input lines included.
    public private(set) var errorCount = 0

    public init(set: ProjectionSet, settings: HostSettings, topic: String?) throws(LuaError) {
        self.runner = ProjectionRunner(set: set, settings: settings)
        self.envelopes = try EnvelopeReader(limits: settings.jsonLimits)
        self.defaultTopic = topic
    }

    /// The statements and logs each projection's `init` queued, as output lines numbered 0.
    public func initLines() -> [String] {
        runner.set.projections.flatMap { definition in
            definition.initEffects.map { effect in
                formatter.format(effect, origin: .init(line: 0, projection: definition.name))
            }
        }
    }

    /// Handles one line of the events file (`number` counts from 1).
    public func run(line: [UInt8], number: Int) -> [String] {
        if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0d }) {
            return []
        }
        var message: EventMessage
        do {
            message = try envelopes.message(from: line, defaultTopic: defaultTopic)
        } catch {
            errorCount += 1
            return [formatter.formatInputError(error.message, line: number)]
        }
        let counterKey = "\(message.topic)\u{0}\(message.partition)"
        if message.offset < 0 {
            message.offset = nextOffsets[counterKey] ?? 0
        }
        nextOffsets[counterKey] = message.offset + 1

        var lines: [String] = []
        for result in runner.handle(message, store: store, nowMs: 0) {
            let origin = EffectFormatter.Origin(line: number, topic: message.topic,
                                                partition: message.partition,
                                                offset: message.offset, projection: result.projection)
            switch result.outcome {
            case .handled(let effects):
                lines += effects.map { formatter.format($0, origin: origin) }
            case .failed(let failure):
                errorCount += 1
                lines.append(formatter.format(failure, origin: origin))
            }
        }
        return lines
    }

    /// The keyed state left at the end, for inspection.
    public var stateStore: InMemoryStateStore { store }
}

/// Reads events-file lines into messages with the one JSON codec, in a plain Lua state that
/// runs no projection code.
final class EnvelopeReader {
    private let state: LuaState
    private let limits: JSONLimits

    init(limits: JSONLimits) throws(LuaError) {
        self.state = try LuaState(limits: LuaLimits(memoryBytes: 0, instructionsPerCall: 0))
        self.limits = limits
    }

    func message(from line: [UInt8], defaultTopic: String?) throws(LuaError) -> EventMessage {
        if let topic = defaultTopic {
            return EventMessage(topic: topic, offset: -1, payload: line)
        }
        let base = state.top
        defer { state.top = base }
        try state.pushJSON(line, limits: limits)
        let L = state.pointer
        guard lua_type(L, -1) == LUA_TTABLE, field("value") != LUA_TNIL else {
            throw LuaError(message: "no topic for this line: pass --topic, or write each line as {\"topic\": ..., \"value\": {...}}")
        }
        let payload = try state.encodeJSON(at: -1)
        state.pop()

        guard field("topic") == LUA_TSTRING, let topic = state.string(at: -1), !topic.isEmpty else {
            throw LuaError(message: "the envelope's \"topic\" must be a non-empty string")
        }
        state.pop()
        var message = EventMessage(topic: topic, offset: -1, payload: payload)
        message.partition = Int32(truncatingIfNeeded: try integerField("partition") ?? 0)
        message.offset = try integerField("offset") ?? -1
        message.timestampMs = try integerField("timestamp_ms")
        if field("key") == LUA_TSTRING {
            message.key = state.bytes(at: -1)
        }
        state.pop()
        message.headers = try headers()
        return message
    }

    private func field(_ name: String) -> Int32 {
        state.pushString(name)
        return lua_rawget(state.pointer, -2)
    }

    private func integerField(_ name: String) throws(LuaError) -> Int64? {
        defer { state.pop() }
        switch field(name) {
        case LUA_TNIL:
            return nil
        case LUA_TNUMBER where lua_isinteger(state.pointer, -1) != 0:
            return clua_tointegerx(state.pointer, -1, nil)
        default:
            throw LuaError(message: "the envelope's \"\(name)\" must be an integer")
        }
    }

    private func headers() throws(LuaError) -> [(name: String, value: [UInt8]?)] {
        let L = state.pointer
        defer { state.pop() }
        switch field("headers") {
        case LUA_TNIL:
            return []
        case LUA_TTABLE:
            break
        default:
            throw LuaError(message: "the envelope's \"headers\" must be an object of strings")
        }
        var headers: [(name: String, value: [UInt8]?)] = []
        lua_pushnil(L)
        while lua_next(L, -2) != 0 {
            defer { state.pop() }
            guard lua_type(L, -2) == LUA_TSTRING, lua_type(L, -1) == LUA_TSTRING else {
                throw LuaError(message: "the envelope's \"headers\" must be an object of strings")
            }
            headers.append((state.string(at: -2) ?? "", state.bytes(at: -1)))
        }
        return headers.sorted { $0.name < $1.name }
    }
}
