import Foundation
import HostAPI

/// Keyed projection state kept in Redis and cached in memory while this process owns the
/// partitions, so that state survives restarts and moves with a partition to its next owner.
///
/// Redis layout: one hash per scope, `prt:state:{<namespace>}:<projection>:<topic>:<partition>`,
/// with the state key as field and `<expiresAtMs>:<json>` as value, where `expiresAtMs` is 0
/// for a key without TTL. The namespace is the consumer group id, so groups do not share
/// state. TTLs per hash field (HEXPIRE) need Redis 7.4 and Debian 12 ships 7.0, so the store
/// skips expired fields when it loads a scope or reads a key, and queues an HDEL for them.
///
/// The namespace is a Redis Cluster hash tag, so all state and stored offsets of one group
/// (see `RedisOffsetStore`) hash to one slot. The projections' own Redis keys hash elsewhere,
/// and on Cluster one MULTI/EXEC cannot contain keys of several slots. Writing effects, state
/// and offsets atomically therefore needs a single Redis primary, not a Cluster.
///
/// Use from the worker, in this order for each batch:
/// 1. `ensureLoaded(_:nowMs:)` with every scope the batch can touch. `value(scope:key:nowMs:)`
///    runs inside Lua handlers and never does I/O: it reads only the cache, and it returns nil
///    for a scope that was never loaded.
/// 2. Run the handlers, which call `apply(scope:changes:nowMs:)`. That updates the cache and
///    queues the writes.
/// 3. `takePendingCommands()`, and run the commands in the batch's MULTI/EXEC with the
///    projections' effects and `RedisOffsetStore.command(for:)`.
/// 4. If the transaction fails, or the batch is abandoned, call `forget(_:)` for its
///    partitions, because the cache is then ahead of Redis. Call it after a revoke too.
///    After an I/O error or timeout EXEC may have run, so resume those partitions from
///    `RedisOffsetStore.storedOffsets(_:)`, not from the batch's own offsets.
///
/// Memory: every cached key costs two heap arrays (its key and its JSON) and a dictionary
/// slot, for as long as the partition is owned. A standalone test of this layout with 100,000
/// keys of about 20 bytes and 40-byte values grew RSS by 22 MiB (Swift 6.3 release build,
/// Linux x86-64). There is no cap.
///
/// One worker owns the store and its connection, so it is not `Sendable`.
public final class RedisStateStore: KeyedStateStore {
    /// A cached value and its expiry in wall-clock milliseconds, nil for no TTL.
    struct Entry: Equatable {
        var value: [UInt8]
        /// The expiry, 0 for none as in the stored form. A plain Int64 keeps the entry at 16
        /// bytes, where an optional would pad it to 24 in every cached dictionary slot.
        private var storedExpiresAtMs: Int64

        var expiresAtMs: Int64? {
            storedExpiresAtMs == 0 ? nil : storedExpiresAtMs
        }

        /// Creates an entry. An expiry of 0 means none, as in the stored form.
        init(value: [UInt8], expiresAtMs: Int64?) {
            self.value = value
            self.storedExpiresAtMs = expiresAtMs ?? 0
        }
    }

    /// A write queued for the next transaction. Only the last write of a field is kept.
    enum PendingWrite: Equatable {
        case set(Entry)
        case delete
    }

    public let connection: RedisConnection
    public let namespace: String

    /// The contents of a loaded scope and the name of its hash.
    final class ScopeEntries {
        var entries: [[UInt8]: Entry]
        let redisKey: [UInt8]

        init(entries: [[UInt8]: Entry], redisKey: [UInt8]) {
            self.entries = entries
            self.redisKey = redisKey
        }
    }

    /// The queued writes of one scope, by field.
    final class ScopeWrites {
        var writes: [[UInt8]: PendingWrite] = [:]
    }

    /// The contents of each loaded scope. A scope without an entry has not been loaded.
    private var cache: [StateScope: ScopeEntries] = [:]
    /// Writes not yet handed out by `takePendingCommands()`, per scope and field.
    private var pending: [StateScope: ScopeWrites] = [:]

    /// The scope of the last read or write with its cache and queued writes, because a
    /// handler usually reads and writes one scope several times in a row. Comparing scopes
    /// is cheaper than hashing one. Cleared when a scope leaves `cache` or `pending` or enters
    /// `cache`, and set by `queue` when it adds the first write of a scope.
    private var recentScope: StateScope?
    private var recentEntries: ScopeEntries?
    private var recentWrites: ScopeWrites?

    /// The COUNT hint of each HSCAN call. The SCAN documentation says that a small
    /// (listpack-encoded) hash usually comes whole in the first reply, whatever the hint.
    static let scanCount = 1000
    /// The maximum number of fields in one queued HSET or HDEL. Larger batches become several
    /// commands, which bounds the size of one command, and MULTI/EXEC keeps them atomic.
    static let maxFieldsPerCommand = 1000

    /// Creates a store. `namespace` is the consumer group id.
    public init(connection: RedisConnection, namespace: String) {
        self.connection = connection
        self.namespace = namespace
    }

    /// Returns the name of the hash that contains the state of `scope`.
    public func redisKey(for scope: StateScope) -> String {
        "prt:state:\(RedisStateKeys.hashTag(namespace)):\(scope.projection):\(scope.topic):\(scope.partition)"
    }

    /// Returns whether `scope` is in the cache, so that `value(scope:key:nowMs:)` can read it.
    public func isLoaded(_ scope: StateScope) -> Bool {
        cache[scope] != nil
    }

    /// The number of keys cached across all loaded scopes, expired ones included until they
    /// are read.
    public var cachedKeyCount: Int {
        cache.values.reduce(0) { $0 + $1.entries.count }
    }

    // MARK: - KeyedStateStore

    /// Returns the cached value of `key`, or nil when it is absent, expired at `nowMs`, or its
    /// scope has not been loaded. An expired value is dropped and an HDEL is queued for it.
    public func value(scope: StateScope, key: [UInt8], nowMs: Int64) -> [UInt8]? {
        lookUp(scope)
        guard let scopeEntries = recentEntries, let entry = scopeEntries.entries[key] else { return nil }
        if let expiresAtMs = entry.expiresAtMs, expiresAtMs <= nowMs {
            scopeEntries.entries[key] = nil
            queue(.delete, scope: scope, field: key)
            return nil
        }
        return entry.value
    }

    /// Applies the changes of one handler call to the cache and queues the matching HSET or
    /// HDEL. A TTL that has already run out at `nowMs` is written as a delete.
    ///
    /// A scope that was not loaded keeps only the queued writes, and `ensureLoaded` puts them
    /// over what it reads from Redis.
    public func apply(scope: StateScope, changes: [StateChange], nowMs: Int64) {
        for change in changes {
            let write = Self.pendingWrite(for: change, nowMs: nowMs)
            queue(write, scope: scope, field: change.key)
            guard let scopeEntries = recentEntries else { continue }
            switch write {
            case .set(let entry): scopeEntries.entries[change.key] = entry
            case .delete: scopeEntries.entries[change.key] = nil
            }
        }
    }

    // MARK: - Loading and forgetting

    /// Loads every scope of `scopes` that is not cached yet, with HSCAN calls pipelined across
    /// the scopes. Fields expired at `nowMs` are not cached, and HDELs for them are queued.
    ///
    /// Throws when Redis fails or a key is not a hash. The scopes loaded before the failure
    /// stay loaded, and the call can be repeated.
    public func ensureLoaded(_ scopes: Set<StateScope>,
                             nowMs: Int64 = Int64(Date().timeIntervalSince1970 * 1000)) throws(RedisError) {
        let started = ContinuousClock.now
        var scans = scopes.filter { cache[$0] == nil }
            .map { ScopeScan(scope: $0, key: Array(redisKey(for: $0).utf8)) }
            .sorted { $0.key.lexicographicallyPrecedes($1.key) }
        guard !scans.isEmpty else { return }
        let scopeCount = scans.count
        var totals = ScopeScan.Totals()

        while !scans.isEmpty {
            let replies = try connection.pipeline(scans.map(\.nextCommand))
            var unfinished: [ScopeScan] = []
            for (scan, reply) in zip(scans, replies) {
                var scan = scan
                let page = try scanPage(reply, key: scan.key)
                scan.record(page.fields, nowMs: nowMs)
                if page.cursor == Self.finalCursor {
                    finish(scan, totals: &totals)
                } else {
                    scan.cursor = page.cursor
                    unfinished.append(scan)
                }
            }
            scans = unfinished
        }

        let elapsed = started.duration(to: .now).components
        let elapsedMs = elapsed.seconds * 1000 + elapsed.attoseconds / 1_000_000_000_000_000
        Log.shared.info("Keyed state loaded from Redis", [
            "redis.endpoint": .string(connection.endpoint), "scopes": .int(scopeCount),
            "keys": .int(totals.keys), "expired_keys": .int(totals.expired),
            "duration_ms": .int(elapsedMs),
        ])
    }

    /// Drops the cached scopes and the queued writes of `partitions`, for every projection.
    /// The next `ensureLoaded` reads them from Redis again.
    public func forget(_ partitions: [TopicPartition]) {
        let dropped = Set(partitions)
        let belongs = { (scope: StateScope) in dropped.contains(TopicPartition(scope.topic, scope.partition)) }
        cache = cache.filter { !belongs($0.key) }
        pending = pending.filter { !belongs($0.key) }
        forgetRecentScope()
    }

    /// Drops every cached scope and every queued write.
    public func forgetAll() {
        cache.removeAll()
        pending.removeAll()
        forgetRecentScope()
    }

    // MARK: - Writes for the batch transaction

    /// Returns the queued writes as HSET and HDEL commands and clears the queue. Each field
    /// appears once, with its last write, so the order of the commands does not matter.
    ///
    /// The cache already contains these writes. When the transaction that runs them fails,
    /// the caller has to `forget` the partitions involved.
    public func takePendingCommands() -> [RedisCommand] {
        let scopes = pending.keys.sorted { ($0.projection, $0.topic, $0.partition) < ($1.projection, $1.topic, $1.partition) }
        var commands: [RedisCommand] = []
        for scope in scopes {
            guard let writes = pending[scope] else { continue }
            let key = cache[scope]?.redisKey ?? Array(redisKey(for: scope).utf8)
            commands += Self.commands(for: writes.writes, key: key)
        }
        pending.removeAll()
        forgetRecentScope()
        return commands
    }

    /// The number of fields with a queued write.
    public var pendingWriteCount: Int {
        pending.values.reduce(0) { $0 + $1.writes.count }
    }

    // MARK: - Helpers

    private func queue(_ write: PendingWrite, scope: StateScope, field: [UInt8]) {
        lookUp(scope)
        if let recentWrites {
            recentWrites.writes[field] = write
        } else {
            let writes = ScopeWrites()
            writes.writes[field] = write
            pending[scope] = writes
            recentWrites = writes
        }
    }

    /// Makes `scope` the recent scope, looking up its cache and queued writes unless it is
    /// the recent one already.
    private func lookUp(_ scope: StateScope) {
        if let recentScope, recentScope == scope {
            return
        }
        recentScope = scope
        recentEntries = cache[scope]
        recentWrites = pending[scope]
    }

    private func forgetRecentScope() {
        recentScope = nil
        recentEntries = nil
        recentWrites = nil
    }

    /// Caches a fully scanned scope with the queued writes on top, and queues HDELs for its
    /// expired fields.
    private func finish(_ scan: ScopeScan, totals: inout ScopeScan.Totals) {
        var entries = scan.entries
        let writes = pending[scan.scope]?.writes ?? [:]
        for (field, write) in writes {
            switch write {
            case .set(let entry): entries[field] = entry
            case .delete: entries[field] = nil
            }
        }
        for field in scan.expiredFields where writes[field] == nil {
            queue(.delete, scope: scan.scope, field: field)
        }
        cache[scan.scope] = ScopeEntries(entries: entries, redisKey: scan.key)
        forgetRecentScope()

        totals.keys += entries.count
        totals.expired += scan.expiredFields.count
        if scan.invalidFieldCount > 0 {
            // The fields stay in Redis for inspection, and the next write of such a key
            // replaces them.
            Log.shared.warn("Keyed state fields with an invalid value were ignored", [
                "redis.key": .string(String(decoding: scan.key, as: UTF8.self)),
                "fields": .int(scan.invalidFieldCount),
            ])
        }
    }

    private static let finalCursor = Array("0".utf8)

    /// Splits an HSCAN reply into the next cursor and the field-value pairs.
    private func scanPage(_ reply: RedisReply, key: [UInt8]) throws(RedisError) -> (cursor: [UInt8], fields: [RedisReply]) {
        let keyText = String(decoding: key, as: UTF8.self)
        if case .error(let message) = reply {
            throw RedisError(kind: .reply, endpoint: connection.endpoint, command: "HSCAN \(keyText)",
                             message: "Redis at \(connection.endpoint) rejected HSCAN \(keyText): \(redactedServerError(message)). Keyed state needs this key to be a hash; delete or rename the key.")
        }
        guard case .array(let parts) = reply, parts.count == 2,
              case .string(let cursor) = parts[0], case .array(let fields) = parts[1], fields.count % 2 == 0
        else {
            throw RedisError(kind: .protocol, endpoint: connection.endpoint, command: "HSCAN \(keyText)",
                             message: "Redis at \(connection.endpoint) sent an unexpected reply to HSCAN \(keyText): expected a cursor and an even number of fields and values")
        }
        return (cursor, fields)
    }

    static func pendingWrite(for change: StateChange, nowMs: Int64) -> PendingWrite {
        guard let value = change.value else { return .delete }
        guard let ttlMs = change.ttlMs else { return .set(Entry(value: value, expiresAtMs: nil)) }

        if ttlMs <= 0 {
            return .delete
        }
        // A TTL so long that the sum overflows is stored as the latest possible expiry.
        let (sum, overflow) = nowMs.addingReportingOverflow(ttlMs)
        let expiresAtMs = overflow ? Int64.max : sum
        // 0 means "no TTL" in the stored form, so an expiry at or before 1970 (only possible
        // with a negative `nowMs`) is stored as 1 ms after it.
        return .set(Entry(value: value, expiresAtMs: max(expiresAtMs, 1)))
    }

    static func commands(for writes: [[UInt8]: PendingWrite], key: [UInt8]) -> [RedisCommand] {
        var sets: [[UInt8]] = []
        sets.reserveCapacity(2 * writes.count)
        var deletes: [[UInt8]] = []
        for (field, write) in writes {
            switch write {
            case .set(let entry):
                sets.append(field)
                sets.append(StoredStateValue.encode(entry))
            case .delete:
                deletes.append(field)
            }
        }

        var commands: [RedisCommand] = []
        for start in stride(from: 0, to: sets.count, by: 2 * maxFieldsPerCommand) {
            let chunk = sets[start..<min(start + 2 * maxFieldsPerCommand, sets.count)]
            commands.append(.arguments(command(hsetName, key: key, fields: chunk)))
        }
        for start in stride(from: 0, to: deletes.count, by: maxFieldsPerCommand) {
            let chunk = deletes[start..<min(start + maxFieldsPerCommand, deletes.count)]
            commands.append(.arguments(command(hdelName, key: key, fields: chunk)))
        }
        return commands
    }

    private static let hsetName = Array("HSET".utf8)
    private static let hdelName = Array("HDEL".utf8)

    private static func command(_ name: [UInt8], key: [UInt8], fields: ArraySlice<[UInt8]>) -> [[UInt8]] {
        var arguments: [[UInt8]] = []
        arguments.reserveCapacity(2 + fields.count)
        arguments.append(name)
        arguments.append(key)
        arguments.append(contentsOf: fields)
        return arguments
    }
}

@available(*, unavailable)
extension RedisStateStore: Sendable {}

/// The progress of loading one scope with HSCAN.
private struct ScopeScan {
    struct Totals {
        var keys = 0
        var expired = 0
    }

    let scope: StateScope
    let key: [UInt8]
    var cursor: [UInt8] = Array("0".utf8)
    var entries: [[UInt8]: RedisStateStore.Entry] = [:]
    /// A set, because HSCAN may return a field more than once.
    var expiredFields: Set<[UInt8]> = []
    var invalidFieldCount = 0

    init(scope: StateScope, key: [UInt8]) {
        self.scope = scope
        self.key = key
    }

    var nextCommand: RedisCommand {
        .arguments([Array("HSCAN".utf8), key, cursor, Array("COUNT".utf8), Array(String(RedisStateStore.scanCount).utf8)])
    }

    /// Records the field-value pairs of one HSCAN page.
    mutating func record(_ fields: [RedisReply], nowMs: Int64) {
        for index in stride(from: 0, to: fields.count, by: 2) {
            guard case .string(let field) = fields[index], case .string(let stored) = fields[index + 1],
                  let entry = StoredStateValue.decode(stored)
            else {
                invalidFieldCount += 1
                continue
            }
            if let expiresAtMs = entry.expiresAtMs, expiresAtMs <= nowMs {
                expiredFields.insert(field)
            } else {
                entries[field] = entry
            }
        }
    }
}

/// The stored form of a state value: the expiry in milliseconds since 1970 (0 for none) in
/// decimal, a colon, and the JSON bytes.
enum StoredStateValue {
    private static let colon = UInt8(ascii: ":")
    /// Int64.max has 19 digits.
    private static let maxExpiryDigits = 19

    static func encode(_ entry: RedisStateStore.Entry) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(maxExpiryDigits + 1 + entry.value.count)
        RESPWriter.appendDecimal(entry.expiresAtMs ?? 0, to: &bytes)
        bytes.append(colon)
        bytes.append(contentsOf: entry.value)
        return bytes
    }

    /// Returns nil when `bytes` does not start with 1 to 19 digits and a colon, or the
    /// number does not fit in Int64.
    static func decode(_ bytes: [UInt8]) -> RedisStateStore.Entry? {
        guard let colonIndex = bytes.prefix(maxExpiryDigits + 1).firstIndex(of: colon), colonIndex > 0 else {
            return nil
        }
        var expiresAtMs: Int64 = 0
        for byte in bytes[..<colonIndex] {
            guard (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) else { return nil }
            let (shifted, overflowA) = expiresAtMs.multipliedReportingOverflow(by: 10)
            let (sum, overflowB) = shifted.addingReportingOverflow(Int64(byte - UInt8(ascii: "0")))
            guard !overflowA, !overflowB else { return nil }
            expiresAtMs = sum
        }
        let value = Array(bytes[(colonIndex + 1)...])
        return RedisStateStore.Entry(value: value, expiresAtMs: expiresAtMs == 0 ? nil : expiresAtMs)
    }
}

/// Key names shared by `RedisStateStore` and `RedisOffsetStore`.
enum RedisStateKeys {
    /// Returns the namespace in braces, as a Redis Cluster hash tag. Cluster hashes the text
    /// between the first `{` and the next `}`. A `}` in the namespace would end the tag early
    /// and let two namespaces share a key, so `%`, `{` and `}` are percent-encoded.
    ///
    /// NOTE: an empty namespace gives the empty tag `{}`, which Cluster ignores, so state and
    /// offsets of that group would hash to different slots.
    static func hashTag(_ namespace: String) -> String {
        var escaped = ""
        for character in namespace {
            switch character {
            case "%": escaped += "%25"
            case "{": escaped += "%7B"
            case "}": escaped += "%7D"
            default: escaped.append(character)
            }
        }
        return "{\(escaped)}"
    }
}
