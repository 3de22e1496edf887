import Foundation
import XCTest

@testable import HostAPI

/// Runs the shipped projections (latest_price, invalidation_rules, bar_rollups) against a real
/// redis-server. Each event's Redis effects are applied in order, as the live runtime applies
/// them, and the queries read the results back through redis-cli.
final class ProjectionSemanticsTests: XCTestCase {
    private static let minuteMs: Int64 = 60_000
    private static let hourMs: Int64 = 60 * minuteMs
    /// 2024-03-04 10:00:00 UTC, a whole number of hours after the epoch.
    private static let tenOClock: Int64 = 1_709_546_400_000

    private let barsTopic = "aggregation.bars.v1"
    private let invalidationTopic = "projection.invalidation.v1"
    /// Wall-clock time of every call. It only starts state TTLs, which are days long.
    private let nowMs: Int64 = 1_709_560_000_000

    private var redis: RedisTestServer!
    private var backend: RedisQueryBackend!
    private var runner: ProjectionRunner!
    private var store = InMemoryStateStore()
    /// Each projection's declared scripts by name, for reloading after NOSCRIPT.
    private var scripts: [String: [String: RedisScript]] = [:]
    private var definitions: [ProjectionDefinition] = []
    private var nextOffset: Int64 = 0

    override func setUpWithError() throws {
        let folder = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("projections").path
        let (set, report) = try ProjectionLoader(folder: folder).load(nowMs: nowMs)
        XCTAssertEqual(report.failures.map(\.description), [])
        XCTAssertEqual(set.projections.map(\.name), ["bar_rollups", "invalidation_rules", "latest_price"])
        definitions = set.projections
        runner = ProjectionRunner(set: set, settings: HostSettings())

        redis = try RedisTestServer()
        backend = RedisQueryBackend(server: redis)
        for definition in set.projections {
            for script in definition.scripts {
                scripts[definition.name, default: [:]][script.name] = script
                XCTAssertEqual(try redis.loadScript(script.source), script.sha1,
                               "SCRIPT LOAD of \(definition.name).\(script.name) returned another SHA-1")
            }
        }
    }

    override func tearDown() {
        redis?.stop()
        redis = nil
        backend = nil
        runner = nil
        super.tearDown()
    }

    // MARK: - Events

    /// A 1m bar of the aggregated topic, `minute` minutes after 10:00 UTC.
    private struct Bar {
        var tenant = "acme"
        var instrument = "BTC-USD"
        var minute: Int64
        var open = 100.0
        var high = 101.0
        var low = 99.0
        var close = 100.5
        var volume = 1.0
        var tradeCount: Int? = 10
        var revision: Int? = nil

        var startMs: Int64 { ProjectionSemanticsTests.tenOClock + minute * ProjectionSemanticsTests.minuteMs }
        var endMs: Int64 { startMs + ProjectionSemanticsTests.minuteMs }

        /// Returns the JSON payload without the fields named in `omitted`.
        func payload(omitting omitted: Set<String> = []) -> String {
            var fields: [(String, String)] = [
                ("tenant_id", ProjectionSemanticsTests.quoted(tenant)),
                ("instrument_id", ProjectionSemanticsTests.quoted(instrument)),
                ("timeframe", ProjectionSemanticsTests.quoted("1m")), ("start_ms", "\(startMs)"), ("end_ms", "\(endMs)"),
                ("open", "\(open)"), ("high", "\(high)"), ("low", "\(low)"), ("close", "\(close)"),
                ("volume", "\(volume)"),
            ]
            if let tradeCount {
                fields.append(("trade_count", "\(tradeCount)"))
            }
            if let revision {
                fields.append(("revision", "\(revision)"))
            }
            let members = fields.filter { !omitted.contains($0.0) }.map { "\(ProjectionSemanticsTests.quoted($0.0)):\($0.1)" }
            return "{" + members.joined(separator: ",") + "}"
        }
    }

    private static func quoted(_ value: String) -> String {
        let data = try! JSONSerialization.data(withJSONObject: value, options: .fragmentsAllowed)
        return String(decoding: data, as: UTF8.self)
    }

    private func invalidation(tenant: String = "acme", instrument: String? = nil, issuedMs: Int64) -> String {
        var payload = #"{"tenant_id":\#(Self.quoted(tenant)),"reason":"vendor feed restated","issued_ms":\#(issuedMs)"#
        if let instrument {
            payload += #","scope":"instrument","instrument_id":\#(Self.quoted(instrument))}"#
        } else {
            payload += #","scope":"tenant"}"#
        }
        return payload
    }

    /// One projection's outcome for one event, and the Redis replies to the effects applied.
    private struct Delivery {
        var outcome: EventOutcome
        var replies: [QueryReply]

        var effects: [Effect] { outcome.effects ?? [] }

        var scriptCalls: [String] {
            effects.compactMap { effect in
                if case .redisScript(let name, _, _, _) = effect { return name }
                return nil
            }
        }

        var redisEffectCount: Int {
            effects.filter { effect in
                switch effect {
                case .redis, .redisScript: true
                default: false
                }
            }.count
        }

        var counts: [Effect] {
            effects.filter { effect in
                if case .count = effect { return true }
                return false
            }
        }
    }

    /// Hands the event to every projection of `topic` and applies each handled projection's
    /// effects to Redis. `store` replaces the keyed state of the test for this event only.
    @discardableResult
    private func deliver(_ payload: String, topic: String, store: InMemoryStateStore? = nil) throws -> [String: Delivery] {
        nextOffset += 1
        let event = message(payload, topic: topic, partition: 0, offset: nextOffset)
        var deliveries: [String: Delivery] = [:]
        for result in runner.handle(event, store: store ?? self.store, nowMs: nowMs) {
            var replies: [QueryReply] = []
            if case .handled(let effects) = result.outcome {
                replies = try redis.apply(effects, scripts: scripts[result.projection] ?? [:])
            }
            deliveries[result.projection] = Delivery(outcome: result.outcome, replies: replies)
        }
        return deliveries
    }

    /// Delivers a bar and checks that both bar projections handled it.
    @discardableResult
    private func deliver(_ bar: Bar, store: InMemoryStateStore? = nil,
                         file: StaticString = #filePath, line: UInt = #line) throws -> [String: Delivery] {
        let deliveries = try deliver(bar.payload(), topic: barsTopic, store: store)
        XCTAssertEqual(deliveries.keys.sorted(), ["bar_rollups", "latest_price"], file: file, line: line)
        for (projection, delivery) in deliveries {
            XCTAssertNil(delivery.outcome.failure, "\(projection) failed on minute \(bar.minute)", file: file, line: line)
        }
        return deliveries
    }

    @discardableResult
    private func deliverInvalidation(tenant: String = "acme", instrument: String? = nil, issuedMs: Int64,
                                     file: StaticString = #filePath, line: UInt = #line) throws -> Delivery {
        let deliveries = try deliver(invalidation(tenant: tenant, instrument: instrument, issuedMs: issuedMs),
                                     topic: invalidationTopic)
        let delivery = try XCTUnwrap(deliveries["invalidation_rules"], file: file, line: line)
        XCTAssertNil(delivery.outcome.failure, file: file, line: line)
        return delivery
    }

    private func minuteStart(_ minute: Int64) -> Int64 {
        Self.tenOClock + minute * Self.minuteMs
    }

    private func minuteEnd(_ minute: Int64) -> Int64 {
        minuteStart(minute) + Self.minuteMs
    }

    // MARK: - Queries

    private struct QueryFailure: Error, CustomStringConvertible {
        var description: String
    }

    /// The latest_price response body.
    private struct ServedPrice: Decodable, Equatable {
        var price: Double
        var asOfMs: Int64
        var timeframe: String
        var volume: Double

        enum CodingKeys: String, CodingKey {
            case price, timeframe, volume
            case asOfMs = "as_of_ms"
        }
    }

    private func query(_ projection: String, _ name: String, _ parameters: [String: String]) throws -> QueryOutcome {
        let instance = try XCTUnwrap(runner.instance(named: projection))
        return instance.query(name, parameters: parameters, backend: backend, nowMs: nowMs)
    }

    /// Queries latest_price and returns the served price, or nil on 404.
    private func servedPrice(_ instrument: String = "BTC-USD", tenant: String = "acme") throws -> ServedPrice? {
        let outcome = try query("latest_price", "default", ["tenant_id": tenant, "instrument_id": instrument])
        switch outcome {
        case .found(let body):
            return try JSONDecoder().decode(ServedPrice.self, from: Data(body))
        case .notFound:
            return nil
        default:
            throw QueryFailure(description: "latest_price query for \(tenant) \(instrument) returned \(outcome)")
        }
    }

    private func price(of bar: Bar) -> ServedPrice {
        ServedPrice(price: bar.close, asOfMs: bar.endMs, timeframe: "1m", volume: bar.volume)
    }

    /// A rolled-up bar as the Redis member and the `bars` query carry it.
    private struct RolledBar: Decodable, Equatable {
        var bucketStartMs: Int64
        var bucketEndMs: Int64
        var open: Double
        var high: Double
        var low: Double
        var close: Double
        var volume: Double
        var tradeCount: Int64?
        var minutes: Int

        enum CodingKeys: String, CodingKey {
            case open, high, low, close, volume, minutes
            case bucketStartMs = "bucket_start_ms"
            case bucketEndMs = "bucket_end_ms"
            case tradeCount = "trade_count"
        }
    }

    /// A row of the ClickHouse table bar_rollups: the rolled-up bar and the columns around it.
    private struct RollupRow: Decodable, Equatable {
        var tenantId: String
        var instrumentId: String
        var timeframe: String
        var version: Int64
        var bar: RolledBar

        enum CodingKeys: String, CodingKey {
            case timeframe, version
            case tenantId = "tenant_id"
            case instrumentId = "instrument_id"
        }

        init(from decoder: Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            tenantId = try container.decode(String.self, forKey: .tenantId)
            instrumentId = try container.decode(String.self, forKey: .instrumentId)
            timeframe = try container.decode(String.self, forKey: .timeframe)
            version = try container.decode(Int64.self, forKey: .version)
            bar = try RolledBar(from: decoder)
        }
    }

    private struct BarsResponse: Decodable {
        var tenantId: String
        var instrumentId: String
        var timeframe: String
        var bars: [RolledBar]

        enum CodingKeys: String, CodingKey {
            case timeframe, bars
            case tenantId = "tenant_id"
            case instrumentId = "instrument_id"
        }
    }

    /// Queries bar_rollups `bars` and returns the buckets, newest first.
    private func rolledBars(_ timeframe: String, instrument: String = "BTC-USD", tenant: String = "acme") throws -> [RolledBar] {
        let parameters = ["tenant_id": tenant, "instrument_id": instrument, "timeframe": timeframe]
        let outcome = try query("bar_rollups", "bars", parameters)
        guard case .found(let body) = outcome else {
            throw QueryFailure(description: "bars query \(parameters) returned \(outcome)")
        }
        let response = try JSONDecoder().decode(BarsResponse.self, from: Data(body))
        XCTAssertEqual(response.tenantId, tenant)
        XCTAssertEqual(response.instrumentId, instrument)
        XCTAssertEqual(response.timeframe, timeframe)
        return response.bars
    }

    /// Decodes the bar_rollups rows among `effects`, in order.
    private func rollupRows(_ effects: [Effect]) throws -> [RollupRow] {
        var rows: [RollupRow] = []
        for effect in effects {
            guard case .insert(let table, let row) = effect else { continue }
            XCTAssertEqual(table, "bar_rollups")
            rows.append(try JSONDecoder().decode(RollupRow.self, from: Data(row)))
        }
        return rows
    }

    private func count(_ name: String, timeframe: String? = nil) -> Effect {
        let labels = timeframe.map { #"{"timeframe":"\#($0)"}"# } ?? ""
        return .count(name: name, by: 1, labels: Array(labels.utf8))
    }

    // MARK: - Redis scripts

    func testScriptShasMatchRedis() throws {
        var loaded: [String] = []
        for definition in definitions {
            for script in definition.scripts {
                loaded.append("\(definition.name).\(script.name)")
                XCTAssertEqual(try redis.loadScript(script.source), script.sha1, script.name)
                XCTAssertEqual(try redis.run(["SCRIPT", "EXISTS", script.sha1]), .array([.integer(1)]), script.name)
            }
        }
        XCTAssertEqual(loaded.sorted(), [
            "invalidation_rules.invalidate_instrument", "invalidation_rules.invalidate_tenant",
            "latest_price.set_price",
        ])

        // After a flush, EVALSHA fails with NOSCRIPT, the source is loaded again and the retry
        // finds it under the same SHA-1.
        XCTAssertEqual(try redis.run(["SCRIPT", "FLUSH"]), .bytes(Array("OK".utf8)))
        let deliveries = try deliver(Bar(minute: 0))
        XCTAssertEqual(deliveries["latest_price"]?.replies, [.bytes(Array("written".utf8))])
        XCTAssertEqual(try servedPrice(), price(of: Bar(minute: 0)))
    }

    func testScriptsAvoidKeyspaceScans() throws {
        let scanCall = try NSRegularExpression(
            pattern: #"redis\.p?call\s*\(\s*['"](KEYS|SCAN)['"]"#, options: [.caseInsensitive])
        func scans(_ source: String) -> Bool {
            scanCall.firstMatch(in: source, range: NSRange(source.startIndex..., in: source)) != nil
        }
        XCTAssertTrue(scans("return redis.call('KEYS', 'lp:*')"), "the pattern must find a KEYS call")
        XCTAssertTrue(scans(#"redis.pcall("scan", 0)"#), "the pattern must find a SCAN call")
        XCTAssertFalse(scans("return redis.call('GET', KEYS[1])"), "KEYS[1] is not a KEYS call")

        let all = definitions.flatMap(\.scripts)
        XCTAssertEqual(all.count, 3)
        for script in all {
            XCTAssertFalse(scans(text(script.source)), "script \(script.name) calls KEYS or SCAN")
        }
    }

    // MARK: - latest_price

    func testLatestPriceNewestEndWins() throws {
        let first = Bar(minute: 0, close: 100.5)
        try deliver(first)
        XCTAssertEqual(try servedPrice(), price(of: first))

        let second = Bar(minute: 1, open: 100.5, high: 102.5, low: 100.5, close: 102.25, volume: 2.5)
        let deliveries = try deliver(second)
        XCTAssertEqual(deliveries["latest_price"]?.replies, [.bytes(Array("written".utf8))])
        XCTAssertEqual(try servedPrice(), price(of: second))
    }

    func testLatestPriceIgnoresOlderBar() throws {
        let newest = Bar(minute: 5, open: 105, high: 106, low: 104, close: 105)
        try deliver(newest)

        // The keyed state already has a later bar, so no script runs.
        let older = try deliver(Bar(minute: 3, close: 100.25))
        XCTAssertEqual(older["latest_price"]?.scriptCalls, [])
        XCTAssertEqual(older["latest_price"]?.counts, [count("superseded_bars")])
        XCTAssertEqual(try servedPrice(), price(of: newest))

        // Without keyed state the bar reaches set_price, which compares it with the stored hash.
        let withoutState = try deliver(Bar(minute: 4, close: 100.75), store: InMemoryStateStore())
        XCTAssertEqual(withoutState["latest_price"]?.scriptCalls, ["set_price"])
        XCTAssertEqual(withoutState["latest_price"]?.replies, [.bytes(Array("stale".utf8))])
        XCTAssertEqual(try servedPrice(), price(of: newest))
    }

    func testLatestPriceHigherRevisionWins() throws {
        try deliver(Bar(minute: 0, close: 100.5))
        let correction = Bar(minute: 0, close: 100.75, volume: 1.25, revision: 1)
        let deliveries = try deliver(correction)
        XCTAssertEqual(deliveries["latest_price"]?.replies, [.bytes(Array("written".utf8))])
        XCTAssertEqual(try servedPrice(), price(of: correction))

        let second = Bar(minute: 0, close: 99.5, revision: 2)
        try deliver(second, store: InMemoryStateStore())
        XCTAssertEqual(try servedPrice(), price(of: second))
    }

    func testLatestPriceIgnoresEqualRevision() throws {
        let served = Bar(minute: 0, close: 100.75, revision: 1)
        try deliver(served)

        // Same end_ms and revision with another close: a replay, so nothing changes.
        let replay = Bar(minute: 0, close: 99.5, revision: 1)
        let withState = try deliver(replay)
        XCTAssertEqual(withState["latest_price"]?.scriptCalls, [])
        XCTAssertEqual(withState["latest_price"]?.counts, [count("superseded_bars")])
        XCTAssertEqual(try servedPrice(), price(of: served))

        let withoutState = try deliver(replay, store: InMemoryStateStore())
        XCTAssertEqual(withoutState["latest_price"]?.replies, [.bytes(Array("stale".utf8))])
        XCTAssertEqual(try servedPrice(), price(of: served))

        let lowerRevision = try deliver(Bar(minute: 0, close: 99.5, revision: 0), store: InMemoryStateStore())
        XCTAssertEqual(lowerRevision["latest_price"]?.replies, [.bytes(Array("stale".utf8))])
        XCTAssertEqual(try servedPrice(), price(of: served))
    }

    func testLatestPriceQueryFields() throws {
        // 17 significant digits, so a price stored with fewer digits would not compare equal.
        let bar = Bar(minute: 16, open: 62120.5, high: 62131.0, low: 62112.0, close: 62115.123456789012,
                      volume: 3.08, tradeCount: 42)
        try deliver(bar)

        let outcome = try query("latest_price", "default", ["tenant_id": "acme", "instrument_id": "BTC-USD"])
        guard case .found(let body) = outcome else {
            return XCTFail("expected a price, got \(outcome)")
        }
        let object = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any])
        XCTAssertEqual(object.keys.sorted(), ["as_of_ms", "instrument_id", "price", "tenant_id", "timeframe", "volume"])
        XCTAssertEqual(object["tenant_id"] as? String, "acme")
        XCTAssertEqual(object["instrument_id"] as? String, "BTC-USD")
        XCTAssertEqual(object["timeframe"] as? String, "1m")
        XCTAssertEqual((object["as_of_ms"] as? NSNumber)?.int64Value, 1_709_547_420_000)
        XCTAssertEqual((object["price"] as? NSNumber)?.doubleValue, 62115.123456789012)
        XCTAssertEqual((object["volume"] as? NSNumber)?.doubleValue, 3.08)
        XCTAssertEqual(bar.endMs, 1_709_547_420_000)

        // The query only reads the price hash and the two invalidation watermarks.
        XCTAssertEqual(backend.commands, ["HGETALL", "MGET"])
    }

    func testLatestPriceMissingParameter() throws {
        try deliver(Bar(minute: 0))
        let cases: [([String: String], String)] = [
            (["instrument_id": "BTC-USD"], "query parameter 'tenant_id' is missing"),
            (["tenant_id": "acme"], "query parameter 'instrument_id' is missing"),
            (["tenant_id": "", "instrument_id": "BTC-USD"], "query parameter 'tenant_id' must not be empty"),
            (["tenant_id": "acme:x", "instrument_id": "BTC-USD"], "query parameter 'tenant_id' must not contain ':', '{' or '}'"),
        ]
        for (parameters, expected) in cases {
            let outcome = try query("latest_price", "default", parameters)
            guard case .badRequest(let message) = outcome else {
                XCTFail("\(parameters): expected 400, got \(outcome)")
                continue
            }
            XCTAssertTrue(message.hasPrefix(expected), "\(parameters): \(message)")
        }
    }

    func testLatestPriceUnknownInstrument() throws {
        try deliver(Bar(minute: 0))
        XCTAssertNotNil(try servedPrice("BTC-USD"))
        XCTAssertNil(try servedPrice("DOGE-USD"))
        XCTAssertNil(try servedPrice("BTC-USD", tenant: "globex"), "another tenant's instrument of the same name")
    }

    // MARK: - invalidation_rules

    func testInstrumentInvalidationUntilNewerBar() throws {
        let bitcoin = Bar(minute: 4, open: 105, high: 106, low: 104, close: 105)
        let ether = Bar(instrument: "ETH-USD", minute: 4, close: 100.25)
        try deliver(bitcoin)
        try deliver(ether)

        // as_of_ms equal to issued_ms is covered.
        let issuedMs = bitcoin.endMs
        let invalidation = try deliverInvalidation(instrument: "BTC-USD", issuedMs: issuedMs)
        XCTAssertEqual(invalidation.scriptCalls, ["invalidate_instrument"])
        XCTAssertEqual(invalidation.replies, [.integer(1)])
        XCTAssertNil(try servedPrice("BTC-USD"))
        XCTAssertEqual(try servedPrice("ETH-USD"), price(of: ether))
        XCTAssertEqual(try redis.run(["EXISTS", "lp:{acme}:price:BTC-USD"]), .integer(0))
        XCTAssertEqual(try redis.run(["SISMEMBER", "lp:{acme}:served", "BTC-USD"]), .integer(0))

        // A correction of the invalidated bar ends at issued_ms, so it does not bring the price back.
        let correction = try deliver(Bar(minute: 4, open: 105, high: 106, low: 104, close: 104.5, revision: 1))
        XCTAssertEqual(correction["latest_price"]?.replies, [.bytes(Array("invalidated".utf8))])
        XCTAssertNil(try servedPrice("BTC-USD"))

        let earlier = try deliver(Bar(minute: 2, close: 101), store: InMemoryStateStore())
        XCTAssertEqual(earlier["latest_price"]?.replies, [.bytes(Array("invalidated".utf8))])
        XCTAssertNil(try servedPrice("BTC-USD"))

        let newer = Bar(minute: 5, close: 100.75)
        let served = try deliver(newer)
        XCTAssertEqual(served["latest_price"]?.replies, [.bytes(Array("written".utf8))])
        XCTAssertEqual(try servedPrice("BTC-USD"), price(of: newer))
    }

    func testTenantInvalidationCoversTenantOnly() throws {
        for (index, instrument) in ["BTC-USD", "ETH-USD", "SOL-USD"].enumerated() {
            try deliver(Bar(instrument: instrument, minute: Int64(index)))
        }
        let other = Bar(tenant: "globex", instrument: "BTC-USD", minute: 3)
        try deliver(other)

        XCTAssertEqual(try redis.run(["CONFIG", "RESETSTAT"]), .bytes(Array("OK".utf8)))
        let invalidation = try deliverInvalidation(issuedMs: minuteEnd(9))
        XCTAssertEqual(invalidation.scriptCalls, ["invalidate_tenant"])
        XCTAssertEqual(invalidation.redisEffectCount, 1)
        XCTAssertEqual(invalidation.replies, [.integer(3)])

        for instrument in ["BTC-USD", "ETH-USD", "SOL-USD"] {
            XCTAssertNil(try servedPrice(instrument), instrument)
        }
        XCTAssertEqual(try servedPrice("BTC-USD", tenant: "globex"), price(of: other))
        XCTAssertEqual(try redis.run(["SMEMBERS", "lp:{acme}:served"]), .array([]))
        XCTAssertEqual(try redis.run(["SMEMBERS", "lp:{globex}:served"]), .array([.bytes(Array("BTC-USD".utf8))]))

        // Redis counts the commands a script calls, so the script visited the served set and
        // never listed the keyspace.
        let stats = try redis.info("commandstats")
        XCTAssertTrue(stats.contains("cmdstat_smembers:"), stats)
        XCTAssertFalse(stats.contains("cmdstat_keys:"), stats)
        XCTAssertFalse(stats.contains("cmdstat_scan:"), stats)

        // The tenant watermark also holds back bars that ended at or before issued_ms.
        let earlier = try deliver(Bar(instrument: "ETH-USD", minute: 8), store: InMemoryStateStore())
        XCTAssertEqual(earlier["latest_price"]?.replies, [.bytes(Array("invalidated".utf8))])
        XCTAssertNil(try servedPrice("ETH-USD"))
        let newer = Bar(instrument: "ETH-USD", minute: 10, close: 100.25)
        try deliver(newer)
        XCTAssertEqual(try servedPrice("ETH-USD"), price(of: newer))
    }

    func testInvalidationKeepsNewerPrice() throws {
        let bitcoin = Bar(minute: 16, close: 100.25)
        let ether = Bar(instrument: "ETH-USD", minute: 4, close: 100.75)
        try deliver(bitcoin)
        try deliver(ether)

        // issued_ms 10:10 covers ETH-USD (as_of_ms 10:05) but not BTC-USD (as_of_ms 10:17).
        let tenant = try deliverInvalidation(issuedMs: minuteStart(10))
        XCTAssertEqual(tenant.replies, [.integer(1)])
        XCTAssertNil(try servedPrice("ETH-USD"))
        XCTAssertEqual(try servedPrice("BTC-USD"), price(of: bitcoin))
        XCTAssertEqual(try redis.run(["SMEMBERS", "lp:{acme}:served"]), .array([.bytes(Array("BTC-USD".utf8))]))

        let instrument = try deliverInvalidation(instrument: "BTC-USD", issuedMs: bitcoin.endMs - 1)
        XCTAssertEqual(instrument.replies, [.integer(0)])
        XCTAssertEqual(try servedPrice("BTC-USD"), price(of: bitcoin))
    }

    // MARK: - bar_rollups

    /// Five minutes from 10:00 whose extremes fall on different minutes.
    private let fiveMinutes: [Bar] = [
        Bar(minute: 0, open: 100, high: 101, low: 99.5, close: 100.5, volume: 1.5, tradeCount: 10),
        Bar(minute: 1, open: 100.5, high: 103.25, low: 100, close: 103, volume: 2.25, tradeCount: 12),
        Bar(minute: 2, open: 103, high: 103.5, low: 98.75, close: 99, volume: 0.5, tradeCount: 3),
        Bar(minute: 3, open: 99, high: 100, low: 99, close: 99.75, volume: 4, tradeCount: 20),
        Bar(minute: 4, open: 99.75, high: 101.5, low: 99.5, close: 101.25, volume: 1.75, tradeCount: 7),
    ]

    func testRollupFiveMinutesIntoOneBucket() throws {
        var last: [String: Delivery] = [:]
        for bar in fiveMinutes {
            last = try deliver(bar)
        }

        let expected = RolledBar(
            bucketStartMs: Self.tenOClock, bucketEndMs: Self.tenOClock + 5 * Self.minuteMs,
            open: 100, high: 103.5, low: 98.75, close: 101.25, volume: 10, tradeCount: 52, minutes: 5)
        let rows = try rollupRows(XCTUnwrap(last["bar_rollups"]).effects)
        XCTAssertEqual(rows.map(\.timeframe), ["5m", "15m", "1h"])
        let row = try XCTUnwrap(rows.first)
        XCTAssertEqual(row.bar, expected)
        XCTAssertEqual(row.tenantId, "acme")
        XCTAssertEqual(row.instrumentId, "BTC-USD")
        XCTAssertEqual(row.version, 5, "5 minutes, all at revision 0")
        XCTAssertEqual(try rolledBars("5m"), [expected])

        // The 15m and 1h buckets contain the same five minutes.
        XCTAssertEqual(rows.dropFirst().map(\.bar.open), [100, 100])
        XCTAssertEqual(rows.dropFirst().map(\.bar.close), [101.25, 101.25])
        XCTAssertEqual(rows.dropFirst().map(\.bar.volume), [10, 10])
        XCTAssertEqual(try rolledBars("15m").map(\.minutes), [5])
        XCTAssertEqual(try rolledBars("1h").map(\.minutes), [5])
    }

    func testRollupCorrectionReplacesMinute() throws {
        try deliver(fiveMinutes[0])
        try deliver(fiveMinutes[1])
        // The correction lowers the high of minute 1, so a merge with the old values would keep 103.25.
        let correction = Bar(minute: 1, open: 100.5, high: 102, low: 100.25, close: 101.5, volume: 3,
                             tradeCount: 15, revision: 1)
        let deliveries = try deliver(correction)

        let expected = RolledBar(
            bucketStartMs: Self.tenOClock, bucketEndMs: Self.tenOClock + 5 * Self.minuteMs,
            open: 100, high: 102, low: 99.5, close: 101.5, volume: 4.5, tradeCount: 25, minutes: 2)
        let row = try XCTUnwrap(try rollupRows(XCTUnwrap(deliveries["bar_rollups"]).effects).first)
        XCTAssertEqual(row.bar, expected)
        XCTAssertEqual(row.version, 3, "2 minutes plus revision 1")
        XCTAssertEqual(try rolledBars("5m"), [expected])
        XCTAssertEqual(try redis.run(["ZCARD", "br:acme:5m:BTC-USD"]), .integer(1), "one member per bucket")
    }

    func testRollupIgnoresReplayedMinute() throws {
        try deliver(fiveMinutes[0])
        try deliver(fiveMinutes[1])
        let timeframes = ["5m", "15m", "1h"]
        let before = try timeframes.map { try rolledBars($0) }

        var replays = [fiveMinutes[1]]
        var sameRevision = fiveMinutes[1]
        sameRevision.close = 101
        replays.append(sameRevision)
        for replay in replays {
            let deliveries = try deliver(replay)
            let rollups = try XCTUnwrap(deliveries["bar_rollups"])
            XCTAssertEqual(rollups.redisEffectCount, 0)
            XCTAssertEqual(try rollupRows(rollups.effects).count, 0)
            XCTAssertEqual(rollups.counts, timeframes.map { count("unchanged_minutes", timeframe: $0) })
        }
        XCTAssertEqual(try timeframes.map { try rolledBars($0) }, before)

        // After a correction, the older revision is a replay too.
        var correction = fiveMinutes[1]
        correction.revision = 1
        correction.volume = 3
        try deliver(correction)
        let corrected = try timeframes.map { try rolledBars($0) }
        let old = try XCTUnwrap(deliver(fiveMinutes[1])["bar_rollups"])
        XCTAssertEqual(try rollupRows(old.effects).count, 0)
        XCTAssertEqual(try timeframes.map { try rolledBars($0) }, corrected)
        XCTAssertEqual(corrected[0].first?.volume, 4.5)
    }

    func testRollupOutOfOrderMatchesInOrder() throws {
        // Volumes whose float sum depends on the order of addition.
        let volumes = [0.1, 0.2, 0.3, 0.7, 1.1]
        var inOrder = fiveMinutes
        for index in inOrder.indices {
            inOrder[index].instrument = "IN-ORDER"
            inOrder[index].volume = volumes[index]
        }
        var shuffled = inOrder.map { bar in
            var copy = bar
            copy.instrument = "SHUFFLED"
            return copy
        }
        shuffled = [shuffled[3], shuffled[0], shuffled[4], shuffled[1], shuffled[2]]

        var lastRows: [String: [RollupRow]] = [:]
        for bar in inOrder + shuffled {
            let deliveries = try deliver(bar)
            lastRows[bar.instrument] = try rollupRows(XCTUnwrap(deliveries["bar_rollups"]).effects)
        }

        for timeframe in ["5m", "15m", "1h"] {
            let expected = try rolledBars(timeframe, instrument: "IN-ORDER")
            XCTAssertEqual(expected.map(\.minutes), [5], timeframe)
            XCTAssertEqual(try rolledBars(timeframe, instrument: "SHUFFLED"), expected, timeframe)
        }
        let expectedRows = try XCTUnwrap(lastRows["IN-ORDER"])
        let shuffledRows = try XCTUnwrap(lastRows["SHUFFLED"])
        XCTAssertEqual(shuffledRows.map(\.bar), expectedRows.map(\.bar))
        XCTAssertEqual(shuffledRows.map(\.version), expectedRows.map(\.version))
        // The member and the row keep every digit of the sum, added in start order.
        let volumeSum = volumes.reduce(0, +)
        XCTAssertEqual(expectedRows.first?.bar.volume, volumeSum)
        XCTAssertEqual(try rolledBars("5m", instrument: "SHUFFLED").first?.volume, volumeSum)
        XCTAssertEqual(expectedRows.first?.bar.open, 100, "open of the earliest minute")
        XCTAssertEqual(expectedRows.first?.bar.close, 101.25, "close of the latest minute")
    }

    func testRollupTradeCountNullUntilReported() throws {
        let unreported = [fiveMinutes[0], fiveMinutes[1]].map { bar in
            var copy = bar
            copy.tradeCount = nil
            return copy
        }
        var last: [String: Delivery] = [:]
        for bar in unreported {
            last = try deliver(bar)
        }
        XCTAssertEqual(try rolledBars("5m").map(\.tradeCount), [nil])
        XCTAssertEqual(try rolledBars("5m").map(\.minutes), [2])

        // The row carries an explicit null for the Nullable(UInt64) column.
        let effects = try XCTUnwrap(last["bar_rollups"]).effects
        guard case .insert(_, let rowBytes) = try XCTUnwrap(effects.first(where: { effect in
            if case .insert = effect { return true }
            return false
        })) else {
            return XCTFail("expected a bar_rollups row")
        }
        let row = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(rowBytes)) as? [String: Any])
        XCTAssertTrue(row["trade_count"] is NSNull, "trade_count is \(String(describing: row["trade_count"]))")

        // A minute that reports a trade count starts the sum, and the others add nothing.
        let deliveries = try deliver(fiveMinutes[2])
        let reported = try XCTUnwrap(try rollupRows(XCTUnwrap(deliveries["bar_rollups"]).effects).first)
        XCTAssertEqual(reported.bar.tradeCount, 3)
        XCTAssertEqual(try rolledBars("5m").map(\.tradeCount), [3])
    }

    func testRollupIgnoresLateMinute() throws {
        for bar in fiveMinutes {
            try deliver(bar)
        }
        let tenOClock5m = try XCTUnwrap(try rolledBars("5m").first)

        // Minute 12:14 moves the watermark to 12:15. With the default lateness of 2 h, buckets
        // that end before 10:15 close: the 5m bucket at 10:00 does, and the 15m bucket
        // (ending exactly at 10:15) and the 1h bucket stay open.
        let noon = try deliver(Bar(minute: 134))
        XCTAssertTrue(try XCTUnwrap(noon["bar_rollups"]).counts.contains(count("closed_buckets", timeframe: "5m")))

        var correction = fiveMinutes[2]
        correction.revision = 1
        correction.low = 99
        correction.volume = 1
        let partlyLate = try XCTUnwrap(deliver(correction)["bar_rollups"])
        XCTAssertEqual(partlyLate.counts, [count("late_minutes", timeframe: "5m")])
        XCTAssertEqual(try rollupRows(partlyLate.effects).map(\.timeframe), ["15m", "1h"])
        XCTAssertEqual(try rolledBars("5m").last, tenOClock5m, "the closed 5m bucket is unchanged")
        let tenOClock15m = try XCTUnwrap(try rolledBars("15m").last)
        XCTAssertEqual(tenOClock15m.bucketStartMs, Self.tenOClock)
        XCTAssertEqual(tenOClock15m.low, 99)
        XCTAssertEqual(tenOClock15m.volume, 10.5)

        // Minute 13:01 moves the watermark to 13:02, which closes the 15m and 1h buckets at 10:00.
        try deliver(Bar(minute: 181))
        let before = try ["5m", "15m", "1h"].map { try rolledBars($0) }
        correction.revision = 2
        correction.volume = 2
        let late = try XCTUnwrap(deliver(correction)["bar_rollups"])
        XCTAssertEqual(late.counts, ["5m", "15m", "1h"].map { count("late_minutes", timeframe: $0) })
        XCTAssertEqual(late.redisEffectCount, 0)
        XCTAssertEqual(try rollupRows(late.effects).count, 0)
        XCTAssertEqual(try ["5m", "15m", "1h"].map { try rolledBars($0) }, before)
    }

    func testRollupBucketsAlignToUTCEpoch() throws {
        // 10:14, 10:15, 10:59 and 11:00 lie on both sides of 15m and 1h boundaries.
        let minutes: [Int64] = [14, 15, 59, 60]
        for (index, minute) in minutes.enumerated() {
            try deliver(Bar(minute: minute, open: 100 + Double(index), high: 110, low: 90, close: 105 + Double(index)))
        }

        let lengths: [String: Int64] = ["5m": 5 * Self.minuteMs, "15m": 15 * Self.minuteMs, "1h": Self.hourMs]
        let expectedStarts: [String: [Int64]] = [
            "5m": [60, 55, 15, 10].map(minuteStart),
            "15m": [60, 45, 15, 0].map(minuteStart),
            "1h": [60, 0].map(minuteStart),
        ]
        for (timeframe, starts) in expectedStarts {
            let bars = try rolledBars(timeframe)
            let length = try XCTUnwrap(lengths[timeframe])
            XCTAssertEqual(bars.map(\.bucketStartMs), starts, timeframe)
            XCTAssertEqual(bars.map(\.bucketEndMs), starts.map { $0 + length }, timeframe)
            for bar in bars {
                XCTAssertEqual(bar.bucketStartMs % length, 0, "\(timeframe) bucket \(bar.bucketStartMs) is not aligned")
            }
        }

        let hours = try rolledBars("1h")
        XCTAssertEqual(hours.map(\.minutes), [1, 3])
        XCTAssertEqual(hours.last?.bucketStartMs, 1_709_546_400_000, "2024-03-04 10:00 UTC")
        XCTAssertEqual(hours.last?.open, 100, "open of 10:14")
        XCTAssertEqual(hours.last?.close, 107, "close of 10:59")
    }

    func testBarsQueryRejectsInvalidTimeframe() throws {
        try deliver(fiveMinutes[0])
        let cases: [(String?, String)] = [
            ("1m", "query parameter 'timeframe' must be one of 5m, 15m, 1h, got string \"1m\""),
            ("5M", "query parameter 'timeframe' must be one of 5m, 15m, 1h, got string \"5M\""),
            ("", "query parameter 'timeframe' must not be empty"),
            (nil, "query parameter 'timeframe' is missing"),
        ]
        for (timeframe, expected) in cases {
            var parameters = ["tenant_id": "acme", "instrument_id": "BTC-USD"]
            parameters["timeframe"] = timeframe
            XCTAssertEqual(try query("bar_rollups", "bars", parameters), .badRequest(expected))
        }

        let badLimit = ["tenant_id": "acme", "instrument_id": "BTC-USD", "timeframe": "5m", "limit": "0"]
        guard case .badRequest(let message) = try query("bar_rollups", "bars", badLimit) else {
            return XCTFail("expected 400 for limit 0")
        }
        XCTAssertTrue(message.hasPrefix("query parameter 'limit' must be an integer from 1 to 288"), message)

        XCTAssertEqual(try rolledBars("5m", instrument: "DOGE-USD"), [], "an unknown instrument has no buckets")
    }

    // MARK: - Malformed events

    func testMalformedBarFailsNamingField() throws {
        let cases: [(String, String)] = [
            (Bar(minute: 0).payload(omitting: ["close"]), "invalid bar event: field 'close' is missing"),
            (Bar(minute: 0).payload().replacingOccurrences(of: #""close":100.5"#, with: #""close":"100.5""#),
             "invalid bar event: field 'close' must be a number, got string \"100.5\""),
        ]
        for (payload, expected) in cases {
            let deliveries = try deliver(payload, topic: barsTopic)
            XCTAssertEqual(deliveries.keys.sorted(), ["bar_rollups", "latest_price"])
            for (projection, delivery) in deliveries {
                let failure = try XCTUnwrap(delivery.outcome.failure, "\(projection) accepted \(payload)")
                XCTAssertEqual(failure.phase, .onEvent, projection)
                XCTAssertTrue(failure.message.contains(expected), "\(projection): \(failure.message)")
            }
        }
        XCTAssertNil(try servedPrice())
        XCTAssertEqual(try rolledBars("5m"), [])

        // The failures leave no state behind, and valid events are handled as before.
        let valid = Bar(minute: 0, close: 100.25)
        let deliveries = try deliver(valid)
        XCTAssertEqual(deliveries["latest_price"]?.replies, [.bytes(Array("written".utf8))])
        XCTAssertEqual(try servedPrice(), price(of: valid))
        XCTAssertEqual(try rolledBars("5m").map(\.close), [100.25])
        XCTAssertEqual(try deliverInvalidation(instrument: "ETH-USD", issuedMs: valid.endMs).replies, [.integer(0)])
    }
}
