import Foundation
import Glibc
@testable import Runtime
import XCTest

/// End-to-end tests of `projection-runtime run`: the built binary as a child process against a
/// real redis-server, clickhouse-server and the dev broker, fed with kcat and queried over HTTP.
///
/// The services are shared by the class (see `LiveStack`). Each test starts its own runtime on
/// its own topics, consumer group and databases, and stops it in `tearDown`.
final class LiveRuntimeTests: XCTestCase {
    private static let sharedStack = SharedLiveStack()

    private var workspace: LiveStack.Workspace!
    /// Set by `recordFailure`, so that `tearDown` keeps the folder of a failed test.
    private var hasRecordedFailure = false

    override func setUpWithError() throws {
        try super.setUpWithError()
        workspace = try Self.stack().makeWorkspace(label: name)
    }

    override func recordFailure(withDescription description: String, inFile filePath: String, atLine lineNumber: Int,
                                expected: Bool) {
        hasRecordedFailure = true
        super.recordFailure(withDescription: description, inFile: filePath, atLine: lineNumber, expected: expected)
    }

    override func tearDown() {
        workspace?.close(keepFolder: hasRecordedFailure)
        workspace = nil
        super.tearDown()
    }

    override class func tearDown() {
        sharedStack.stop()
        super.tearDown()
    }

    private static func stack() throws -> LiveStack {
        try sharedStack.get()
    }

    // MARK: - Serving

    func testPublishedBarsServeLatestPrice() throws {
        let bars = try sampleBars()
        let runtime = try workspace.startRuntime()

        try workspace.publish(file: sampleFile("bars.kcat"), to: workspace.barTopic)
        try waitForEvents(runtime, projection: "latest_price", handled: bars.count)

        let status = try projectionStatus(runtime, "latest_price")
        let expected = expectedLatestPrices(bars)
        XCTAssertEqual(expected.count, 3, "instruments in the sample file")
        for (key, bar) in expected.sorted(by: { $0.key < $1.key }) {
            let reply = try runtime.api(pricePath(bar.tenantId, bar.instrumentId))
            XCTAssertEqual(reply.status, 200, "\(key): \(reply.text)")
            guard reply.status == 200 else { continue }
            let price = try reply.decode(LatestPrice.self)

            XCTAssertEqual(price.tenantId, bar.tenantId, key)
            XCTAssertEqual(price.instrumentId, bar.instrumentId, key)
            XCTAssertEqual(price.price, bar.close, key)
            XCTAssertEqual(price.asOfMs, bar.endMs, key)
            XCTAssertEqual(price.volume, bar.volume, key)
            XCTAssertEqual(price.timeframe, "1m", key)
            XCTAssertEqual(price.meta.projection, "latest_price", key)
            XCTAssertEqual(price.meta.version.count, 12, "short version: \(price.meta.version)")
            XCTAssertTrue(status.version.hasPrefix(price.meta.version),
                          "_meta.version \(price.meta.version) is not a prefix of \(status.version)")
            XCTAssertEqual(reply.headers["x-projection-version"], price.meta.version, key)
            XCTAssertEqual(price.meta.appliedOffsets.values.reduce(0, +), Int64(bars.count),
                           "applied offsets \(price.meta.appliedOffsets) should cover every published bar")
        }

        let unknown = try runtime.api(pricePath("acme", "XRP-USD"))
        XCTAssertEqual(unknown.status, 404, unknown.text)
        let missingParameter = try runtime.api("/projections/latest_price?tenant_id=acme")
        XCTAssertEqual(missingParameter.status, 400, missingParameter.text)
        XCTAssertTrue(missingParameter.text.contains("instrument_id"), missingParameter.text)
    }

    func testRollupsLandInClickHouse() throws {
        let bars = try sampleBars()
        let expected = expectedRollups(bars, tenant: "acme", instrument: "BTC-USD", lengthMs: 5 * 60_000)
        XCTAssertEqual(expected.count, 5, "5m buckets of acme BTC-USD in the sample file")
        let runtime = try workspace.startRuntime()

        try workspace.publish(file: sampleFile("bars.kcat"), to: workspace.barTopic)
        try waitForEvents(runtime, projection: "bar_rollups", handled: bars.count)

        // Rows arrive with the buffer's next flush, and an earlier flush may contain partial buckets.
        var rows: [RollupBar] = []
        try runtime.waitUntil("ClickHouse holds the final 5m buckets", timeoutSeconds: 15,
                              detail: { "last rows: \(rows)" }) {
            rows = try self.clickhouseRollups(tenant: "acme", instrument: "BTC-USD", timeframe: "5m")
            return rows.map(\.minutes) == expected.map(\.minutes) && rows.map(\.version) == expected.map(\.version)
        }
        assertRollups(rows, equal: expected, source: "ClickHouse")

        // The Redis copy that the bars query serves contains the same buckets, newest first.
        let reply = try runtime.api("/projections/bar_rollups/bars?tenant_id=acme&instrument_id=BTC-USD&timeframe=5m")
        XCTAssertEqual(reply.status, 200, reply.text)
        let served = try reply.decode(RollupList.self)
        assertRollups(served.bars.reversed(), equal: expected, source: "GET /projections/bar_rollups/bars")
    }

    func testInvalidationsWithdrawPrices() throws {
        let bars = try sampleBars()
        let runtime = try workspace.startRuntime()
        try workspace.publish(file: sampleFile("bars.kcat"), to: workspace.barTopic)
        try waitForEvents(runtime, projection: "latest_price", handled: bars.count)

        try workspace.publish(file: sampleFile("invalidations.kcat"), to: workspace.invalidationTopic)
        try waitForEvents(runtime, projection: "invalidation_rules", handled: 2)

        // The instrument invalidation of globex SOL-USD and the tenant invalidation of acme at
        // 10:10 cover every price except acme BTC-USD, whose last bar ended at 10:16.
        XCTAssertEqual(try runtime.api(pricePath("globex", "SOL-USD")).status, 404)
        XCTAssertEqual(try runtime.api(pricePath("acme", "ETH-USD")).status, 404)
        let bitcoin = try runtime.api(pricePath("acme", "BTC-USD"))
        XCTAssertEqual(bitcoin.status, 200, bitcoin.text)
        XCTAssertEqual(try bitcoin.decode(LatestPrice.self).asOfMs, 1_709_547_360_000)

        // A bar that ended before the invalidation (10:06) does not bring the price back.
        let tenantInvalidatedMs: Int64 = 1_709_547_000_000
        let staleBar = barLine("acme", "ETH-USD", startMs: 1_709_546_700_000, close: 3399.0, volume: 20.5)
        try workspace.publish(lines: [staleBar], to: workspace.barTopic)
        try waitForEvents(runtime, projection: "latest_price", handled: bars.count + 1)
        XCTAssertEqual(try runtime.api(pricePath("acme", "ETH-USD")).status, 404)

        // A bar that ended after it (10:11) does.
        let newerBar = barLine("acme", "ETH-USD", startMs: tenantInvalidatedMs, close: 3410.25, volume: 12.5)
        try workspace.publish(lines: [newerBar], to: workspace.barTopic)
        try waitForEvents(runtime, projection: "latest_price", handled: bars.count + 2)
        let restored = try runtime.api(pricePath("acme", "ETH-USD"))
        XCTAssertEqual(restored.status, 200, restored.text)
        if restored.status == 200 {
            let price = try restored.decode(LatestPrice.self)
            XCTAssertEqual(price.price, 3410.25)
            XCTAssertEqual(price.asOfMs, tenantInvalidatedMs + 60_000)
        }
        XCTAssertEqual(try runtime.api(pricePath("globex", "SOL-USD")).status, 404)
    }

    // MARK: - Reload

    func testSighupLoadsNewProjection() throws {
        let bars = try sampleBars()
        let runtime = try workspace.startRuntime()
        let pid = runtime.processIdentifier
        try workspace.publish(file: sampleFile("bars.kcat"), to: workspace.barTopic)
        try waitForEvents(runtime, projection: "latest_price", handled: bars.count)

        let file = workspace.projectionsFolder.appendingPathComponent("volume_total.lua")
        try Data(volumeTotalSource.utf8).write(to: file)
        XCTAssertNil(try projectionList(runtime).projections.first { $0.name == "volume_total" },
                     "volume_total is listed before any reload")

        runtime.send(SIGHUP)
        try runtime.waitUntil("volume_total is listed", timeoutSeconds: 10) {
            try self.projectionList(runtime).projections.contains { $0.name == "volume_total" }
        }
        // Workers switch between batches, so wait for the switch before publishing.
        try runtime.waitUntil("the worker swaps to generation 2", timeoutSeconds: 10) {
            runtime.logEntries(message: "worker swapped to a new projection set")
                .contains { ($0["generation"] as? NSNumber)?.intValue ?? 0 >= 2 }
        }

        let extraBars = [
            barLine("acme", "ADA-USD", startMs: 1_709_547_360_000, close: 0.7125, volume: 1500.0),
            barLine("acme", "ADA-USD", startMs: 1_709_547_420_000, close: 0.7131, volume: 2250.5),
            barLine("acme", "ADA-USD", startMs: 1_709_547_480_000, close: 0.7128, volume: 999.25),
        ]
        try workspace.publish(lines: extraBars, to: workspace.barTopic)
        try waitForEvents(runtime, projection: "volume_total", handled: extraBars.count)

        let reply = try runtime.api("/projections/volume_total?tenant_id=acme&instrument_id=ADA-USD")
        XCTAssertEqual(reply.status, 200, reply.text)
        if reply.status == 200 {
            let total = try reply.decode(VolumeTotal.self)
            XCTAssertEqual(total.volume, 1500.0 + 2250.5 + 999.25, accuracy: 1e-9)
            XCTAssertEqual(total.meta.projection, "volume_total")
            XCTAssertEqual(reply.headers["x-projection-version"], total.meta.version)
        }
        let price = try runtime.api(pricePath("acme", "ADA-USD"))
        XCTAssertEqual(price.status, 200, price.text)

        XCTAssertTrue(runtime.isRunning, "the runtime exited during the reload")
        XCTAssertEqual(runtime.processIdentifier, pid)
        XCTAssertEqual(runtime.logEntries(message: "projection-runtime starting").count, 1, "the runtime restarted")
        let loaded = runtime.logEntries(message: "projection loaded")
            .filter { $0["projection"] as? String == "volume_total" }
        XCTAssertEqual(loaded.count, 1, runtime.logTail())
        XCTAssertEqual(loaded.first?["trigger"] as? String, "SIGHUP")
    }

    func testSyntaxErrorKeepsOldVersion() throws {
        let bars = try sampleBars()
        let runtime = try workspace.startRuntime()
        try workspace.publish(file: sampleFile("bars.kcat"), to: workspace.barTopic)
        try waitForEvents(runtime, projection: "latest_price", handled: bars.count)
        let before = try runtime.api(pricePath("acme", "BTC-USD"))
        XCTAssertEqual(before.status, 200, before.text)
        let oldVersion = try before.decode(LatestPrice.self).meta.version
        let oldFullVersion = try projectionStatus(runtime, "latest_price").version

        // Insert a line that does not parse right after the require of price_store.
        let file = workspace.projectionsFolder.appendingPathComponent("latest_price.lua")
        let original = try String(contentsOf: file, encoding: .utf8)
        var lines = original.components(separatedBy: "\n")
        let requireLine = try XCTUnwrap(lines.firstIndex { $0.contains("require(\"price_store\")") },
                                        "latest_price.lua no longer requires price_store")
        lines.insert("local broken = = 1", at: requireLine + 1)
        let brokenLine = requireLine + 2
        try Data(lines.joined(separator: "\n").utf8).write(to: file)

        runtime.send(SIGHUP)
        try runtime.waitUntil("a partial reload is counted", timeoutSeconds: 10) {
            self.metric(try runtime.health("/metrics").text, "projection_reloads_total", ["result": "partial"]) == 1
        }

        let after = try runtime.api(pricePath("acme", "BTC-USD"))
        XCTAssertEqual(after.status, 200, after.text)
        XCTAssertEqual(after.headers["x-projection-version"], oldVersion)
        XCTAssertEqual(try after.decode(LatestPrice.self).meta.version, oldVersion)

        let health = try runtime.health("/health")
        XCTAssertEqual(health.status, 200, health.text)
        let projections = try health.decode(HealthReport.self).components.projections
        XCTAssertEqual(projections.status, "error")
        let healthError = projections.errors.first { $0.file.hasSuffix("/latest_price.lua") }
        XCTAssertNotNil(healthError, "components.projections.errors: \(health.text)")
        XCTAssertEqual(healthError?.line, brokenLine)
        XCTAssertEqual(healthError?.phase, "load")
        XCTAssertEqual(projections.loaded.first { $0.name == "latest_price" }?.version, oldVersion)

        let status = try projectionStatus(runtime, "latest_price")
        XCTAssertEqual(status.version, oldFullVersion)
        XCTAssertEqual(status.status, "error")
        XCTAssertEqual(status.loadError?.file, file.path)
        XCTAssertEqual(status.loadError?.line, brokenLine)
        XCTAssertEqual(status.loadError?.phase, "load")
        XCTAssertTrue(status.loadError?.message.contains("=") ?? false, "\(String(describing: status.loadError))")

        let metrics = try runtime.health("/metrics").text
        XCTAssertEqual(metric(metrics, "projection_reloads_total", ["result": "ok"]), 1)
        XCTAssertEqual(metric(metrics, "projection_reloads_total", ["result": "partial"]), 1)

        let logged = runtime.logEntries(message: "projection failed to load")
        XCTAssertEqual(logged.count, 1, runtime.logTail())
        XCTAssertEqual((logged.first?["line"] as? NSNumber)?.intValue, brokenLine)
        XCTAssertEqual(logged.first?["kept_version"] as? String, oldVersion)

        // The old version still handles new events.
        let nextBar = barLine("acme", "BTC-USD", startMs: 1_709_547_360_000, close: 62_133.5, volume: 1.5)
        try workspace.publish(lines: [nextBar], to: workspace.barTopic)
        try waitForEvents(runtime, projection: "latest_price", handled: bars.count + 1)
        let updated = try runtime.api(pricePath("acme", "BTC-USD"))
        XCTAssertEqual(try updated.decode(LatestPrice.self).price, 62_133.5)
        XCTAssertEqual(updated.headers["x-projection-version"], oldVersion)
    }

    func testFixedFileClearsLoadError() throws {
        let runtime = try workspace.startRuntime()
        let file = workspace.projectionsFolder.appendingPathComponent("latest_price.lua")
        let original = try String(contentsOf: file, encoding: .utf8)
        let oldVersion = try projectionStatus(runtime, "latest_price").version

        try Data(("local broken = = 1\n" + original).utf8).write(to: file)
        runtime.send(SIGHUP)
        try runtime.waitUntil("the broken file is reported", timeoutSeconds: 10) {
            try self.projectionStatus(runtime, "latest_price").loadError?.line == 1
        }

        // The fix is a real edit, so that the reload loads a new version.
        try Data((original + "-- fixed\n").utf8).write(to: file)
        runtime.send(SIGHUP)
        try runtime.waitUntil("the fixed file is loaded", timeoutSeconds: 10) {
            try self.projectionStatus(runtime, "latest_price").version != oldVersion
        }
        let metrics = try runtime.health("/metrics").text
        XCTAssertEqual(metric(metrics, "projection_reloads_total", ["result": "ok"]), 2)
        XCTAssertEqual(metric(metrics, "projection_reloads_total", ["result": "partial"]), 1)
        let query = try runtime.api(pricePath("acme", "BTC-USD"))
        XCTAssertEqual(query.status, 404, "the fixed version should run the query and find no price: \(query.text)")

        let status = try projectionStatus(runtime, "latest_price")
        let health = try runtime.health("/health").decode(HealthReport.self)
        let stale = status.loadError != nil || !health.components.projections.errors.isEmpty
        XCTAssertFalse(stale, "after a fixed file reloads, /projections shows status \(status.status) with "
            + "load_error \(status.loadError?.message ?? "nil"), and /health reports "
            + "\(health.components.projections.errors.count) projection errors")
        XCTAssertEqual(status.status, "ok")
        XCTAssertEqual(health.components.projections.status, "ok")
        XCTAssertEqual(health.status, "ok")
    }

    func testAdminReloadReturnsReport() throws {
        let runtime = try workspace.startRuntime()
        let shipped = ["bar_rollups", "invalidation_rules", "latest_price"]

        let unchanged = try runtime.api("/admin/reload", method: "POST")
        XCTAssertEqual(unchanged.status, 200, unchanged.text)
        let unchangedReport = try unchanged.decode(ReloadReport.self)
        XCTAssertEqual(unchangedReport.trigger, "POST /admin/reload")
        XCTAssertTrue(unchangedReport.succeeded)
        XCTAssertEqual(unchangedReport.entries.map(\.projection).sorted(), shipped)
        XCTAssertEqual(Set(unchangedReport.entries.map(\.result)), ["unchanged"])
        let listed = try projectionList(runtime)
        for entry in unchangedReport.entries {
            let version = listed.projections.first { $0.name == entry.projection }?.version ?? "(not listed)"
            XCTAssertTrue(version.hasPrefix(entry.version ?? "-"),
                          "\(entry.projection): reported \(String(describing: entry.version)), listed \(version)")
        }

        let newFile = workspace.projectionsFolder.appendingPathComponent("volume_total.lua")
        try Data(volumeTotalSource.utf8).write(to: newFile)
        let added = try runtime.api("/admin/reload", method: "POST")
        XCTAssertEqual(added.status, 200, added.text)
        let addedReport = try added.decode(ReloadReport.self)
        XCTAssertTrue(addedReport.succeeded)
        XCTAssertEqual(addedReport.entries.first { $0.projection == "volume_total" }?.result, "loaded", added.text)
        XCTAssertTrue(try projectionList(runtime).projections.contains { $0.name == "volume_total" })

        let brokenFile = workspace.projectionsFolder.appendingPathComponent("broken_total.lua")
        try Data(brokenSource.utf8).write(to: brokenFile)
        let failed = try runtime.api("/admin/reload", method: "POST")
        XCTAssertEqual(failed.status, 422, failed.text)
        let failedReport = try failed.decode(ReloadReport.self)
        XCTAssertFalse(failedReport.succeeded)
        let failedEntry = failedReport.entries.first { $0.result == "failed" }
        XCTAssertEqual(failedEntry?.file, brokenFile.path, failed.text)
        XCTAssertEqual(failedEntry?.error?.line, 2)
        XCTAssertEqual(failedEntry?.error?.phase, "load")
        XCTAssertNil(failedEntry?.keptVersion)
        let failedFiles = try projectionList(runtime).failedFiles
        XCTAssertEqual(failedFiles.map(\.file), [brokenFile.path])
        XCTAssertEqual(failedFiles.first?.line, 2)

        let metrics = try runtime.health("/metrics").text
        XCTAssertEqual(metric(metrics, "projection_reloads_total", ["result": "ok"]), 3, "start and two POSTs")
        XCTAssertEqual(metric(metrics, "projection_reloads_total", ["result": "partial"]), 1)

        XCTAssertEqual(try runtime.api("/admin/reload", method: "GET").status, 405)
    }

    // MARK: - Failures and shutdown

    func testMalformedEventsDoNotStopPartition() throws {
        let runtime = try workspace.startRuntime()
        let missingClose = #"acme:BTC-USD|{"tenant_id":"acme","instrument_id":"BTC-USD","timeframe":"1m","#
            + #""start_ms":1709547420000,"end_ms":1709547480000,"#
            + #""open":62120.0,"high":62125.0,"low":62110.0,"volume":1.0}"#
        // One key, so every message goes to the same partition, in this order.
        try workspace.publish(lines: [
            barLine("acme", "BTC-USD", startMs: 1_709_547_360_000, close: 62_119.5, volume: 1.25),
            "acme:BTC-USD|not JSON at all",
            missingClose,
            barLine("acme", "BTC-USD", startMs: 1_709_547_480_000, close: 62_140.0, volume: 2.0),
        ], to: workspace.barTopic)
        try waitForEvents(runtime, projection: "latest_price", handled: 2, failed: 2)
        try waitForEvents(runtime, projection: "bar_rollups", handled: 2, failed: 2)

        let reply = try runtime.api(pricePath("acme", "BTC-USD"))
        XCTAssertEqual(reply.status, 200, reply.text)
        let price = try reply.decode(LatestPrice.self)
        XCTAssertEqual(price.price, 62_140.0, "the bar after the malformed ones was not applied")
        XCTAssertEqual(price.asOfMs, 1_709_547_540_000)
        XCTAssertEqual(price.meta.appliedOffsets.count, 1, "\(price.meta.appliedOffsets)")
        let (partitionKey, nextOffset) = try XCTUnwrap(price.meta.appliedOffsets.first)
        XCTAssertEqual(nextOffset, 4)

        let metrics = try runtime.health("/metrics").text
        for projection in ["latest_price", "bar_rollups"] {
            let events = { (result: String) in
                self.metric(metrics, "projection_events_total", ["projection": projection, "result": result])
            }
            XCTAssertEqual(events("ok"), 2, projection)
            XCTAssertEqual(events("invalid_payload"), 1, projection)
            XCTAssertEqual(events("error"), 1, projection)
        }

        let failureMessage = "projection failed on an event; it goes to the dead-letter topic"
        let failures = runtime.logEntries(message: failureMessage)
            .filter { $0["projection"] as? String == "latest_price" }
        XCTAssertEqual(failures.count, 2, runtime.logTail())
        let decodeFailure = failures.first { $0["phase"] as? String == "decode" }
        XCTAssertEqual((decodeFailure?["kafka.offset"] as? NSNumber)?.intValue, 1)
        let decodeError = decodeFailure?["error"] as? String ?? ""
        XCTAssertTrue(decodeError.contains("invalid JSON"), "\(String(describing: decodeFailure))")
        let handlerFailure = failures.first { $0["phase"] as? String == "on_event" }
        XCTAssertEqual((handlerFailure?["kafka.offset"] as? NSNumber)?.intValue, 2)
        let handlerError = handlerFailure?["error"] as? String ?? ""
        XCTAssertTrue(handlerError.contains("field 'close' is missing"), "\(String(describing: handlerFailure))")
        for failure in failures {
            let partition = (failure["kafka.partition"] as? NSNumber)?.intValue ?? -1
            XCTAssertEqual("\(workspace.barTopic)/\(partition)", partitionKey)
        }

        // The group commits past the malformed messages.
        let partition = try XCTUnwrap(Int32(partitionKey.split(separator: "/").last ?? ""))
        let topicPartition = TopicPartition(workspace.barTopic, partition)
        let reader = try workspace.makeOffsetReader()
        defer { reader.close() }
        var committed: [TopicPartition: Int64] = [:]
        try runtime.waitUntil("offset 4 of \(partitionKey) is committed", timeoutSeconds: 10,
                              detail: { "committed: \(committed)" }) {
            committed = try reader.committed([topicPartition], timeoutMs: 5000)
            return committed[topicPartition] == 4
        }
    }

    func testSigtermCommitsOffsets() throws {
        let bars = try sampleBars()
        // A flush interval longer than the test keeps the bars' rows in the buffer until
        // shutdown. Their Redis effects and offsets wait for the rows (rows go first), so the
        // bars show only in the handler metrics until SIGTERM writes the unit.
        let runtime = try workspace.startRuntime(environment: ["DATA_PROC_CLICKHOUSE_FLUSH_INTERVAL_MS": "600000"])
        try workspace.publish(file: sampleFile("bars.kcat"), to: workspace.barTopic)
        try workspace.publish(file: sampleFile("invalidations.kcat"), to: workspace.invalidationTopic)
        try runtime.waitUntil("every event went through its projections", timeoutSeconds: 20) {
            let metrics = try runtime.health("/metrics").text
            let latest = self.metric(metrics, "projection_events_total", ["projection": "latest_price", "result": "ok"])
            let invalidations = self.metric(metrics, "projection_events_total",
                                            ["projection": "invalidation_rules", "result": "ok"])
            return latest == Double(bars.count) && invalidations == 2
        }

        let barEnds = try workspace.endOffsets(topic: workspace.barTopic, partitions: LiveStack.barPartitions)
        let invalidationEnds = try workspace.endOffsets(topic: workspace.invalidationTopic,
                                                        partitions: LiveStack.invalidationPartitions)
        var expected: [TopicPartition: Int64] = [:]
        for (partition, end) in barEnds where end > 0 {
            expected[TopicPartition(workspace.barTopic, partition)] = end
        }
        for (partition, end) in invalidationEnds where end > 0 {
            expected[TopicPartition(workspace.invalidationTopic, partition)] = end
        }
        XCTAssertEqual(expected.values.reduce(0, +), Int64(bars.count + 2), "end offsets \(expected)")
        let barPartitions = (0..<LiveStack.barPartitions).map { TopicPartition(workspace.barTopic, $0) }
        let allPartitions = barPartitions
            + (0..<LiveStack.invalidationPartitions).map { TopicPartition(workspace.invalidationTopic, $0) }
        // Invalidations write no rows, so their offsets may be committed already.
        XCTAssertEqual(try workspace.committedOffsets(barPartitions), [:],
                       "bar offsets were committed while their ClickHouse rows were still buffered")

        let started = Date()
        runtime.send(SIGTERM)
        XCTAssertTrue(runtime.waitForExit(timeoutSeconds: 12), "no exit within the 10 s shutdown timeout (+2 s)")
        let seconds = Date().timeIntervalSince(started)
        XCTAssertEqual(runtime.terminationReason, .exit)
        XCTAssertEqual(runtime.terminationStatus, 0, runtime.logTail())
        XCTAssertEqual(runtime.logEntries(message: "projection-runtime stopped").count, 1, runtime.logTail())
        print("LiveRuntimeTests: the runtime exited \(String(format: "%.2f", seconds)) s after SIGTERM")

        XCTAssertEqual(try workspace.committedOffsets(allPartitions), expected)
        let rows = try clickhouseRollups(tenant: "acme", instrument: "BTC-USD", timeframe: "5m")
        let expectedRows = expectedRollups(bars, tenant: "acme", instrument: "BTC-USD", lengthMs: 5 * 60_000)
        XCTAssertEqual(rows.map(\.minutes), expectedRows.map(\.minutes),
                       "the rows buffered at SIGTERM were not written")
        XCTAssertEqual(try workspace.redisOffsets(allPartitions), expected,
                       "the offsets stored in Redis with the last transaction")
    }

    func testReadyWaitsForRedis() throws {
        // A private Redis, stopped at once, so that its port stays closed until start().
        let redis = try LocalRedis()
        redis.stop()
        defer { redis.stop() }
        let runtime = try workspace.startRuntime(
            environment: ["DATA_PROC_REDIS_PORT": String(redis.port), "DATA_PROC_REDIS_DB": "0"],
            waitUntilReady: false)

        var ready = ReadyReport(ready: false, reasons: [])
        var readyStatus = 0
        try runtime.waitUntil("Redis is the only reason for 503", timeoutSeconds: 20,
                              detail: { "last /ready: \(readyStatus) \(ready)" }) {
            guard let reply = try? runtime.health("/ready", timeoutSeconds: 2) else { return false }
            readyStatus = reply.status
            ready = try reply.decode(ReadyReport.self)
            return ready.reasons.count == 1 && ready.reasons[0].hasPrefix("Redis is not reachable:")
        }
        XCTAssertEqual(readyStatus, 503)
        XCTAssertFalse(ready.ready)
        XCTAssertTrue(ready.reasons[0].hasPrefix("Redis is not reachable"), ready.reasons[0])
        XCTAssertTrue(ready.reasons[0].contains("127.0.0.1:\(redis.port)"), ready.reasons[0])

        let health = try runtime.health("/health")
        XCTAssertEqual(health.status, 200, "liveness must not fail because a dependency is down")
        let redisComponent = try health.decode(HealthReport.self).components.redis
        XCTAssertEqual(redisComponent.status, "error")
        XCTAssertEqual(redisComponent.state, "unreachable")
        let query = try runtime.api(pricePath("acme", "BTC-USD"))
        XCTAssertEqual(query.status, 500, query.text)
        XCTAssertTrue(query.text.contains("Redis"), query.text)
        XCTAssertTrue(runtime.isRunning, "the runtime exited without Redis")

        try redis.start()
        // NOTE: the runtime marks Redis reachable again only after a successful write, so an idle
        // runtime stays unready; see the skip below.
        let recoveredWithoutTraffic: Bool
        do {
            try runtime.waitUntil("GET /ready returns 200 without traffic", timeoutSeconds: 10) {
                (try? runtime.health("/ready", timeoutSeconds: 2).status) == 200
            }
            recoveredWithoutTraffic = true
        } catch {
            recoveredWithoutTraffic = false
        }

        let bar = barLine("acme", "BTC-USD", startMs: 1_709_547_360_000, close: 62_119.5, volume: 1.25)
        try workspace.publish(lines: [bar], to: workspace.barTopic)
        try runtime.waitUntilReady(timeoutSeconds: 15)
        try waitForEvents(runtime, projection: "latest_price", handled: 1)
        let price = try runtime.api(pricePath("acme", "BTC-USD"))
        XCTAssertEqual(price.status, 200, price.text)
        XCTAssertTrue(runtime.isRunning)

        XCTAssertTrue(recoveredWithoutTraffic,
                      "GET /ready should turn 200 when Redis comes back, before any event arrives")
    }

    // MARK: - Helpers

    private func sampleFile(_ name: String) throws -> URL {
        try Self.stack().repository.appendingPathComponent("examples/events/\(name)")
    }

    private func sampleBars() throws -> [SampleBar] {
        let text = try String(contentsOf: sampleFile("bars.jsonl"), encoding: .utf8)
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try text.split(separator: "\n").map { try decoder.decode(SampleBar.self, from: Data($0.utf8)) }
    }

    private func pricePath(_ tenant: String, _ instrument: String) -> String {
        "/projections/latest_price?tenant_id=\(tenant)&instrument_id=\(instrument)"
    }

    private func projectionList(_ runtime: LiveStack.RuntimeProcess) throws -> ProjectionList {
        let reply = try runtime.api("/projections")
        guard reply.status == 200 else {
            throw LiveStack.Failure(description: "GET /projections returned \(reply.status): \(reply.text)")
        }
        return try reply.decode(ProjectionList.self)
    }

    private func projectionStatus(_ runtime: LiveStack.RuntimeProcess, _ name: String) throws -> ProjectionStatus {
        let list = try projectionList(runtime)
        guard let status = list.projections.first(where: { $0.name == name }) else {
            throw LiveStack.Failure(description: "projection \(name) is not listed: \(list.projections.map(\.name))")
        }
        return status
    }

    /// Waits until the handled and failed events of `projection` add up to at least
    /// `handled + failed`, then asserts each count.
    private func waitForEvents(_ runtime: LiveStack.RuntimeProcess, projection: String, handled: Int, failed: Int = 0,
                               file: StaticString = #filePath, line: UInt = #line) throws {
        var status: ProjectionStatus?
        try runtime.waitUntil("\(projection) has handled \(handled) events and failed \(failed)", timeoutSeconds: 20,
                              detail: { "last status: \(String(describing: status))" }) {
            status = try self.projectionList(runtime).projections.first { $0.name == projection }
            guard let status else { return false }
            return status.eventsHandled + status.eventsFailed >= handled + failed
        }
        XCTAssertEqual(status?.eventsHandled, handled, "\(projection) events_handled", file: file, line: line)
        XCTAssertEqual(status?.eventsFailed, failed, "\(projection) events_failed", file: file, line: line)
    }

    private func clickhouseRollups(tenant: String, instrument: String, timeframe: String) throws -> [RollupBar] {
        let text = try workspace.clickhouseQuery("""
            SELECT bucket_start_ms, bucket_end_ms, open, high, low, close, volume, trade_count, minutes, version
            FROM bar_rollups FINAL
            WHERE tenant_id = '\(tenant)' AND instrument_id = '\(instrument)' AND timeframe = '\(timeframe)'
            ORDER BY bucket_start_ms
            FORMAT JSONEachRow
            """)
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try text.split(separator: "\n").map { try decoder.decode(RollupBar.self, from: Data($0.utf8)) }
    }

    private func assertRollups<Bars: Sequence<RollupBar>>(_ actual: Bars, equal expected: [RollupBar], source: String,
                                                          file: StaticString = #filePath, line: UInt = #line) {
        let actual = Array(actual)
        XCTAssertEqual(actual.map(\.bucketStartMs), expected.map(\.bucketStartMs), "\(source) buckets",
                       file: file, line: line)
        for (row, want) in zip(actual, expected) {
            let bucket = "\(source) bucket \(want.bucketStartMs)"
            // ClickHouse 18.16 may parse a decimal one unit in the last place off (docs/events.md).
            let assertClose = { (actual: Double, expected: Double, field: String) in
                XCTAssertEqual(actual, expected, accuracy: abs(expected) * 1e-12 + 1e-12, "\(bucket) \(field)",
                               file: file, line: line)
            }
            XCTAssertEqual(row.bucketEndMs, want.bucketEndMs, bucket, file: file, line: line)
            assertClose(row.open, want.open, "open")
            assertClose(row.high, want.high, "high")
            assertClose(row.low, want.low, "low")
            assertClose(row.close, want.close, "close")
            assertClose(row.volume, want.volume, "volume")
            XCTAssertEqual(row.tradeCount, want.tradeCount, "\(bucket) trade_count", file: file, line: line)
            XCTAssertEqual(row.minutes, want.minutes, "\(bucket) minutes", file: file, line: line)
            if let version = row.version {
                XCTAssertEqual(version, want.version, "\(bucket) version", file: file, line: line)
            }
        }
    }

    /// Returns the value of the Prometheus series `name` whose labels are exactly `labels`.
    private func metric(_ exposition: String, _ name: String, _ labels: [String: String]) -> Double? {
        for line in exposition.split(separator: "\n") where line.hasPrefix(name + "{") || line.hasPrefix(name + " ") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
                continue
            }
            if metricLabels(line[..<space]) == labels {
                return value
            }
        }
        return nil
    }

    /// Parses `name{a="1",b="2"}` into its labels. Escaped characters keep only the character
    /// after the backslash, which is enough to compare plain label values.
    private func metricLabels(_ series: Substring) -> [String: String] {
        guard let open = series.firstIndex(of: "{"), series.last == "}" else { return [:] }
        var labels: [String: String] = [:]
        var rest = series[series.index(after: open)..<series.index(before: series.endIndex)]
        while let separator = rest.range(of: "=\"") {
            let name = rest[..<separator.lowerBound].trimmingCharacters(in: CharacterSet(charactersIn: ", "))
            var value = ""
            var index = separator.upperBound
            while index < rest.endIndex, rest[index] != "\"" {
                if rest[index] == "\\", rest.index(after: index) < rest.endIndex {
                    index = rest.index(after: index)
                }
                value.append(rest[index])
                index = rest.index(after: index)
            }
            labels[name] = value
            rest = index < rest.endIndex ? rest[rest.index(after: index)...] : rest[rest.endIndex...]
        }
        return labels
    }
}

// MARK: - Expected values from the sample events

/// One line of examples/events/bars.jsonl.
private struct SampleBar: Decodable {
    var tenantId: String
    var instrumentId: String
    var timeframe: String
    var startMs: Int64
    var endMs: Int64
    var open: Double
    var high: Double
    var low: Double
    var close: Double
    var volume: Double
    var tradeCount: Int?
    var revision: Int?
}

/// Returns the bar that latest_price serves for each "tenant:instrument": the greatest end_ms,
/// and at equal end_ms the higher revision (docs/events.md).
private func expectedLatestPrices(_ bars: [SampleBar]) -> [String: SampleBar] {
    var latest: [String: SampleBar] = [:]
    for bar in bars {
        let key = "\(bar.tenantId):\(bar.instrumentId)"
        if let current = latest[key], (current.endMs, current.revision ?? 0) >= (bar.endMs, bar.revision ?? 0) {
            continue
        }
        latest[key] = bar
    }
    return latest
}

/// Returns the rolled-up buckets of one instrument, computed as docs/events.md describes
/// bar_rollups: the latest revision of each minute, open of the first minute, close of the last,
/// max high, min low, summed volume and trade_count, and version = minutes + sum of revisions.
private func expectedRollups(_ bars: [SampleBar], tenant: String, instrument: String, lengthMs: Int64) -> [RollupBar] {
    var minutes: [Int64: SampleBar] = [:]
    for bar in bars where bar.tenantId == tenant && bar.instrumentId == instrument && bar.timeframe == "1m" {
        if let current = minutes[bar.startMs], (current.revision ?? 0) >= (bar.revision ?? 0) {
            continue
        }
        minutes[bar.startMs] = bar
    }

    let buckets = Dictionary(grouping: minutes.values) { $0.startMs - $0.startMs % lengthMs }
    return buckets.keys.sorted().map { start in
        let members = buckets[start]!.sorted { $0.startMs < $1.startMs }
        var volume = 0.0
        var tradeCount: Int?
        for member in members {
            volume += member.volume
            if let count = member.tradeCount {
                tradeCount = (tradeCount ?? 0) + count
            }
        }
        return RollupBar(bucketStartMs: start, bucketEndMs: start + lengthMs, open: members.first!.open,
                         high: members.map(\.high).max()!, low: members.map(\.low).min()!, close: members.last!.close,
                         volume: volume, tradeCount: tradeCount, minutes: members.count,
                         version: members.count + members.reduce(0) { $0 + ($1.revision ?? 0) })
    }
}

/// Returns a one-minute bar as a kcat line (`key|value`), with open, high, low and close all
/// equal to `close`.
private func barLine(_ tenant: String, _ instrument: String, startMs: Int64, close: Double, volume: Double) -> String {
    "\(tenant):\(instrument)|{\"tenant_id\":\"\(tenant)\",\"instrument_id\":\"\(instrument)\",\"timeframe\":\"1m\","
        + "\"start_ms\":\(startMs),\"end_ms\":\(startMs + 60_000),\"open\":\(close),\"high\":\(close),"
        + "\"low\":\(close),\"close\":\(close),\"volume\":\(volume)}"
}

// MARK: - Projections written by the tests

/// Sums the volume of every bar per (tenant, instrument) in a Redis hash and serves the sum.
private let volumeTotalSource = """
    -- Sums bar volumes per (tenant, instrument) in the Redis hash vt:{tenant_id}.
    local events = require("events")

    local function on_event(event, ctx)
      local bar = events.validate_bar(event)
      ctx.redis("HINCRBYFLOAT", "vt:{" .. bar.tenant_id .. "}", bar.instrument_id, bar.volume)
    end

    local function query_total(params, ctx)
      if params.tenant_id == nil or params.instrument_id == nil then
        return nil, "query parameters 'tenant_id' and 'instrument_id' are required"
      end
      local total = ctx.redis("HGET", "vt:{" .. params.tenant_id .. "}", params.instrument_id)
      if total == nil or total == json.null then
        return nil
      end
      return { tenant_id = params.tenant_id, instrument_id = params.instrument_id, volume = tonumber(total) }
    end

    return {
      topics = { settings.aggregated_topic },
      on_event = on_event,
      queries = { default = query_total },
    }

    """

/// A projection file whose line 2 does not parse.
private let brokenSource = """
    -- Line 2 is a syntax error.
    local total = = 0
    return { topics = { settings.aggregated_topic }, on_event = function(event, ctx) end }

    """

// MARK: - Response bodies

private struct FailureReport: Decodable {
    var file: String
    var line: Int?
    var projection: String?
    var phase: String
    var message: String
}

private struct ResponseMeta: Decodable {
    var projection: String
    var version: String
    var appliedOffsets: [String: Int64]
}

private struct LatestPrice: Decodable {
    var meta: ResponseMeta
    var tenantId: String
    var instrumentId: String
    var price: Double
    var asOfMs: Int64
    var timeframe: String
    var volume: Double

    enum CodingKeys: String, CodingKey {
        case meta = "_meta"
        case tenantId, instrumentId, price, asOfMs, timeframe, volume
    }
}

private struct VolumeTotal: Decodable {
    var meta: ResponseMeta
    var tenantId: String
    var instrumentId: String
    var volume: Double

    enum CodingKeys: String, CodingKey {
        case meta = "_meta"
        case tenantId, instrumentId, volume
    }
}

/// A rolled-up bucket: a ClickHouse row (with version) or a member of the bars query (without).
private struct RollupBar: Decodable {
    var bucketStartMs: Int64
    var bucketEndMs: Int64
    var open: Double
    var high: Double
    var low: Double
    var close: Double
    var volume: Double
    var tradeCount: Int?
    var minutes: Int
    var version: Int?
}

private struct RollupList: Decodable {
    var tenantId: String
    var instrumentId: String
    var timeframe: String
    var bars: [RollupBar]
}

private struct ProjectionStatus: Decodable {
    var name: String
    var file: String
    var version: String
    var status: String
    var topics: [String]
    var queries: [String]
    var eventsHandled: Int
    var eventsFailed: Int
    var loadError: FailureReport?
    var lastEventError: FailureReport?
}

private struct ProjectionList: Decodable {
    var generation: Int
    var projections: [ProjectionStatus]
    var failedFiles: [FailureReport]
}

private struct ReadyReport: Decodable {
    var ready: Bool
    var reasons: [String]
}

private struct HealthReport: Decodable {
    struct Component: Decodable {
        var status: String
        var state: String
        var error: String?
    }

    struct LoadedProjection: Decodable {
        var name: String
        var version: String
    }

    struct Projections: Decodable {
        var status: String
        var generation: Int
        var loaded: [LoadedProjection]
        var errors: [FailureReport]
    }

    struct Components: Decodable {
        var kafka: Component
        var redis: Component
        var clickhouse: Component
        var projections: Projections
    }

    var status: String
    var components: Components
}

private struct ReloadReport: Decodable {
    struct Entry: Decodable {
        var result: String
        var projection: String
        var file: String
        var version: String?
        var error: FailureReport?
        var keptVersion: String?
    }

    var trigger: String
    var generation: Int
    var succeeded: Bool
    var entries: [Entry]
}
