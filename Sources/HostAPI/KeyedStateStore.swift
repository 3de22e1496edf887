/// The scope of keyed state: one projection and one Kafka topic partition. State moves with the
/// partition when a rebalance hands the partition to another process.
public struct StateScope: Hashable, Sendable {
    public var projection: String
    public var topic: String
    public var partition: Int32

    public init(projection: String, topic: String, partition: Int32) {
        self.projection = projection
        self.topic = topic
        self.partition = partition
    }
}

/// Where keyed projection state lives between events. Implementations are owned by one worker
/// thread, like the Lua states that read them.
public protocol KeyedStateStore: AnyObject {
    /// The value of `key` as JSON, or nil when absent or expired at `nowMs`.
    func value(scope: StateScope, key: [UInt8], nowMs: Int64) -> [UInt8]?

    /// Applies the changes of one successful handler call, in order; TTLs count from `nowMs`.
    func apply(scope: StateScope, changes: [StateChange], nowMs: Int64)
}

/// Keyed state held in process memory. It survives hot reload because it lives outside the
/// Lua states, but not a restart.
public final class InMemoryStateStore: KeyedStateStore {
    private struct Entry {
        var value: [UInt8]
        var expiresAtMs: Int64?
    }

    private var scopes: [StateScope: [[UInt8]: Entry]] = [:]

    public init() {}

    public func value(scope: StateScope, key: [UInt8], nowMs: Int64) -> [UInt8]? {
        guard let entry = scopes[scope]?[key] else { return nil }
        if let expiry = entry.expiresAtMs, expiry <= nowMs {
            scopes[scope]?[key] = nil
            return nil
        }
        return entry.value
    }

    public func apply(scope: StateScope, changes: [StateChange], nowMs: Int64) {
        for change in changes {
            if let value = change.value {
                let entry = Entry(value: value, expiresAtMs: change.ttlMs.map { nowMs + $0 })
                scopes[scope, default: [:]][change.key] = entry
            } else {
                scopes[scope]?[change.key] = nil
            }
        }
    }

    /// Every live key of a scope, sorted, for tests and the offline runner.
    public func snapshot(scope: StateScope) -> [(key: [UInt8], value: [UInt8])] {
        let entries = scopes[scope] ?? [:]
        return entries.map { ($0.key, $0.value.value) }.sorted { $0.key.lexicographicallyPrecedes($1.key) }
    }

    /// Number of keys across all scopes.
    public var count: Int { scopes.values.reduce(0) { $0 + $1.count } }
}
