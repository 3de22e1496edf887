import Foundation
import HostAPI
import XCTest

@testable import Runtime

/// RedisStateStore and RedisOffsetStore against a real redis-server that each test starts.
final class RedisStateStoreTests: XCTestCase {
    private let scope = StateScope(projection: "orders", topic: "events", partition: 3)
    private let group = "group-a"
    /// A fixed wall-clock time in the past, so that TTLs are easy to place around it.
    private let now: Int64 = 1_700_000_000_000

    private func bytes(_ text: String) -> [UInt8] {
        Array(text.utf8)
    }

    private func text(_ value: [UInt8]?) -> String? {
        value.map { String(decoding: $0, as: UTF8.self) }
    }

    private func connection(to server: LocalRedis) -> RedisConnection {
        RedisConnection(settings: RedisSettings(port: server.port, commandTimeoutMs: 5000))
    }

    private func put(_ key: String, _ json: String, ttlMs: Int64? = nil) -> StateChange {
        StateChange(key: bytes(key), value: bytes(json), ttlMs: ttlMs)
    }

    private func delete(_ key: String) -> StateChange {
        StateChange(key: bytes(key), value: nil)
    }

    /// Runs the store's pending commands in one transaction, as the worker does.
    private func commit(_ store: RedisStateStore) throws {
        let commands = store.takePendingCommands()
        _ = try store.connection.transaction(commands)
    }

    /// Returns the raw stored value of one field, or nil when the field is absent.
    private func storedField(_ key: String, _ field: String, on redis: RedisConnection) throws -> String? {
        let reply = try redis.command([bytes("HGET"), bytes(key), bytes(field)])
        if case .string(let value) = reply {
            return text(value)
        }
        XCTAssertEqual(reply, .null)
        return nil
    }

    /// Returns how often the server has run the command `name`, from INFO commandstats.
    private func commandCalls(_ name: String, on redis: RedisConnection) throws -> Int {
        guard case .string(let info) = try redis.command([bytes("INFO"), bytes("commandstats")]) else {
            XCTFail("INFO commandstats did not return a bulk string")
            return -1
        }
        let prefix = "cmdstat_\(name):calls="
        for line in String(decoding: info, as: UTF8.self).split(whereSeparator: \.isNewline) where line.hasPrefix(prefix) {
            return Int(line.dropFirst(prefix.count).prefix { $0.isNumber }) ?? -1
        }
        return 0
    }

    private func exists(_ key: String, on redis: RedisConnection) throws -> Bool {
        try redis.command([bytes("EXISTS"), bytes(key)]) == .integer(1)
    }

    // MARK: - Keyed state

    func testPutGetDeleteRoundTrip() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let writer = RedisStateStore(connection: redis, namespace: group)
        try writer.ensureLoaded([scope], nowMs: now)
        writer.apply(scope: scope, changes: [put("a", #"{"n":1}"#), put("b", "[1,2]"), put("gone", "true")], nowMs: now)
        try commit(writer)
        writer.apply(scope: scope, changes: [delete("gone"), put("c", #""text""#)], nowMs: now)
        try commit(writer)

        let key = "prt:state:{group-a}:orders:events:3"
        XCTAssertEqual(writer.redisKey(for: scope), key)
        XCTAssertEqual(try storedField(key, "a", on: redis), #"0:{"n":1}"#)
        XCTAssertNil(try storedField(key, "gone", on: redis))

        let reader = RedisStateStore(connection: connection(to: server), namespace: group)
        try reader.ensureLoaded([scope], nowMs: now)
        XCTAssertEqual(text(reader.value(scope: scope, key: bytes("a"), nowMs: now)), #"{"n":1}"#)
        XCTAssertEqual(text(reader.value(scope: scope, key: bytes("b"), nowMs: now)), "[1,2]")
        XCTAssertEqual(text(reader.value(scope: scope, key: bytes("c"), nowMs: now)), #""text""#)
        XCTAssertNil(reader.value(scope: scope, key: bytes("gone"), nowMs: now))
        XCTAssertEqual(reader.cachedKeyCount, 3)
        XCTAssertTrue(reader.takePendingCommands().isEmpty)
    }

    func testUnloadedScopeReturnsNil() throws {
        let server = try LocalRedis()
        let writer = RedisStateStore(connection: connection(to: server), namespace: group)
        writer.apply(scope: scope, changes: [put("a", "1")], nowMs: now)
        try commit(writer)

        let reader = RedisStateStore(connection: connection(to: server), namespace: group)
        XCTAssertFalse(reader.isLoaded(scope))
        XCTAssertNil(reader.value(scope: scope, key: bytes("a"), nowMs: now))

        try reader.ensureLoaded([scope], nowMs: now)
        XCTAssertTrue(reader.isLoaded(scope))
        XCTAssertEqual(text(reader.value(scope: scope, key: bytes("a"), nowMs: now)), "1")
    }

    func testWritesBeforeLoadOverlayRedis() throws {
        let server = try LocalRedis()
        let writer = RedisStateStore(connection: connection(to: server), namespace: group)
        writer.apply(scope: scope, changes: [put("kept", "1"), put("replaced", "1"), put("removed", "1")], nowMs: now)
        try commit(writer)

        let store = RedisStateStore(connection: connection(to: server), namespace: group)
        store.apply(scope: scope, changes: [put("replaced", "2"), delete("removed"), put("new", "3")], nowMs: now)
        try store.ensureLoaded([scope], nowMs: now)

        XCTAssertEqual(text(store.value(scope: scope, key: bytes("kept"), nowMs: now)), "1")
        XCTAssertEqual(text(store.value(scope: scope, key: bytes("replaced"), nowMs: now)), "2")
        XCTAssertNil(store.value(scope: scope, key: bytes("removed"), nowMs: now))
        XCTAssertEqual(text(store.value(scope: scope, key: bytes("new"), nowMs: now)), "3")
        XCTAssertEqual(store.pendingWriteCount, 3)
    }

    func testExpiredEntriesSkippedAndDeleted() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let writer = RedisStateStore(connection: redis, namespace: group)
        writer.apply(scope: scope, changes: [
            put("short", "1", ttlMs: 1_000),
            put("long", "2", ttlMs: 60_000),
            put("forever", "3"),
        ], nowMs: now)
        try commit(writer)
        let key = writer.redisKey(for: scope)
        XCTAssertEqual(try storedField(key, "short", on: redis), "\(now + 1_000):1")

        let later = now + 5_000
        let reader = RedisStateStore(connection: redis, namespace: group)
        try reader.ensureLoaded([scope], nowMs: later)
        XCTAssertNil(reader.value(scope: scope, key: bytes("short"), nowMs: later))
        XCTAssertEqual(text(reader.value(scope: scope, key: bytes("long"), nowMs: later)), "2")
        XCTAssertEqual(text(reader.value(scope: scope, key: bytes("forever"), nowMs: later)), "3")
        XCTAssertEqual(reader.cachedKeyCount, 2)

        let deletes = reader.takePendingCommands()
        XCTAssertEqual(deletes, [.arguments([bytes("HDEL"), bytes(key), bytes("short")])])
        _ = try redis.transaction(deletes)
        XCTAssertNil(try storedField(key, "short", on: redis))
        XCTAssertNotNil(try storedField(key, "long", on: redis))
    }

    func testCachedEntryExpiresOnRead() throws {
        let server = try LocalRedis()
        let store = RedisStateStore(connection: connection(to: server), namespace: group)
        try store.ensureLoaded([scope], nowMs: now)
        store.apply(scope: scope, changes: [put("session", "1", ttlMs: 1_000)], nowMs: now)
        try commit(store)

        XCTAssertEqual(text(store.value(scope: scope, key: bytes("session"), nowMs: now + 999)), "1")
        XCTAssertNil(store.value(scope: scope, key: bytes("session"), nowMs: now + 1_000))
        XCTAssertEqual(store.takePendingCommands(),
                       [.arguments([bytes("HDEL"), bytes(store.redisKey(for: scope)), bytes("session")])])
    }

    func testTTLAlreadyOverIsDelete() throws {
        let server = try LocalRedis()
        let store = RedisStateStore(connection: connection(to: server), namespace: group)
        try store.ensureLoaded([scope], nowMs: now)
        store.apply(scope: scope, changes: [put("x", "1", ttlMs: 0), put("y", "1", ttlMs: -5)], nowMs: now)

        XCTAssertNil(store.value(scope: scope, key: bytes("x"), nowMs: now))
        let commands = store.takePendingCommands()
        XCTAssertEqual(commands.count, 1)
        guard case .arguments(let arguments) = commands.first else { return XCTFail("expected one HDEL") }
        XCTAssertEqual(arguments.first, bytes("HDEL"))
        XCTAssertEqual(Set(arguments.dropFirst(2)), [bytes("x"), bytes("y")])
    }

    func testNamespacesIsolate() throws {
        let server = try LocalRedis()
        let storeA = RedisStateStore(connection: connection(to: server), namespace: "group-a")
        let storeB = RedisStateStore(connection: connection(to: server), namespace: "group-b")
        for store in [storeA, storeB] {
            try store.ensureLoaded([scope], nowMs: now)
        }
        storeA.apply(scope: scope, changes: [put("k", #""a""#), put("only-a", "1")], nowMs: now)
        storeB.apply(scope: scope, changes: [put("k", #""b""#)], nowMs: now)
        try commit(storeA)
        try commit(storeB)
        XCTAssertNotEqual(storeA.redisKey(for: scope), storeB.redisKey(for: scope))

        let readerA = RedisStateStore(connection: connection(to: server), namespace: "group-a")
        let readerB = RedisStateStore(connection: connection(to: server), namespace: "group-b")
        try readerA.ensureLoaded([scope], nowMs: now)
        try readerB.ensureLoaded([scope], nowMs: now)
        XCTAssertEqual(text(readerA.value(scope: scope, key: bytes("k"), nowMs: now)), #""a""#)
        XCTAssertEqual(text(readerB.value(scope: scope, key: bytes("k"), nowMs: now)), #""b""#)
        XCTAssertNil(readerB.value(scope: scope, key: bytes("only-a"), nowMs: now))
    }

    func testNamespaceBracesAreEscaped() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        XCTAssertEqual(RedisStateStore(connection: redis, namespace: "a}b{c%").redisKey(for: scope),
                       "prt:state:{a%7Db%7Bc%25}:orders:events:3")
        XCTAssertEqual(RedisOffsetStore(connection: redis, namespace: "a}b").key, "prt:offsets:{a%7Db}")

        // Unescaped, these two would both be prt:state:{a}:b}:c:events:3.
        let first = RedisStateStore(connection: redis, namespace: "a}:b")
        let second = RedisStateStore(connection: redis, namespace: "a")
        XCTAssertNotEqual(first.redisKey(for: StateScope(projection: "c", topic: "events", partition: 3)),
                          second.redisKey(for: StateScope(projection: "b}:c", topic: "events", partition: 3)))
    }

    func testForgetThenReloadSeesNewOwnerWrites() throws {
        let server = try LocalRedis()
        let other = StateScope(projection: "orders", topic: "events", partition: 4)
        let firstOwner = RedisStateStore(connection: connection(to: server), namespace: group)
        try firstOwner.ensureLoaded([scope, other], nowMs: now)
        firstOwner.apply(scope: scope, changes: [put("k", "1")], nowMs: now)
        firstOwner.apply(scope: other, changes: [put("k", "1")], nowMs: now)
        try commit(firstOwner)

        let secondOwner = RedisStateStore(connection: connection(to: server), namespace: group)
        try secondOwner.ensureLoaded([scope], nowMs: now)
        secondOwner.apply(scope: scope, changes: [put("k", "2")], nowMs: now)
        try commit(secondOwner)

        // Uncommitted writes of the forgotten partition are dropped, those of others kept.
        firstOwner.apply(scope: scope, changes: [put("uncommitted", "1")], nowMs: now)
        firstOwner.apply(scope: other, changes: [put("queued", "1")], nowMs: now)
        XCTAssertEqual(text(firstOwner.value(scope: scope, key: bytes("k"), nowMs: now)), "1")
        firstOwner.forget([TopicPartition("events", 3)])
        XCTAssertFalse(firstOwner.isLoaded(scope))
        XCTAssertTrue(firstOwner.isLoaded(other))
        XCTAssertNil(firstOwner.value(scope: scope, key: bytes("k"), nowMs: now))
        XCTAssertEqual(firstOwner.pendingWriteCount, 1)

        try firstOwner.ensureLoaded([scope], nowMs: now)
        XCTAssertEqual(text(firstOwner.value(scope: scope, key: bytes("k"), nowMs: now)), "2")
        XCTAssertNil(firstOwner.value(scope: scope, key: bytes("uncommitted"), nowMs: now))

        firstOwner.forgetAll()
        XCTAssertFalse(firstOwner.isLoaded(scope))
        XCTAssertFalse(firstOwner.isLoaded(other))
        XCTAssertEqual(firstOwner.pendingWriteCount, 0)
        XCTAssertEqual(firstOwner.cachedKeyCount, 0)
    }

    func testRepeatedWritesCoalesce() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let store = RedisStateStore(connection: redis, namespace: group)
        try store.ensureLoaded([scope], nowMs: now)
        for counter in 1...50 {
            store.apply(scope: scope, changes: [put("counter", String(counter))], nowMs: now)
        }
        store.apply(scope: scope, changes: [put("flip", "1"), delete("flip")], nowMs: now)
        store.apply(scope: scope, changes: [delete("back"), put("back", "9")], nowMs: now)
        XCTAssertEqual(store.pendingWriteCount, 3)

        let key = bytes(store.redisKey(for: scope))
        let commands = store.takePendingCommands()
        XCTAssertEqual(commands.count, 2)
        var hsetFields: [String: String] = [:]
        var hdelFields: [String] = []
        for case .arguments(let arguments) in commands {
            XCTAssertEqual(arguments[1], key)
            let rest = arguments.dropFirst(2).map { String(decoding: $0, as: UTF8.self) }
            switch text(arguments[0]) {
            case "HSET":
                for index in stride(from: 0, to: rest.count, by: 2) {
                    hsetFields[rest[index]] = rest[index + 1]
                }
            case "HDEL":
                hdelFields += rest
            default:
                XCTFail("unexpected command \(text(arguments[0]) ?? "")")
            }
        }
        XCTAssertEqual(hsetFields, ["counter": "0:50", "back": "0:9"])
        XCTAssertEqual(hdelFields, ["flip"])
        XCTAssertTrue(store.takePendingCommands().isEmpty)

        _ = try redis.transaction(commands)
        XCTAssertEqual(try storedField(String(decoding: key, as: UTF8.self), "counter", on: redis), "0:50")
    }

    func testLargeBatchSplitsIntoSeveralCommands() throws {
        let server = try LocalRedis()
        let store = RedisStateStore(connection: connection(to: server), namespace: group)
        let count = RedisStateStore.maxFieldsPerCommand * 2 + 1
        store.apply(scope: scope, changes: (0..<count).map { put("k\($0)", "1") }, nowMs: now)

        let commands = store.takePendingCommands()
        XCTAssertEqual(commands.count, 3)
        _ = try store.connection.transaction(commands)
        XCTAssertEqual(try store.connection.command([bytes("HLEN"), bytes(store.redisKey(for: scope))]),
                       .integer(Int64(count)))
    }

    func testInvalidStoredValuesAreIgnored() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let store = RedisStateStore(connection: redis, namespace: group)
        let key = store.redisKey(for: scope)
        _ = try redis.command([bytes("HSET"), bytes(key), bytes("good"), bytes("0:1"), bytes("no-colon"), bytes("{}"),
                               bytes("letters"), bytes("12x:1"), bytes("empty-expiry"), bytes(":1")])

        try store.ensureLoaded([scope], nowMs: now)
        XCTAssertEqual(text(store.value(scope: scope, key: bytes("good"), nowMs: now)), "1")
        XCTAssertEqual(store.cachedKeyCount, 1)
        XCTAssertTrue(store.takePendingCommands().isEmpty)
    }

    func testKeyOfWrongTypeFailsLoad() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let store = RedisStateStore(connection: redis, namespace: group)
        _ = try redis.command([bytes("SET"), bytes(store.redisKey(for: scope)), bytes("text")])

        XCTAssertThrowsError(try store.ensureLoaded([scope], nowMs: now)) { error in
            XCTAssertEqual((error as? RedisError)?.kind, .reply)
            XCTAssertTrue("\(error)".contains("WRONGTYPE"), "\(error)")
        }
        XCTAssertFalse(store.isLoaded(scope))
    }

    func testLoadTenThousandKeys() throws {
        let server = try LocalRedis()
        let writer = RedisStateStore(connection: connection(to: server), namespace: group)
        let count = 10_000
        let value = bytes(#"{"total":12345,"currency":"EUR","items":[1,2,3]}"#)
        writer.apply(scope: scope, changes: (0..<count).map { StateChange(key: bytes("customer-\($0)"), value: value) }, nowMs: now)
        try commit(writer)

        let reader = RedisStateStore(connection: connection(to: server), namespace: group)
        let started = ContinuousClock.now
        try reader.ensureLoaded([scope], nowMs: now)
        let elapsed = started.duration(to: .now)
        print("RedisStateStore loaded \(count) keys of one scope in \(elapsed)")

        XCTAssertEqual(reader.cachedKeyCount, count)
        XCTAssertEqual(reader.value(scope: scope, key: bytes("customer-9999"), nowMs: now), value)
        XCTAssertGreaterThan(try commandCalls("hscan", on: reader.connection), 1, "the load should take several HSCAN pages")
        XCTAssertLessThan(elapsed, .seconds(5))
    }

    // MARK: - Offsets

    func testOffsetsRoundTrip() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let offsets = RedisOffsetStore(connection: redis, namespace: group)
        XCTAssertEqual(offsets.key, "prt:offsets:{group-a}")

        _ = try redis.transaction([offsets.command(for: [TopicPartition("events", 0): 42, TopicPartition("events", 1): 7])])
        _ = try redis.transaction([offsets.command(for: [TopicPartition("events", 1): 8])])

        let stored = try offsets.storedOffsets([TopicPartition("events", 0), TopicPartition("events", 1), TopicPartition("events", 2)])
        XCTAssertEqual(stored, [TopicPartition("events", 0): 42, TopicPartition("events", 1): 8])
        XCTAssertEqual(try offsets.storedOffsets([]), [:])
        XCTAssertEqual(try storedField(offsets.key, "events/0", on: redis), "42")

        let otherGroup = RedisOffsetStore(connection: redis, namespace: "group-b")
        XCTAssertEqual(try otherGroup.storedOffsets([TopicPartition("events", 0)]), [:])
    }

    func testInvalidStoredOffsetThrows() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let offsets = RedisOffsetStore(connection: redis, namespace: group)
        _ = try redis.command([bytes("HSET"), bytes(offsets.key), bytes("events/0"), bytes("-1"), bytes("events/1"), bytes("ten")])

        for partition in [TopicPartition("events", 0), TopicPartition("events", 1)] {
            XCTAssertThrowsError(try offsets.storedOffsets([partition])) { error in
                XCTAssertEqual((error as? RedisError)?.kind, .reply)
                XCTAssertTrue("\(error)".contains("\(partition)"), "\(error)")
            }
        }
    }

    // MARK: - Batch transaction

    func testBatchTransactionIsAllOrNothing() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let store = RedisStateStore(connection: redis, namespace: group)
        let offsets = RedisOffsetStore(connection: redis, namespace: group)
        try store.ensureLoaded([scope], nowMs: now)
        store.apply(scope: scope, changes: [put("k", "1")], nowMs: now)
        let stateCommands = store.takePendingCommands()
        let offsetCommand = offsets.command(for: [TopicPartition("events", 3): 100])
        let effect = RedisCommand.arguments([bytes("SET"), bytes("orders:total"), bytes("5")])
        // HSET with a key and no fields has the wrong number of arguments, so Redis rejects it
        // while queuing and EXEC discards the whole transaction.
        let invalid = RedisCommand.arguments([bytes("HSET"), bytes("orders:broken")])

        XCTAssertThrowsError(try redis.transaction([effect] + stateCommands + [invalid, offsetCommand])) { error in
            XCTAssertEqual((error as? RedisError)?.kind, .transactionAborted)
        }
        XCTAssertFalse(try exists("orders:total", on: redis))
        XCTAssertFalse(try exists(store.redisKey(for: scope), on: redis))
        XCTAssertFalse(try exists(offsets.key, on: redis))
        XCTAssertEqual(try offsets.storedOffsets([TopicPartition("events", 3)]), [:])

        // After a failed transaction the worker calls forget for the batch's partitions and
        // runs the batch again.
        store.forget([TopicPartition("events", 3)])
        try store.ensureLoaded([scope], nowMs: now)
        XCTAssertNil(store.value(scope: scope, key: bytes("k"), nowMs: now))
        store.apply(scope: scope, changes: [put("k", "1")], nowMs: now)

        let replies = try redis.transaction([effect] + store.takePendingCommands() + [offsetCommand])
        XCTAssertEqual(replies.count, 3)
        XCTAssertTrue(try exists("orders:total", on: redis))
        XCTAssertEqual(try storedField(store.redisKey(for: scope), "k", on: redis), "0:1")
        XCTAssertEqual(try offsets.storedOffsets([TopicPartition("events", 3)]), [TopicPartition("events", 3): 100])
    }
}
