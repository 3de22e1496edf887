import CLua
import Glibc

/// The host side of one projection state: what its `ctx` functions record and read.
///
/// It is reached from Lua through an unretained pointer held by the ctx closures, so the
/// `ProjectionInstance` that owns both keeps it alive until its Lua state is closed.
final class ProjectionScope {
    var projection: String
    var scripts: [String: RedisScript]

    /// Effects of the call in progress, in the order the projection made them.
    var effects: [Effect] = []
    /// State writes of the call in progress, visible to its own reads before they are applied.
    var pendingState: [[UInt8]: StateChange] = [:]
    var stateStore: KeyedStateStore?
    var stateScope: StateScope?
    var nowMs: Int64 = 0
    var queryBackend: QueryBackend?
    /// Encode rows and state values with sorted keys (offline runs, golden files).
    var sortObjectKeys = false

    private var scratch = ScratchBuffer()

    init(projection: String, scripts: [String: RedisScript]) {
        self.projection = projection
        self.scripts = scripts
    }

    deinit {
        scratch.release()
    }

    /// Clears what a previous call left and points state reads at `store` for `scope`.
    func begin(store: KeyedStateStore?, scope: StateScope?, nowMs: Int64) {
        effects.removeAll(keepingCapacity: true)
        pendingState.removeAll(keepingCapacity: true)
        stateStore = store
        stateScope = scope
        self.nowMs = nowMs
    }

    func stateValue(key: [UInt8]) -> [UInt8]? {
        if let pending = pendingState[key] {
            return pending.value
        }
        guard let store = stateStore, let scope = stateScope else { return nil }
        return store.value(scope: scope, key: key, nowMs: nowMs)
    }

    func recordState(_ change: StateChange) {
        pendingState[change.key] = change
        effects.append(.state(change))
    }

    /// Hands `bytes` to the trampoline as the result `kind`; they stay valid until the next call.
    func finish(_ result: UnsafeMutablePointer<clua_result>, kind: Int32, bytes: [UInt8]) {
        let stored = scratch.store(bytes)
        result.pointee.kind = kind
        result.pointee.data = stored.pointer
        result.pointee.length = stored.count
    }

    func fail(_ result: UnsafeMutablePointer<clua_result>, _ message: String) {
        finish(result, kind: Int32(CLUA_RESULT_ERROR), bytes: Array(message.utf8))
    }
}

/// A malloc'd byte buffer whose address stays put until the next `store`, so C can read it after
/// the Swift host function returned.
private struct ScratchBuffer {
    private var pointer: UnsafeMutablePointer<CChar>?
    private var capacity = 0

    mutating func store(_ bytes: [UInt8]) -> (pointer: UnsafePointer<CChar>?, count: Int) {
        if bytes.count > capacity {
            capacity = max(bytes.count, capacity * 2, 256)
            pointer = realloc(pointer, capacity)?.assumingMemoryBound(to: CChar.self)
        }
        guard let pointer else { return (nil, 0) }
        bytes.withUnsafeBytes { raw in
            if let base = raw.baseAddress {
                memcpy(pointer, base, raw.count)
            }
        }
        return (UnsafePointer(pointer), bytes.count)
    }

    mutating func release() {
        free(pointer)
        pointer = nil
        capacity = 0
    }
}

/// Access to the Redis and ClickHouse reads that queries make. The runtime supplies the real
/// clients; tests supply fakes.
public protocol QueryBackend: AnyObject {
    /// Runs a read command; `arguments[0]` is the command name in upper case.
    func redis(_ arguments: [[UInt8]]) -> QueryReply
    /// Runs a SELECT and returns an array of rows, each an array of (column, value) pairs.
    func clickhouse(_ sql: String) -> QueryReply
}

/// A reply handed to a query, pushed into Lua as nil, integer, float, string, boolean or array.
public indirect enum QueryReply: Sendable, Equatable {
    case null
    case integer(Int64)
    case number(Double)
    case bytes([UInt8])
    case boolean(Bool)
    case array([QueryReply])
    /// A JSON value, decoded into Lua tables by the codec (ClickHouse rows).
    case json([UInt8])
    /// Raised in the query as a Lua error with this message.
    case error(String)

    /// Serializes the reply in the form `clua_push_reply` reads.
    func serialize(into out: inout [UInt8]) {
        switch self {
        case .null:
            out.append(UInt8(ascii: "n"))
        case .integer(let value):
            out.append(UInt8(ascii: "i"))
            withUnsafeBytes(of: value.littleEndian) { out.append(contentsOf: $0) }
        case .number(let value):
            out.append(UInt8(ascii: "d"))
            withUnsafeBytes(of: value) { out.append(contentsOf: $0) }
        case .json(let value):
            out.append(UInt8(ascii: "j"))
            appendLength(value.count, to: &out)
            out.append(contentsOf: value)
        case .bytes(let value):
            out.append(UInt8(ascii: "s"))
            appendLength(value.count, to: &out)
            out.append(contentsOf: value)
        case .boolean(let value):
            out.append(UInt8(ascii: value ? "t" : "f"))
        case .array(let items):
            out.append(UInt8(ascii: "a"))
            appendLength(items.count, to: &out)
            for item in items {
                item.serialize(into: &out)
            }
        case .error(let message):
            out.append(UInt8(ascii: "e"))
            appendLength(message.utf8.count, to: &out)
            out.append(contentsOf: message.utf8)
        }
    }

    private func appendLength(_ count: Int, to out: inout [UInt8]) {
        withUnsafeBytes(of: UInt32(truncatingIfNeeded: count).littleEndian) {
            out.append(contentsOf: $0)
        }
    }
}
