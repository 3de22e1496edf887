import CRdKafka
import Foundation
import Glibc
@testable import Runtime
import XCTest

/// Fault tests of the delivery path of `projection-runtime run`: dead letters, sink outages,
/// broker faults, a second process in the group, and kills during load.
///
/// Each test writes `counting.lua` into its projections folder. That projection has no
/// idempotence of its own: it runs INCR on a Redis counter per bar and inserts one row per bar
/// into a ReplacingMergeTree table sorted by the event's source. So a lost bar shows as a
/// counter or a `FINAL` row count below the bars sent, and a bar applied twice as a counter
/// above it, while a replayed row is collapsed by `FINAL` (plain `count()` may be larger).
///
/// The services are shared by the class, as in `LiveRuntimeTests`. Tests that stop a service
/// use a private one (Redis) or a forwarder in front of the shared one (ClickHouse).
final class DeliveryTests: XCTestCase {
    private static let sharedStack = SharedLiveStack()

    private var workspace: LiveStack.Workspace!
    /// The runtimes this test started, whose logs `assertNoFencedBatch` reads.
    private var runtimes: [LiveStack.RuntimeProcess] = []
    /// Set by `recordFailure`, so that `tearDown` keeps the folder of a failed test.
    private var hasRecordedFailure = false

    /// The consumer group session of the runtimes, in milliseconds.
    private static let sessionTimeoutMs = 6000

    override func setUpWithError() throws {
        try super.setUpWithError()
        workspace = try Self.stack().makeWorkspace(label: name)
        let file = workspace.projectionsFolder.appendingPathComponent("counting.lua")
        try Data(countingProjectionSource.utf8).write(to: file)
    }

    override func recordFailure(withDescription description: String, inFile filePath: String, atLine lineNumber: Int,
                                expected: Bool) {
        hasRecordedFailure = true
        super.recordFailure(withDescription: description, inFile: filePath, atLine: lineNumber, expected: expected)
    }

    override func tearDown() {
        workspace?.close(keepFolder: hasRecordedFailure)
        workspace = nil
        runtimes = []
        super.tearDown()
    }

    override class func tearDown() {
        sharedStack.stop()
        super.tearDown()
    }

    private static func stack() throws -> LiveStack {
        try sharedStack.get()
    }

    // MARK: - Dead letters

    func testFailedEventsGoToDeadLetterTopic() throws {
        let runtime = try startRuntime()
        let key = "acme:BTC-USD"
        let firstBar = barJSON("acme", "BTC-USD", minute: 0)
        let invalidJSON = #"{"tenant_id":"acme","instrument_id":"BTC-USD","#
        let missingClose = #"{"tenant_id":"acme","instrument_id":"BTC-USD","timeframe":"1m","#
            + #""start_ms":1709546460000,"end_ms":1709546520000,"open":101.0,"high":101.0,"low":101.0,"volume":1.0}"#
        let lastBar = barJSON("acme", "BTC-USD", minute: 3)
        let payloads = [firstBar, invalidJSON, missingClose, lastBar]

        // One key, so all four land in one partition in this order, at offsets 0 to 3. kcat adds
        // the header to each message, and dead letters must keep it.
        let file = workspace.folder.appendingPathComponent("dead-letter-input.kcat")
        try Data(payloads.map { "\(key)|\($0)\n" }.joined().utf8).write(to: file)
        let published = try LiveStack.runTool(
            LiveStack.kcatPath,
            ["-b", workspace.stack.broker.bootstrap, "-t", workspace.barTopic, "-P", "-K|",
             "-H", "trace-id=delivery-test", "-l", file.path],
            timeoutSeconds: 20)
        XCTAssertEqual(published.status, 0, published.standardError)

        let ends = try barEndOffsets()
        XCTAssertEqual(ends.count, 1, "partitions with messages: \(ends)")
        let (source, end) = try XCTUnwrap(ends.first)
        XCTAssertEqual(end, 4)
        try waitUntilApplied(runtime, redisPort: workspace.stack.redis.port, database: workspace.redisDatabase)

        // Every projection fails on the invalid JSON. Only those that need `close` fail on the bar
        // without it, and the counting projection still counts that bar.
        let statuses = try projectionStatuses(runtime)
        XCTAssertEqual(statuses["counting"]?.eventsHandled, 3, "counting events_handled")
        XCTAssertEqual(statuses["counting"]?.eventsFailed, 1, "counting events_failed")
        for name in ["latest_price", "bar_rollups"] {
            XCTAssertEqual(statuses[name]?.eventsHandled, 2, "\(name) events_handled")
            XCTAssertEqual(statuses[name]?.eventsFailed, 2, "\(name) events_failed")
        }
        let price = try runtime.api("/projections/latest_price?tenant_id=acme&instrument_id=BTC-USD")
        XCTAssertEqual(price.status, 200, price.text)
        XCTAssertEqual(price.jsonObject?["price"] as? Double, 103.0, "the bar after the failed ones: \(price.text)")
        try assertExactlyOnce(["count:{acme}:BTC-USD": 3], totalRows: 3,
                              redisPort: workspace.stack.redis.port, database: workspace.redisDatabase)

        // Dead letters are acknowledged before the transaction that applied the offsets, so all
        // five are stored by now.
        let letters = try readDeadLetters(topic: workspace.barTopic + ".dlq", expectedCount: 5)
        XCTAssertEqual(letters.count, 5, "dead letters: \(letters)")
        let failedProjections: [Int64: Set<String>] = [
            1: ["bar_rollups", "counting", "latest_price"],
            2: ["bar_rollups", "latest_price"],
        ]
        for offset in [Int64(1), 2] {
            let matching = letters.filter { $0.header("x-dead-letter-offset") == String(offset) }
            XCTAssertEqual(Set(matching.compactMap { $0.header("x-dead-letter-projection") }),
                           failedProjections[offset], "projections dead-lettered at offset \(offset)")
            XCTAssertEqual(matching.count, failedProjections[offset]?.count, "dead letters at offset \(offset)")
            for letter in matching {
                let label = "dead letter of \(letter.header("x-dead-letter-projection") ?? "?") at offset \(offset)"
                XCTAssertEqual(letter.payload, payloads[Int(offset)], label)
                XCTAssertEqual(letter.key, key, label)
                XCTAssertEqual(letter.headers.first?.name, "trace-id", "\(label): original headers come first")
                XCTAssertEqual(letter.header("trace-id"), "delivery-test", label)
                XCTAssertEqual(letter.header("x-dead-letter-topic"), workspace.barTopic, label)
                XCTAssertEqual(letter.header("x-dead-letter-partition"), String(source.partition), label)
                let phase = letter.header("x-dead-letter-phase")
                let error = letter.header("x-dead-letter-error") ?? ""
                if offset == 1 {
                    XCTAssertEqual(phase, "decode", label)
                    XCTAssertTrue(error.contains("invalid JSON"), "\(label): \(error)")
                } else {
                    XCTAssertEqual(phase, "on_event", label)
                    XCTAssertTrue(error.contains("field 'close' is missing"), "\(label): \(error)")
                }
            }
        }

        // The group's committed offset moves past the failed events too.
        var committed: [TopicPartition: Int64] = [:]
        try runtime.waitUntil("offset 4 of \(source) is committed", timeoutSeconds: 10,
                              detail: { "committed: \(committed)" }) {
            committed = try self.workspace.committedOffsets([source])
            return committed[source] == 4
        }
    }

    // MARK: - Sink outages

    func testRedisRestartResumesWithoutLoss() throws {
        // A private Redis that writes every command to its append-only file before replying, so
        // a SIGKILL loses nothing and the restart in the same folder brings every key back.
        let redis = try LocalRedis(arguments: ["--appendonly", "yes", "--appendfsync", "always"])
        defer { redis.stop() }
        let runtime = try startRuntime(environment: [
            "DATA_PROC_REDIS_PORT": String(redis.port), "DATA_PROC_REDIS_DB": "0",
        ])
        var load = CountingLoad()
        try workspace.publish(lines: load.nextBars(200), to: workspace.barTopic)
        try waitUntilApplied(runtime, redisPort: redis.port, database: 0)
        let firstHalfEnds = try barEndOffsets()

        redis.kill()
        // With no event to write, only the worker's idle ping (every 5 s) can notice.
        var idleReasons: [String] = []
        try runtime.waitUntil("GET /ready reports Redis unreachable with no traffic", timeoutSeconds: 10,
                              detail: { "last reasons: \(idleReasons)" }) {
            idleReasons = try self.readiness(runtime).reasons
            return idleReasons.contains { $0.hasPrefix("Redis is not reachable") }
        }

        try workspace.publish(lines: load.nextBars(200), to: workspace.barTopic)
        var reasons: [String] = []
        try runtime.waitUntil("GET /ready reports consumption paused by Redis", timeoutSeconds: 20,
                              detail: { "last reasons: \(reasons)" }) {
            reasons = try self.readiness(runtime).reasons
            return reasons.contains { $0.hasPrefix("consumption is paused: Redis is failing") }
        }
        XCTAssertEqual(try readiness(runtime).status, 503)
        XCTAssertTrue(reasons.contains { $0.hasPrefix("Redis is not reachable") }, "\(reasons)")
        XCTAssertEqual(try runtime.health("/health").status, 200, "liveness must stay 200 during an outage")
        XCTAssertTrue(runtime.isRunning)
        let committedDuringOutage = try workspace.committedOffsets(barPartitions)
        for (partition, offset) in committedDuringOutage {
            XCTAssertLessThanOrEqual(offset, firstHalfEnds[partition] ?? 0,
                                     "\(partition) was committed past the last batch Redis applied")
        }

        try redis.start()
        try waitUntilApplied(runtime, redisPort: redis.port, database: 0, timeoutSeconds: 30)
        try runtime.waitUntilReady(timeoutSeconds: 15)
        try assertExactlyOnce(load.sentPerCounter, totalRows: load.total, redisPort: redis.port, database: 0)

        let metrics = try runtime.health("/metrics").text
        XCTAssertGreaterThan(metricSum(metrics, "projection_redis_flush_errors_total"), 0)
        XCTAssertEqual(metricSum(metrics, "projection_redis_command_errors_total"), 0,
                       "a command failed inside a transaction after the restart (for example NOSCRIPT)")
        let resumed = runtime.logEntries(message: "writes succeed again; consumption resumed")
        XCTAssertEqual(resumed.last?["sink"] as? String, "Redis", runtime.logTail())
    }

    func testClickHouseOutagePausesCommits() throws {
        let forwarder = try TCPForwarder(targetPort: workspace.stack.clickhouse.httpPort)
        defer { forwarder.stop() }
        let runtime = try startRuntime(environment: ["DATA_PROC_CLICKHOUSE_HTTP_PORT": String(forwarder.port)])
        let redisPort = workspace.stack.redis.port
        var load = CountingLoad()
        try workspace.publish(lines: load.nextBars(200), to: workspace.barTopic)
        try waitUntilApplied(runtime, redisPort: redisPort, database: workspace.redisDatabase)
        let firstHalfEnds = try barEndOffsets()
        let firstHalfCounts = load.sentPerCounter

        // From here the port refuses connections, as a ClickHouse that is down does.
        forwarder.stop()
        try workspace.publish(lines: load.nextBars(200), to: workspace.barTopic)
        var reasons: [String] = []
        try runtime.waitUntil("GET /ready reports consumption paused by ClickHouse", timeoutSeconds: 20,
                              detail: { "last reasons: \(reasons)" }) {
            reasons = try self.readiness(runtime).reasons
            return reasons.contains { $0.hasPrefix("consumption is paused: ClickHouse is failing") }
        }
        XCTAssertEqual(try readiness(runtime).status, 503)
        let health = try runtime.health("/health")
        XCTAssertEqual(health.status, 200, "liveness must stay 200 during an outage")
        let clickhouse = (health.jsonObject?["components"] as? [String: Any])?["clickhouse"] as? [String: Any]
        XCTAssertEqual(clickhouse?["state"] as? String, "unreachable", health.text)

        // Rows go first, so neither the offsets nor the counters may move while they fail.
        usleep(1_500_000)
        XCTAssertEqual(try storedOffsets(redisPort: redisPort, database: workspace.redisDatabase), firstHalfEnds,
                       "Redis offsets moved past rows that ClickHouse never acknowledged")
        XCTAssertEqual(try counters(redisPort: redisPort, database: workspace.redisDatabase), firstHalfCounts,
                       "Redis effects were applied before their rows")
        for (partition, offset) in try workspace.committedOffsets(barPartitions) {
            XCTAssertLessThanOrEqual(offset, firstHalfEnds[partition] ?? 0, "\(partition) committed during the outage")
        }

        try forwarder.start()
        try waitUntilApplied(runtime, redisPort: redisPort, database: workspace.redisDatabase, timeoutSeconds: 30)
        try runtime.waitUntilReady(timeoutSeconds: 15)
        try assertExactlyOnce(load.sentPerCounter, totalRows: load.total, redisPort: redisPort,
                              database: workspace.redisDatabase)
        let metrics = try runtime.health("/metrics").text
        XCTAssertGreaterThan(metricSum(metrics, "projection_clickhouse_flush_errors_total"), 0)
        let clickhouseAfter = (try runtime.health("/health").jsonObject?["components"] as? [String: Any])?["clickhouse"]
        XCTAssertEqual((clickhouseAfter as? [String: Any])?["state"] as? String, "reachable")
    }

    func testInitRetriedUntilClickHouseResponds() throws {
        let forwarder = try TCPForwarder(targetPort: workspace.stack.clickhouse.httpPort)
        defer { forwarder.stop() }
        // The port refuses connections, as a ClickHouse that has not started yet does.
        forwarder.stop()
        let runtime = try startRuntime(environment: ["DATA_PROC_CLICKHOUSE_HTTP_PORT": String(forwarder.port)],
                                       waitUntilReady: false)
        try runtime.waitUntil("GET /health answers while init statements wait for ClickHouse", timeoutSeconds: 5) {
            (try? runtime.health("/health", timeoutSeconds: 1)) != nil
        }
        var health = ""
        try runtime.waitUntil("bar_rollups is reported unloaded because ClickHouse is unreachable",
                              timeoutSeconds: 40, detail: { health }) {
            health = (try? runtime.health("/health", timeoutSeconds: 2))?.text ?? ""
            return health.contains("ClickHouse is unreachable for a statement from init")
        }
        XCTAssertTrue(health.contains(#""name":"latest_price""#), "projections without init must load: \(health)")

        try forwarder.start()
        try runtime.waitUntil("bar_rollups loads without a SIGHUP once ClickHouse answers", timeoutSeconds: 40,
                              detail: { health }) {
            health = (try? runtime.health("/health", timeoutSeconds: 2))?.text ?? ""
            return health.contains(#""name":"bar_rollups""#) && !health.contains("unreachable for a statement")
        }
        XCTAssertFalse(runtime.logEntries(message: "retrying the projections whose init statements found ClickHouse unreachable").isEmpty)
    }

    // MARK: - Broker faults

    func testFetchAndCommitErrorsAreRetried() throws {
        let broker = workspace.stack.broker
        let runtime = try startRuntime()
        var load = CountingLoad()
        try workspace.publish(lines: load.nextBars(100), to: workspace.barTopic)
        try waitUntilApplied(runtime, redisPort: workspace.stack.redis.port, database: workspace.redisDatabase)

        // The mock broker fails the next requests of each API key with these errors, whichever
        // client sends them. Only the runtime fetches and commits during this test. The
        // OFFSET_METADATA_TOO_LARGE errors are not retriable, so the runtime's own retry of the
        // commit has to recover from them.
        defer {
            try? broker.clearRequestErrors(apiKey: fetchAPIKey)
            try? broker.clearRequestErrors(apiKey: offsetCommitAPIKey)
        }
        try broker.pushRequestErrors(apiKey: fetchAPIKey, errors: [
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION, RD_KAFKA_RESP_ERR__TRANSPORT,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT, RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ])
        try broker.pushRequestErrors(apiKey: offsetCommitAPIKey, errors: [
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE, RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE,
            RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE,
        ])
        try workspace.publish(lines: load.nextBars(300), to: workspace.barTopic)

        try waitUntilApplied(runtime, redisPort: workspace.stack.redis.port, database: workspace.redisDatabase,
                             timeoutSeconds: 30)
        try waitUntilCommitted(runtime, timeoutSeconds: 20)
        try assertExactlyOnce(load.sentPerCounter, totalRows: load.total, redisPort: workspace.stack.redis.port,
                              database: workspace.redisDatabase)
        XCTAssertTrue(runtime.isRunning)

        // librdkafka retries some errors itself, and the others reach the runtime.
        XCTAssertFalse(runtime.logEntries(message: "Kafka consume error").isEmpty,
                       "no fetch error reached the runtime: \(runtime.logTail())")
        // Commits are asynchronous, so their failures arrive through the commit callback.
        XCTAssertFalse(runtime.logEntries(message: "Kafka offset commit failed; it is sent again with the next commit").isEmpty,
                       "no commit error reached the runtime: \(runtime.logTail())")
    }

    func testBrokerDownThenUpResumes() throws {
        let broker = workspace.stack.broker
        let runtime = try startRuntime()
        var load = CountingLoad()
        try workspace.publish(lines: load.nextBars(100), to: workspace.barTopic)
        try waitUntilApplied(runtime, redisPort: workspace.stack.redis.port, database: workspace.redisDatabase)

        try broker.setBrokerDown(1, down: true)
        var brokerIsDown = true
        defer {
            if brokerIsDown {
                try? broker.setBrokerDown(1, down: false)
            }
        }
        var reasons: [String] = []
        try runtime.waitUntil("GET /ready reports the broker unreachable", timeoutSeconds: 20,
                              detail: { "reasons: \(reasons)" }) {
            let readiness = try readiness(runtime)
            reasons = readiness.reasons
            return readiness.status == 503 && reasons.contains { $0.hasPrefix("no Kafka broker is reachable") }
        }
        XCTAssertTrue(runtime.isRunning, "the runtime exited while the broker was down")
        XCTAssertEqual(try runtime.health("/health").status, 200, "liveness must not fail while the broker is down")
        try broker.setBrokerDown(1, down: false)
        brokerIsDown = false
        try runtime.waitUntil("GET /ready returns 200 once the broker answers, without traffic",
                              timeoutSeconds: 20, detail: { "reasons: \(reasons)" }) {
            let readiness = try readiness(runtime)
            reasons = readiness.reasons
            return readiness.status == 200
        }

        try workspace.publish(lines: load.nextBars(300), to: workspace.barTopic)
        try waitUntilApplied(runtime, redisPort: workspace.stack.redis.port, database: workspace.redisDatabase,
                             timeoutSeconds: 40)
        try waitUntilCommitted(runtime, timeoutSeconds: 20)
        try assertExactlyOnce(load.sentPerCounter, totalRows: load.total, redisPort: workspace.stack.redis.port,
                              database: workspace.redisDatabase)
        try runtime.waitUntilReady(timeoutSeconds: 15)
    }

    // MARK: - Two processes in one group

    func testSurvivorTakesOverKilledPeer() throws {
        let (victim, survivor) = try startTwoRuntimes()
        var load = CountingLoad()
        try workspace.publish(lines: load.nextBars(400), to: workspace.barTopic)
        try waitUntilApplied(survivor, redisPort: workspace.stack.redis.port, database: workspace.redisDatabase)
        let victimHandled = try projectionStatuses(victim)["counting"]?.eventsHandled ?? 0
        let survivorHandled = try projectionStatuses(survivor)["counting"]?.eventsHandled ?? 0
        XCTAssertGreaterThan(victimHandled, 0, "the first runtime handled no bar: the partitions were not split")
        XCTAssertGreaterThan(survivorHandled, 0, "the second runtime handled no bar: the partitions were not split")
        XCTAssertEqual(victimHandled + survivorHandled, load.total, "bars handled by the two runtimes together")

        // Kill the first runtime right after the next bars are published. Its partitions stay
        // assigned to it until the broker ends its session.
        try workspace.publish(lines: load.nextBars(400), to: workspace.barTopic)
        let appliedAtKill = try storedOffsets(redisPort: workspace.stack.redis.port, database: workspace.redisDatabase)
            .values.reduce(0, +)
        victim.send(SIGKILL)
        XCTAssertTrue(victim.waitForExit(timeoutSeconds: 5))
        print("DeliveryTests: \(appliedAtKill) of \(load.total) bars were applied just before SIGKILL")
        let killedAt = Date()
        try survivor.waitUntil("the survivor owns all 6 partitions", timeoutSeconds: 30) {
            try self.assignedPartitions(survivor) == 6
        }
        let takeoverSeconds = Date().timeIntervalSince(killedAt)
        print("DeliveryTests: the survivor owned every partition \(String(format: "%.1f", takeoverSeconds)) s after SIGKILL")

        try workspace.publish(lines: load.nextBars(400), to: workspace.barTopic)
        try waitUntilApplied(survivor, redisPort: workspace.stack.redis.port, database: workspace.redisDatabase,
                             timeoutSeconds: 30)
        try assertExactlyOnce(load.sentPerCounter, totalRows: load.total, redisPort: workspace.stack.redis.port,
                              database: workspace.redisDatabase)
        try waitUntilCommitted(survivor, timeoutSeconds: 15)
    }

    func testSurvivorTakesOverStoppedPeer() throws {
        let (leaving, survivor) = try startTwoRuntimes()
        var load = CountingLoad()
        try workspace.publish(lines: load.nextBars(400), to: workspace.barTopic)
        try waitUntilApplied(survivor, redisPort: workspace.stack.redis.port, database: workspace.redisDatabase)
        XCTAssertGreaterThan(try projectionStatuses(leaving)["counting"]?.eventsHandled ?? 0, 0)
        XCTAssertGreaterThan(try projectionStatuses(survivor)["counting"]?.eventsHandled ?? 0, 0)

        try workspace.publish(lines: load.nextBars(400), to: workspace.barTopic)
        let stoppedAt = Date()
        leaving.send(SIGTERM)
        XCTAssertTrue(leaving.waitForExit(timeoutSeconds: 12), "no exit within the 10 s shutdown timeout (+2 s)")
        let exitedAt = Date()
        XCTAssertEqual(leaving.terminationReason, .exit)
        XCTAssertEqual(leaving.terminationStatus, 0, leaving.logTail())
        // The mock broker delays each rebalance after a member leaves or times out by the session
        // timeout minus 1 s (librdkafka's rdkafka_mock_cgrp.c). A member that leaves the group
        // starts that delay at once, so the takeover takes about one session timeout (5 s here). A
        // member that does not leave is first timed out after a session timeout, so the takeover
        // takes about two (11 s after SIGKILL in testSurvivorTakesOverKilledPeer).
        let sessionSeconds = Double(Self.sessionTimeoutMs) / 1000
        try survivor.waitUntil("the survivor owns all 6 partitions", timeoutSeconds: 3 * sessionSeconds) {
            try self.assignedPartitions(survivor) == 6
        }
        let takeoverSeconds = Date().timeIntervalSince(exitedAt)
        print("DeliveryTests: the stopped runtime exited \(String(format: "%.1f", exitedAt.timeIntervalSince(stoppedAt))) s "
            + "after SIGTERM, and the survivor owned every partition \(String(format: "%.1f", takeoverSeconds)) s later")
        XCTAssertLessThan(takeoverSeconds, 1.5 * sessionSeconds,
                          "the takeover waited for a session timeout: the stopped runtime did not leave the group")

        try workspace.publish(lines: load.nextBars(400), to: workspace.barTopic)
        try waitUntilApplied(survivor, redisPort: workspace.stack.redis.port, database: workspace.redisDatabase,
                             timeoutSeconds: 30)
        try assertExactlyOnce(load.sentPerCounter, totalRows: load.total, redisPort: workspace.stack.redis.port,
                              database: workspace.redisDatabase)
        let metrics = try survivor.health("/metrics").text
        for reason in ["deadline", "partitions lost"] {
            XCTAssertEqual(metricSum(metrics, "projection_batches_abandoned_total", ["reason": reason]), 0,
                           "batches dropped for \(reason) in a graceful handover")
        }
    }

    // MARK: - Kills during load

    func testRepeatedKillsApplyEachBarOnce() throws {
        let redisPort = workspace.stack.redis.port
        let database = workspace.redisDatabase
        // Small units, committed often to Redis, while the group's Kafka offsets follow at most
        // once a second, so each restart consumes again bars that Redis already applied. Two
        // workers per runtime, as on a 2-core host by default, so sibling workers claim
        // partitions at the same time after each restart.
        let environment = [
            "DATA_PROC_KAFKA_POLL_BATCH": "50",
            "DATA_PROC_CLICKHOUSE_FLUSH_ROWS": "100",
            "DATA_PROC_CLICKHOUSE_FLUSH_INTERVAL_MS": "50",
            "DATA_PROC_WORKERS": "2",
        ]
        var load = CountingLoad()
        try workspace.publish(lines: load.nextBars(4000), to: workspace.barTopic)

        var runtime = try startRuntime(environment: environment)
        var skipped = 0.0
        let kills = 3
        for round in 1...kills {
            let target = Int64(load.total * round / (kills + 1))
            var applied: Int64 = 0
            do {
                try runtime.waitUntil("\(target) bars are applied before kill \(round)", timeoutSeconds: 60,
                                      detail: { "applied: \(applied)" }) {
                    applied = try self.storedOffsets(redisPort: redisPort, database: database).values.reduce(0, +)
                    return applied >= target
                }
            } catch {
                assertNoFencedBatch()
                throw error
            }
            let total = Int64(load.total)
            XCTAssertLessThan(applied, total, "kill \(round) came after the load was done: \(applied) of \(total)")
            skipped += metricSum(try runtime.health("/metrics").text, "projection_events_skipped_total",
                                 ["reason": "already_applied"])
            runtime.send(SIGKILL)
            XCTAssertTrue(runtime.waitForExit(timeoutSeconds: 5))

            // More load arrives while no runtime consumes.
            try workspace.publish(lines: load.nextBars(500), to: workspace.barTopic)
            runtime = try startRuntime(environment: environment)
        }

        try waitUntilApplied(runtime, redisPort: redisPort, database: database, timeoutSeconds: 90)
        skipped += metricSum(try runtime.health("/metrics").text, "projection_events_skipped_total",
                             ["reason": "already_applied"])
        try assertExactlyOnce(load.sentPerCounter, totalRows: load.total, redisPort: redisPort, database: database)
        XCTAssertGreaterThan(skipped, 0, "no restart skipped a bar that Redis had already applied")
        print("DeliveryTests: \(Int(skipped)) bars were consumed again after kills and skipped as already applied")
    }

    // MARK: - Partition ownership

    func testOtherClaimDoesNotFenceOwner() throws {
        // Two workers of one group, as two runtimes or two worker threads of one runtime are.
        let settings = RedisSettings(port: workspace.stack.redis.port, db: workspace.redisDatabase)
        let group = workspace.groupId
        let ownerConnection = RedisConnection(settings: settings)
        let claimerConnection = RedisConnection(settings: settings)
        let pauseConnection = RedisConnection(settings: settings)
        defer {
            ownerConnection.close()
            claimerConnection.close()
            pauseConnection.close()
        }
        let owner = PartitionOwnership(connection: ownerConnection,
                                       offsets: RedisOffsetStore(connection: ownerConnection, namespace: group),
                                       namespace: group)
        let claimer = PartitionOwnership(connection: claimerConnection,
                                         offsets: RedisOffsetStore(connection: claimerConnection, namespace: group),
                                         namespace: group)
        let owned = TopicPartition(workspace.barTopic, 0)
        let other = TopicPartition(workspace.barTopic, 1)
        try owner.claim([owned])

        // CLIENT PAUSE WRITE blocks every write, including the EXEC of a transaction with writes,
        // and Redis 7.0 runs them in arrival order when the pause ends. So the other worker's
        // claim of partition 1 lands between the owner's WATCH and its EXEC, as it can when both
        // start after a rebalance.
        let pause = try pauseConnection.command(["CLIENT", "PAUSE", "1500", "WRITE"].map { Array($0.utf8) })
        XCTAssertEqual(pause, .status("OK"))
        let claimDone = DispatchSemaphore(value: 0)
        let claimerBox = UncheckedBox(claimer)
        Thread.detachNewThread {
            try? claimerBox.value.claim([other])
            claimDone.signal()
        }
        usleep(300_000)
        let result = Result { () throws -> [RedisReply] in
            try owner.fencedTransaction([.arguments(["SET", "fence-probe", "1"].map { Array($0.utf8) })],
                                        partitions: [owned])
        }
        XCTAssertEqual(claimDone.wait(timeout: .now() + 10), .success, "the other worker's claim did not finish")

        XCTAssertNoThrow(try result.get(), "the claim of partition 1 fenced the owner of partition 0")
        XCTAssertFalse(owner.fenced.contains(owned), "partition 0 is marked as lost")
        // Redis still names the owner, so its next transaction passes the token check.
        XCTAssertNoThrow(try owner.fencedTransaction([.arguments(["SET", "fence-probe", "2"].map { Array($0.utf8) })],
                                                     partitions: [owned]))

        // A claim of the same partition still fences the owner.
        try claimerBox.value.claim([owned])
        XCTAssertThrowsError(try owner.fencedTransaction([.arguments(["SET", "fence-probe", "3"].map { Array($0.utf8) })],
                                                         partitions: [owned])) { error in
            XCTAssertTrue(error is FencedError, "\(error)")
        }
        XCTAssertTrue(owner.fenced.contains(owned))
    }

    // MARK: - Runtimes

    /// Starts a runtime with the short session of `sessionConfig()` and a short flush interval,
    /// which makes each unit, and so each Redis transaction, come sooner.
    private func startRuntime(environment: [String: String] = [:],
                              waitUntilReady: Bool = true) throws -> LiveStack.RuntimeProcess {
        var merged = ["DATA_PROC_CLICKHOUSE_FLUSH_INTERVAL_MS": "200"]
        merged.merge(environment) { _, given in given }
        let config = try sessionConfig()
        let runtime = try workspace.startRuntime(options: ["--config", config.path], environment: merged,
                                                 waitUntilReady: waitUntilReady)
        runtimes.append(runtime)
        return runtime
    }

    /// Starts two runtimes of the workspace's group and waits until the group has split the 6
    /// partitions between them.
    private func startTwoRuntimes() throws -> (LiveStack.RuntimeProcess, LiveStack.RuntimeProcess) {
        let first = try startRuntime()
        let second = try startRuntime()
        var split = (0, 0)
        try second.waitUntil("the group splits the partitions", timeoutSeconds: 30, detail: { "assigned: \(split)" }) {
            split = (try self.assignedPartitions(first), try self.assignedPartitions(second))
            return split.0 > 0 && split.1 > 0 && split.0 + split.1 == 6
        }
        return (first, second)
    }

    /// Writes a config file with a consumer group session of `sessionTimeoutMs`. A member killed
    /// with SIGKILL keeps its partitions until its session times out, 45 s by default in
    /// librdkafka 2.0.2, so the tests set one short enough to wait out.
    private func sessionConfig() throws -> URL {
        let file = workspace.folder.appendingPathComponent("session.yaml")
        let yaml = """
            kafka:
              properties:
                session.timeout.ms: \(Self.sessionTimeoutMs)
                heartbeat.interval.ms: 1000

            """
        try Data(yaml.utf8).write(to: file)
        return file
    }

    // MARK: - Offsets

    private var barPartitions: [TopicPartition] {
        (0..<LiveStack.barPartitions).map { TopicPartition(workspace.barTopic, $0) }
    }

    /// Returns the end offset of each bar partition that has messages.
    private func barEndOffsets() throws -> [TopicPartition: Int64] {
        var ends: [TopicPartition: Int64] = [:]
        for (partition, end) in try workspace.endOffsets(topic: workspace.barTopic, partitions: LiveStack.barPartitions)
        where end > 0 {
            ends[TopicPartition(workspace.barTopic, partition)] = end
        }
        return ends
    }

    /// Returns the offsets of the bar partitions that the runtime stored with its last applied
    /// transaction in the given Redis.
    private func storedOffsets(redisPort: Int, database: Int) throws -> [TopicPartition: Int64] {
        let connection = RedisConnection(settings: RedisSettings(port: redisPort, db: database))
        defer { connection.close() }
        return try RedisOffsetStore(connection: connection, namespace: workspace.groupId).storedOffsets(barPartitions)
    }

    /// Waits until the offsets stored in Redis reach the end of every bar partition, which means
    /// every published bar has been applied.
    private func waitUntilApplied(_ runtime: LiveStack.RuntimeProcess, redisPort: Int, database: Int,
                                  timeoutSeconds: Double = 20) throws {
        let ends = try barEndOffsets()
        var stored: [TopicPartition: Int64] = [:]
        do {
            try runtime.waitUntil("Redis stores the end offsets \(ends)", timeoutSeconds: timeoutSeconds,
                                  detail: { "stored: \(stored)" }) {
                stored = (try? self.storedOffsets(redisPort: redisPort, database: database)) ?? [:]
                return stored == ends
            }
        } catch {
            assertNoFencedBatch()
            throw error
        }
    }

    /// Asserts that no runtime of this test dropped a batch as fenced. No test here lets two live
    /// processes own one partition, so every fence is wrong (see `testOtherClaimDoesNotFenceOwner`
    /// for one cause), and the fenced partition stalls until the next rebalance.
    private func assertNoFencedBatch(file: StaticString = #filePath, line: UInt = #line) {
        let fences = runtimes.flatMap { $0.logEntries(message: "partitions were claimed by another process; dropping this batch") }
        XCTAssertEqual(fences.count, 0, "batches dropped as fenced: \(fences.map { $0["error"] as? String ?? "?" })",
                       file: file, line: line)
    }

    /// Waits until the group's committed offsets reach the end of every bar partition.
    private func waitUntilCommitted(_ runtime: LiveStack.RuntimeProcess, timeoutSeconds: Double) throws {
        let ends = try barEndOffsets()
        var committed: [TopicPartition: Int64] = [:]
        try runtime.waitUntil("the group commits the end offsets \(ends)", timeoutSeconds: timeoutSeconds,
                              detail: { "committed: \(committed)" }) {
            committed = (try? self.workspace.committedOffsets(self.barPartitions)) ?? [:]
            return committed == ends
        }
    }

    // MARK: - Counts

    /// Returns every counter of the counting projection in the given Redis database.
    private func counters(redisPort: Int, database: Int) throws -> [String: Int] {
        let connection = RedisConnection(settings: RedisSettings(port: redisPort, db: database))
        defer { connection.close() }
        guard case .array(let keys) = try connection.command([Array("KEYS".utf8), Array("count:*".utf8)]) else {
            throw LiveStack.Failure(description: "KEYS count:* did not return an array")
        }
        var values: [String: Int] = [:]
        for case .string(let key) in keys {
            let reply = try connection.command([Array("GET".utf8), key])
            guard case .string(let bytes) = reply, let value = Int(String(decoding: bytes, as: UTF8.self)) else {
                throw LiveStack.Failure(description: "GET \(String(decoding: key, as: UTF8.self)) returned \(reply)")
            }
            values[String(decoding: key, as: UTF8.self)] = value
        }
        return values
    }

    /// Asserts that each counter equals the bars sent for it and that a `FINAL` query counts one
    /// row per bar, per counter and in total.
    private func assertExactlyOnce(_ expected: [String: Int], totalRows: Int, redisPort: Int, database: Int,
                                   file: StaticString = #filePath, line: UInt = #line) throws {
        let actual = try counters(redisPort: redisPort, database: database)
        XCTAssertEqual(actual.count, expected.count, "counter keys in Redis", file: file, line: line)
        for (key, sent) in expected.sorted(by: { $0.key < $1.key }) {
            let counted = actual[key] ?? 0
            XCTAssertEqual(counted, sent, "\(key): \(counted < sent ? "lost" : "repeated") bars", file: file, line: line)
        }

        let finalRows = try Int(workspace.clickhouseQuery("SELECT count() FROM \(countingTable) FINAL")
            .trimmingCharacters(in: .whitespacesAndNewlines))
        let plainRows = try Int(workspace.clickhouseQuery("SELECT count() FROM \(countingTable)")
            .trimmingCharacters(in: .whitespacesAndNewlines))
        XCTAssertEqual(finalRows, totalRows, "rows with FINAL", file: file, line: line)
        XCTAssertGreaterThanOrEqual(plainRows ?? 0, totalRows, "rows without FINAL", file: file, line: line)

        let grouped = try workspace.clickhouseQuery("""
            SELECT concat('count:{', tenant_id, '}:', instrument_id) AS counter, count() AS rows
            FROM \(countingTable) FINAL GROUP BY counter FORMAT TabSeparated
            """)
        var rowsPerCounter: [String: Int] = [:]
        for row in grouped.split(separator: "\n") {
            let fields = row.split(separator: "\t")
            if fields.count == 2, let rows = Int(fields[1]) {
                rowsPerCounter[String(fields[0])] = rows
            }
        }
        XCTAssertEqual(rowsPerCounter, expected, "rows with FINAL per counter", file: file, line: line)
        assertNoFencedBatch(file: file, line: line)
        if let plainRows, plainRows > totalRows {
            print("DeliveryTests: \(plainRows - totalRows) rows were inserted twice and collapse under FINAL")
        }
    }

    // MARK: - HTTP

    private struct Readiness {
        var status: Int
        var reasons: [String]
    }

    private func readiness(_ runtime: LiveStack.RuntimeProcess) throws -> Readiness {
        let reply = try runtime.health("/ready")
        let reasons = reply.jsonObject?["reasons"] as? [String] ?? []
        return Readiness(status: reply.status, reasons: reasons)
    }

    private func assignedPartitions(_ runtime: LiveStack.RuntimeProcess) throws -> Int {
        let reply = try runtime.health("/health")
        let components = reply.jsonObject?["components"] as? [String: Any]
        let kafka = components?["kafka"] as? [String: Any]
        return (kafka?["assigned_partitions"] as? NSNumber)?.intValue ?? 0
    }

    private struct ProjectionCounts: Decodable {
        var name: String
        var eventsHandled: Int
        var eventsFailed: Int
    }

    private struct ProjectionCountList: Decodable {
        var projections: [ProjectionCounts]
    }

    /// Returns the applied and failed event counts of each projection, by name.
    private func projectionStatuses(_ runtime: LiveStack.RuntimeProcess) throws -> [String: ProjectionCounts] {
        let reply = try runtime.api("/projections")
        guard reply.status == 200 else {
            throw LiveStack.Failure(description: "GET /projections returned \(reply.status): \(reply.text)")
        }
        let list = try reply.decode(ProjectionCountList.self)
        return Dictionary(list.projections.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
    }

    /// Returns the sum of every series of `name` whose labels include `labels`.
    private func metricSum(_ exposition: String, _ name: String, _ labels: [String: String] = [:]) -> Double {
        var sum = 0.0
        for line in exposition.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
                continue
            }
            let series = line[..<space]
            let seriesName = series.prefix { $0 != "{" }
            guard seriesName == name else { continue }
            if labels.allSatisfy({ series.contains("\($0.key)=\"\($0.value)\"") }) {
                sum += value
            }
        }
        return sum
    }

    // MARK: - Dead-letter topic

    private struct DeadLetter: CustomStringConvertible {
        var key: String?
        var payload: String
        var headers: [(name: String, value: String)]

        func header(_ name: String) -> String? {
            headers.last { $0.name == name }?.value
        }

        var description: String {
            "\(payload) \(headers.map { "\($0.name)=\($0.value)" })"
        }
    }

    /// Reads the topic from the start with kcat until it has `expectedCount` messages or 20 s
    /// have passed, and returns what it read.
    private func readDeadLetters(topic: String, expectedCount: Int) throws -> [DeadLetter] {
        let deadline = Date().addingTimeInterval(20)
        var letters: [DeadLetter] = []
        repeat {
            let result = try LiveStack.runTool(
                LiveStack.kcatPath,
                ["-b", workspace.stack.broker.bootstrap, "-t", topic, "-C", "-J", "-e", "-o", "beginning", "-q"],
                timeoutSeconds: 20)
            letters = String(decoding: result.standardOutput, as: UTF8.self).split(separator: "\n").compactMap { line in
                guard let object = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any] else {
                    return nil
                }
                // kcat 1.7.1 -J lists headers as one flat array: name, value, name, value, ...
                let flat = object["headers"] as? [Any] ?? []
                var headers: [(name: String, value: String)] = []
                for index in stride(from: 0, to: flat.count - 1, by: 2) {
                    headers.append((name: flat[index] as? String ?? "", value: flat[index + 1] as? String ?? ""))
                }
                return DeadLetter(key: object["key"] as? String, payload: object["payload"] as? String ?? "",
                                  headers: headers)
            }
            if letters.count >= expectedCount { break }
            usleep(500_000)
        } while Date() < deadline
        return letters
    }
}

/// Hands a value that is not Sendable to another thread. The threads must not use it at the same
/// time.
private final class UncheckedBox<Value>: @unchecked Sendable {
    let value: Value

    init(_ value: Value) {
        self.value = value
    }
}

/// Kafka protocol API keys of the requests that `DevBroker.pushRequestErrors` fails.
private let fetchAPIKey: Int16 = 1
private let offsetCommitAPIKey: Int16 = 8

// MARK: - Counting projection and its load

private let countingTable = "delivery_counts"

/// Counts bars per (tenant, instrument) with INCR and inserts one row per bar, sorted by the
/// row's source so that a replayed row replaces its first copy.
private let countingProjectionSource = """
    -- Counts bars with no idempotence of its own, so that tests can see lost and repeated events.
    local function on_event(event, ctx)
      if type(event) ~= "table" or type(event.tenant_id) ~= "string" or type(event.instrument_id) ~= "string" then
        error("counting: the event has no tenant_id or instrument_id string", 0)
      end
      ctx.redis("INCR", "count:{" .. event.tenant_id .. "}:" .. event.instrument_id)
      ctx.insert("delivery_counts", { tenant_id = event.tenant_id, instrument_id = event.instrument_id })
    end

    local function init(ctx)
      ctx.clickhouse([[
        CREATE TABLE IF NOT EXISTS delivery_counts (
          _source_topic String,
          _source_partition Int32,
          _source_offset Int64,
          _source_index UInt32,
          tenant_id String,
          instrument_id String
        ) ENGINE = ReplacingMergeTree()
        ORDER BY (_source_topic, _source_partition, _source_offset, _source_index)
      ]])
    end

    return { topics = { settings.aggregated_topic }, init = init, on_event = on_event }

    """

/// Valid one-minute bars spread round robin over 16 (tenant, instrument) keys, which the
/// default partitioner spreads over every bar partition, and the number sent per counter.
private struct CountingLoad {
    static let keys: [(tenant: String, instrument: String)] = ["acme", "globex"].flatMap { tenant in
        ["BTC-USD", "ETH-USD", "SOL-USD", "ADA-USD", "XRP-USD", "DOT-USD", "LTC-USD", "BCH-USD"]
            .map { (tenant: tenant, instrument: $0) }
    }

    /// Bars sent per counter key (`count:{tenant}:instrument`).
    private(set) var sentPerCounter: [String: Int] = [:]
    private(set) var total = 0

    /// Returns `count` more bars as kcat lines (`key|value`). Each key's bars are consecutive
    /// minutes, so the shipped projections accept every one.
    mutating func nextBars(_ count: Int) -> [String] {
        var lines: [String] = []
        for _ in 0..<count {
            let key = Self.keys[total % Self.keys.count]
            let counter = "count:{\(key.tenant)}:\(key.instrument)"
            let minute = sentPerCounter[counter, default: 0]
            lines.append("\(key.tenant):\(key.instrument)|" + barJSON(key.tenant, key.instrument, minute: minute))
            sentPerCounter[counter] = minute + 1
            total += 1
        }
        return lines
    }
}

/// Returns a valid one-minute bar starting `minute` minutes after 2024-03-04 10:00 UTC, with all
/// four prices equal to 100 + minute.
private func barJSON(_ tenant: String, _ instrument: String, minute: Int) -> String {
    let startMs = 1_709_546_400_000 + Int64(minute) * 60_000
    let price = Double(100 + minute)
    return "{\"tenant_id\":\"\(tenant)\",\"instrument_id\":\"\(instrument)\",\"timeframe\":\"1m\","
        + "\"start_ms\":\(startMs),\"end_ms\":\(startMs + 60_000),\"open\":\(price),\"high\":\(price),"
        + "\"low\":\(price),\"close\":\(price),\"volume\":1.0}"
}

// MARK: - TCP forwarder

/// A TCP forwarder from a port on 127.0.0.1 to another local port, which a test can stop (the
/// port then refuses connections and open ones are cut) and start again on the same port. It
/// simulates an outage of the server behind it without losing that server's data.
private final class TCPForwarder: @unchecked Sendable {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    let port: Int
    private let targetPort: Int
    /// Guards `listener`, `acceptLoopDone` and `openSockets`.
    private let lock = NSLock()
    private var listener: Int32 = -1
    private var acceptLoopDone: DispatchSemaphore?
    /// Both sockets of every forwarded connection, so that `stop()` can cut them.
    private var openSockets: Set<Int32> = []

    init(targetPort: Int) throws {
        self.targetPort = targetPort
        port = try LocalRedis.freePort()
        try start()
    }

    deinit {
        stop()
    }

    /// Listens on `port` again. Does nothing while listening.
    func start() throws {
        lock.lock()
        defer { lock.unlock() }
        guard listener < 0 else { return }
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else {
            throw Failure(description: "socket failed: \(String(cString: strerror(errno)))")
        }
        var reuse: Int32 = 1
        setsockopt(descriptor, SOL_SOCKET, SO_REUSEADDR, &reuse, socklen_t(MemoryLayout<Int32>.size))
        var address = Self.loopbackAddress(port: port)
        let bound = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
        guard bound, listen(descriptor, 64) == 0 else {
            let reason = String(cString: strerror(errno))
            close(descriptor)
            throw Failure(description: "listening on 127.0.0.1:\(port) failed: \(reason)")
        }
        listener = descriptor
        let done = DispatchSemaphore(value: 0)
        acceptLoopDone = done
        Thread.detachNewThread { [self] in
            acceptConnections(on: descriptor)
            done.signal()
        }
    }

    /// Closes the port and cuts every forwarded connection. Does nothing while stopped.
    func stop() {
        lock.lock()
        let descriptor = listener
        let done = acceptLoopDone
        let sockets = openSockets
        listener = -1
        acceptLoopDone = nil
        lock.unlock()
        guard descriptor >= 0 else { return }

        // shutdown wakes the thread blocked in accept, which then returns an error.
        shutdown(descriptor, Int32(SHUT_RDWR))
        _ = done?.wait(timeout: .now() + 5)
        close(descriptor)
        for socket in sockets {
            shutdown(socket, Int32(SHUT_RDWR))
        }
    }

    private func acceptConnections(on descriptor: Int32) {
        while true {
            let client = accept(descriptor, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                return
            }
            guard let upstream = connectToTarget() else {
                close(client)
                continue
            }
            // A connection accepted just before stop() is closed here instead of forwarded.
            let registered = lock.withLock { () -> Bool in
                guard listener == descriptor else { return false }
                openSockets.formUnion([client, upstream])
                return true
            }
            guard registered else {
                close(client)
                close(upstream)
                continue
            }
            let pair = SocketPair(first: client, second: upstream)
            Thread.detachNewThread { [self] in copy(from: client, to: upstream, pair: pair) }
            Thread.detachNewThread { [self] in copy(from: upstream, to: client, pair: pair) }
        }
    }

    private func connectToTarget() -> Int32? {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { return nil }
        var address = Self.loopbackAddress(port: targetPort)
        let connected = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
        guard connected else {
            close(descriptor)
            return nil
        }
        return descriptor
    }

    /// Copies bytes one way until either side closes, then cuts both directions. The second of
    /// the two copy threads to finish closes the sockets.
    private func copy(from source: Int32, to destination: Int32, pair: SocketPair) {
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        copying: while true {
            let received = buffer.withUnsafeMutableBytes { read(source, $0.baseAddress, $0.count) }
            if received < 0 && errno == EINTR { continue }
            guard received > 0 else { break }
            var sent = 0
            while sent < received {
                // MSG_NOSIGNAL: a peer that is gone must not raise SIGPIPE in the test process.
                let count = buffer.withUnsafeBytes {
                    send(destination, $0.baseAddress! + sent, received - sent, Int32(MSG_NOSIGNAL))
                }
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else { break copying }
                sent += count
            }
        }
        shutdown(source, Int32(SHUT_RDWR))
        shutdown(destination, Int32(SHUT_RDWR))
        guard pair.finishOneSide() else { return }
        lock.withLock {
            openSockets.remove(pair.first)
            openSockets.remove(pair.second)
        }
        close(pair.first)
        close(pair.second)
    }

    private static func loopbackAddress(port: Int) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        return address
    }

    /// The two sockets of one forwarded connection and how many copy threads still use them.
    private final class SocketPair: @unchecked Sendable {
        let first: Int32
        let second: Int32
        private let lock = NSLock()
        private var remainingSides = 2

        init(first: Int32, second: Int32) {
            self.first = first
            self.second = second
        }

        /// Returns true for the second caller, which then owns closing the sockets.
        func finishOneSide() -> Bool {
            lock.withLock {
                remainingSides -= 1
                return remainingSides == 0
            }
        }
    }
}
