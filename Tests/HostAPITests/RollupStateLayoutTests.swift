import Foundation
import XCTest

@testable import HostAPI

/// bar_rollups must keep reading keyed state written by its previous layout
/// ({ minutes = {...} } per bucket, { open_buckets = [...] } per instrument), because that state
/// survives restarts in Redis.
final class RollupStateLayoutTests: XCTestCase {
    private let topic = "aggregation.bars.v1"
    /// 2024-03-04 10:00:00 UTC.
    private let tenOClock: Int64 = 1_709_546_400_000
    private let nowMs: Int64 = 1_709_560_000_000

    private func makeRunner() throws -> ProjectionRunner {
        let folder = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("projections").path
        // Sorted keys make rows from the two runs comparable byte for byte.
        var settings = HostSettings()
        settings.sortObjectKeys = true
        let (set, report) = try ProjectionLoader(folder: folder, settings: settings).load(nowMs: nowMs)
        XCTAssertEqual(report.failures.map(\.description), [])
        let rollups = ProjectionSet(generation: 1, projections: set.projections.filter { $0.name == "bar_rollups" })
        return ProjectionRunner(set: rollups, settings: settings)
    }

    private func bar(minute: Int64, open: Double, high: Double, low: Double, close: Double,
                     volume: Double, tradeCount: Int?) -> EventMessage {
        let start = tenOClock + minute * 60_000
        let tradeCountField = tradeCount.map { #","trade_count":\#($0)"# } ?? ""
        let text = #"{"tenant_id":"acme","instrument_id":"BTC-USD","timeframe":"1m","start_ms":\#(start),"end_ms":\#(start + 60_000),"open":\#(open),"high":\#(high),"low":\#(low),"close":\#(close),"volume":\#(volume)\#(tradeCountField)}"#
        return EventMessage(topic: topic, partition: 0, offset: minute, payload: Array(text.utf8))
    }

    /// Returns the effects of `message` other than state changes, whose encoding differs
    /// between layouts.
    private func outputEffects(_ runner: ProjectionRunner, _ message: EventMessage,
                               store: KeyedStateStore) throws -> [Effect] {
        let results = runner.handle(message, store: store, nowMs: nowMs)
        XCTAssertEqual(results.count, 1)
        guard case .handled(let effects) = try XCTUnwrap(results.first).outcome else {
            XCTFail("bar_rollups failed: \(String(describing: results.first?.outcome))")
            return []
        }
        return effects.filter {
            if case .state = $0 { return false }
            return true
        }
    }

    func testPreviousLayoutStateIsRead() throws {
        let first = bar(minute: 2, open: 100.5, high: 101.25, low: 99.75, close: 101, volume: 3.215, tradeCount: 41)
        let second = bar(minute: 1, open: 101, high: 103.5, low: 100, close: 102.25, volume: 7, tradeCount: nil)
        let third = bar(minute: 3, open: 102, high: 102.5, low: 98.75, close: 99, volume: 0.1, tradeCount: 5)

        // Reference: all three minutes through the current code.
        let fresh = try makeRunner()
        let freshStore = InMemoryStateStore()
        _ = try outputEffects(fresh, first, store: freshStore)
        let expectedSecond = try outputEffects(fresh, second, store: freshStore)
        let expectedThird = try outputEffects(fresh, third, store: freshStore)

        // The state the previous layout stored after the first minute.
        let minute = #"{"minutes":{"1709546520000":{"close":101.0,"high":101.25,"low":99.75,"open":100.5,"revision":0,"trade_count":41,"volume":3.215}}}"#
        let instrument = #"{"open_buckets":[{"end_ms":1709546700000,"start_ms":1709546400000,"timeframe":"5m"},{"end_ms":1709547300000,"start_ms":1709546400000,"timeframe":"15m"},{"end_ms":1709550000000,"start_ms":1709546400000,"timeframe":"1h"}],"watermark_ms":1709546580000}"#
        let changes = [
            StateChange(key: Array("instrument:acme:BTC-USD".utf8), value: Array(instrument.utf8)),
            StateChange(key: Array("bucket:acme:5m:1709546400000:BTC-USD".utf8), value: Array(minute.utf8)),
            StateChange(key: Array("bucket:acme:15m:1709546400000:BTC-USD".utf8), value: Array(minute.utf8)),
            StateChange(key: Array("bucket:acme:1h:1709546400000:BTC-USD".utf8), value: Array(minute.utf8)),
        ]
        let migratedStore = InMemoryStateStore()
        migratedStore.apply(scope: StateScope(projection: "bar_rollups", topic: topic, partition: 0),
                            changes: changes, nowMs: nowMs)

        let migrated = try makeRunner()
        let secondEffects = try outputEffects(migrated, second, store: migratedStore)
        XCTAssertEqual(secondEffects.count, 12, "an insert and three Redis commands per timeframe")
        XCTAssertEqual(secondEffects, expectedSecond, "an out-of-order minute merges with the stored one")
        XCTAssertEqual(try outputEffects(migrated, third, store: migratedStore), expectedThird,
                       "a later minute appends to the converted bucket")
    }
}
