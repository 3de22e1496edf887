import Foundation
import Glibc
import XCTest

@testable import Runtime

/// Runs the client against a real clickhouse-server (18.16 on Debian 12), started once for the
/// class by scripts/clickhouse-local.sh. The buffer and text-helper tests need no server.
final class ClickHouseClientTests: XCTestCase {
    private static let password = "local-test-key"
    nonisolated(unsafe) private static var server: LocalClickHouse?
    nonisolated(unsafe) private static var startupFailure: String?

    override class func setUp() {
        super.setUp()
        guard LocalClickHouse.serverPath != nil else { return }
        do {
            server = try LocalClickHouse(password: password)
        } catch {
            startupFailure = "\(error)"
        }
    }

    override class func tearDown() {
        server?.stop()
        server = nil
        super.tearDown()
    }

    /// Returns settings for the class's server. Skips when clickhouse-server is not installed
    /// and fails when it is installed but did not start.
    private func localSettings(password: String? = ClickHouseClientTests.password)
        throws -> ClickHouseSettings
    {
        guard LocalClickHouse.serverPath != nil else {
            throw XCTSkip(
                "clickhouse-server is in neither /usr/bin nor /usr/sbin; install the Debian "
                    + "package clickhouse-server (scripts/install-deps.sh does) to run this test")
        }
        guard let server = Self.server else {
            let reason = Self.startupFailure ?? "unknown reason"
            XCTFail("local clickhouse-server did not start: \(reason)")
            throw XCTSkip("local clickhouse-server did not start")
        }
        return ClickHouseSettings(
            host: "127.0.0.1", httpPort: server.httpPort, password: password, timeoutMs: 10_000)
    }

    private func makeClient(password: String? = ClickHouseClientTests.password) throws
        -> ClickHouseClient
    {
        try ClickHouseClient(settings: localSettings(password: password))
    }

    private func createEventsTable(_ client: ClickHouseClient, name: String) throws {
        try client.execute("""
            CREATE TABLE \(name) (
                id Int64,
                name String,
                amount UInt64,
                version UInt32
            ) ENGINE = ReplacingMergeTree(version) ORDER BY id
            """)
    }

    private func row(_ text: String) -> [UInt8] {
        Array(text.utf8)
    }

    private func text(_ rows: [[UInt8]]) -> [String] {
        rows.map { String(decoding: $0, as: UTF8.self) }
    }

    private func expectError(
        _ body: () throws(ClickHouseError) -> Void, file: StaticString = #filePath,
        line: UInt = #line
    ) -> ClickHouseError? {
        do throws(ClickHouseError) {
            try body()
            XCTFail("expected a ClickHouseError, but the call succeeded", file: file, line: line)
            return nil
        } catch {
            return error
        }
    }

    // MARK: - Server

    func testPingReturnsTrue() throws {
        let client = try makeClient()
        XCTAssertTrue(client.ping())
    }

    func testRequestsReuseOneConnection() throws {
        let client = try makeClient()
        XCTAssertTrue(client.ping())
        XCTAssertTrue(client.ping())
        _ = try client.select("SELECT 1 AS one")
        try client.execute("CREATE TABLE keep_alive_check (id Int64) ENGINE = Memory")

        XCTAssertEqual(client.connectionsOpened, 1)
    }

    func testExecuteCreatesReplacingMergeTreeTable() throws {
        let client = try makeClient()
        try createEventsTable(client, name: "events_ddl")

        let rows = try client.select(
            "SELECT engine FROM system.tables WHERE database = 'default' AND name = 'events_ddl'")
        XCTAssertEqual(text(rows), [#"{"engine":"ReplacingMergeTree"}"#])
    }

    func testInsertTenThousandRowsInOneCall() throws {
        let client = try makeClient()
        try createEventsTable(client, name: "events_bulk")
        let rows = (0..<10_000).map { index in
            row(#"{"id":\#(index),"name":"event \#(index)","amount":\#(index * 3),"version":1}"#)
        }

        let duration = try client.insert(table: "events_bulk", rows: rows)

        XCTAssertGreaterThan(duration, .zero)
        let count = try client.select(
            "SELECT count() AS rows, sum(amount) AS total FROM events_bulk")
        XCTAssertEqual(text(count), [#"{"rows":10000,"total":149985000}"#])
    }

    func testSelectReturnsExactSixtyFourBitIntegers() throws {
        let client = try makeClient()
        try createEventsTable(client, name: "events_limits")
        try client.insert(table: "events_limits", rows: [
            row(#"{"id":9223372036854775807,"name":"max","amount":18446744073709551615,"#
                + #""version":1}"#),
            row(#"{"id":-9223372036854775808,"name":"min","amount":0,"version":1}"#),
            row(#"{"id":42,"name":"quote \" and newline \n","amount":7,"version":2}"#),
        ])

        let rows = try client.select("SELECT id, name, amount FROM events_limits ORDER BY id;")

        XCTAssertEqual(text(rows), [
            #"{"id":-9223372036854775808,"name":"min","amount":0}"#,
            #"{"id":42,"name":"quote \" and newline \n","amount":7}"#,
            #"{"id":9223372036854775807,"name":"max","amount":18446744073709551615}"#,
        ])
    }

    func testSelectKeepsCallerFormat() throws {
        let client = try makeClient()

        let tabSeparated = try client.select("SELECT 1 AS x, 'a' AS y FORMAT TabSeparated")
        XCTAssertEqual(text(tabSeparated), ["1\ta"])

        let literal = try client.select("SELECT 'FORMAT TSV' AS s -- FORMAT CSV")
        XCTAssertEqual(text(literal), [#"{"s":"FORMAT TSV"}"#])
    }

    func testSelectFailureDuringQueryIsRejected() throws {
        let client = try makeClient()
        let sql = "SELECT throwIf(number = 100000) AS failed FROM system.numbers LIMIT 200000"

        let error = expectError { () throws(ClickHouseError) in _ = try client.select(sql) }

        XCTAssertEqual(error?.kind, .rejected)
        XCTAssertEqual(error?.exceptionCode, 395)
        XCTAssertEqual(error?.status, 500)
        XCTAssertEqual(error?.target, #"statement "SELECT throwIf(number = 100000) AS failed""#)
    }

    func testInsertIntoMissingTableFails() throws {
        let client = try makeClient()

        let error = expectError { () throws(ClickHouseError) in
            try client.insert(table: "missing_table", rows: [row(#"{"id":1}"#)])
        }

        XCTAssertEqual(error?.kind, .rejected)
        XCTAssertEqual(error?.status, 404)
        XCTAssertEqual(error?.exceptionCode, 60)
        XCTAssertEqual(error?.target, "insert into missing_table")
        XCTAssertEqual(error?.message, "Table default.missing_table doesn't exist.")
        XCTAssertEqual(error?.isRetryable, false)
        let description = error.map { "\($0)" } ?? ""
        XCTAssertTrue(description.contains("missing_table"), description)
        XCTAssertTrue(description.contains("HTTP 404"), description)
        XCTAssertTrue(description.contains("exception code 60"), description)
    }

    func testInsertWithUnknownColumnIsRejected() throws {
        let client = try makeClient()
        try createEventsTable(client, name: "events_unknown_column")
        let rows = [
            row(#"{"id":1,"name":"a","amount":1,"version":1}"#),
            row(#"{"id":2,"name":"b","amount":2,"version":1,"secret_field":"x"}"#),
        ]

        let error = expectError { () throws(ClickHouseError) in
            try client.insert(table: "events_unknown_column", rows: rows)
        }

        XCTAssertEqual(error?.kind, .rejected)
        XCTAssertEqual(error?.status, 500)
        XCTAssertEqual(error?.exceptionCode, 117)
        XCTAssertEqual(error?.target, "insert into events_unknown_column")
        XCTAssertTrue(error?.message.contains("Unknown field") ?? false, error?.message ?? "")
        let count = try client.select("SELECT count() AS rows FROM events_unknown_column")
        XCTAssertEqual(text(count), [#"{"rows":0}"#], "a rejected insert must write no row")
    }

    func testInsertWithBadValueIsRejected() throws {
        let client = try makeClient()
        try createEventsTable(client, name: "events_bad_value")

        let error = expectError { () throws(ClickHouseError) in
            try client.insert(table: "events_bad_value", rows: [row(#"{"id":"not a number"}"#)])
        }

        XCTAssertEqual(error?.kind, .rejected)
        XCTAssertEqual(error?.status, 500)
        XCTAssertNotNil(error?.exceptionCode)
        XCTAssertEqual(error?.target, "insert into events_bad_value")
    }

    func testExecuteSyntaxErrorNamesStatement() throws {
        let client = try makeClient()

        let error = expectError { () throws(ClickHouseError) in
            try client.execute("CREATE TABLE broken (id Int64")
        }

        XCTAssertEqual(error?.kind, .rejected)
        XCTAssertEqual(error?.status, 400)
        XCTAssertEqual(error?.exceptionCode, 62)
        XCTAssertEqual(error?.target, #"statement "CREATE TABLE broken (id Int64""#)
        XCTAssertTrue(error?.message.hasPrefix("Syntax error") ?? false, error?.message ?? "")
    }

    func testWrongPasswordIsRejectedWithoutEchoingIt() throws {
        let client = try makeClient(password: "wrong-key-value")

        let error = expectError { () throws(ClickHouseError) in
            try client.execute("SELECT 1")
        }

        XCTAssertEqual(error?.kind, .rejected)
        XCTAssertEqual(error?.status, 401)
        XCTAssertEqual(error?.exceptionCode, 193)
        let description = error.map { "\($0)" } ?? ""
        XCTAssertFalse(description.contains("wrong-key-value"), description)
        XCTAssertTrue(client.ping(), "ping needs no credentials")
    }

    func testMissingPasswordIsRejected() throws {
        let client = try makeClient(password: nil)

        let error = expectError { () throws(ClickHouseError) in
            _ = try client.select("SELECT 1")
        }

        XCTAssertEqual(error?.kind, .rejected)
        XCTAssertEqual(error?.status, 401)
        XCTAssertEqual(error?.exceptionCode, 194)
    }

    func testInvalidTableNameIsNotSent() throws {
        let client = try makeClient()

        let error = expectError { () throws(ClickHouseError) in
            try client.insert(table: "events; DROP TABLE x", rows: [row(#"{"id":1}"#)])
        }

        XCTAssertEqual(error?.kind, .invalidRequest)
        XCTAssertEqual(client.connectionsOpened, 0)
    }

    func testEmptyInsertSendsNothing() throws {
        let client = try makeClient()

        let duration = try client.insert(table: "missing_table", rows: [])

        XCTAssertEqual(duration, .zero)
        XCTAssertEqual(client.connectionsOpened, 0)
    }

    // MARK: - Source columns

    private func createSourcedTable(_ client: ClickHouseClient, name: String) throws {
        try client.execute("""
            CREATE TABLE \(name) (
                _source_topic String,
                _source_partition Int32,
                _source_offset Int64,
                _source_index UInt32,
                account String,
                amount Int64
            ) ENGINE = ReplacingMergeTree()
            ORDER BY (_source_topic, _source_partition, _source_offset, _source_index)
            """)
    }

    /// Appends one batch as the worker buffers it: three events on partition 0, of which the
    /// second produced two rows, and one event on partition 1 that shares an offset.
    private func appendTradeBatch(to buffer: ClickHouseBuffer, table: String) {
        let rows: [(RowSource, String)] = [
            (RowSource(topic: "trades", partition: 0, offset: 10, index: 0),
             #"{"account":"a","amount":5}"#),
            (RowSource(topic: "trades", partition: 0, offset: 11, index: 0),
             #"{"account":"a","amount":7}"#),
            (RowSource(topic: "trades", partition: 0, offset: 11, index: 1),
             #"{"account":"b","amount":7}"#),
            (RowSource(topic: "trades", partition: 1, offset: 10, index: 0),
             #"{"account":"b","amount":11}"#),
        ]
        for (source, text) in rows {
            buffer.append(table: table, row: row(text), source: source, nowMs: 0)
        }
    }

    private func insertDrained(_ buffer: ClickHouseBuffer, into client: ClickHouseClient)
        throws
    {
        for entry in buffer.drainTables() {
            try client.insert(table: entry.table, rows: entry.rows, sources: entry.sources)
        }
    }

    func testReplayedBatchCountsOnceWithFinal() throws {
        let client = try makeClient()
        try createSourcedTable(client, name: "trades_replayed")
        // Stopped merges keep both inserts as separate parts until OPTIMIZE below.
        try client.execute("SYSTEM STOP MERGES trades_replayed")
        let buffer = ClickHouseBuffer(flushRows: 100, flushBytes: 1 << 20, flushIntervalMs: 1_000)

        appendTradeBatch(to: buffer, table: "trades_replayed")
        try insertDrained(buffer, into: client)
        appendTradeBatch(to: buffer, table: "trades_replayed")
        try insertDrained(buffer, into: client)

        let physical = try client.select("SELECT count() AS rows FROM trades_replayed")
        XCTAssertEqual(text(physical), [#"{"rows":8}"#], "both inserts are stored until a merge")
        let final = try client.select(
            "SELECT count() AS rows, sum(amount) AS total FROM trades_replayed FINAL")
        XCTAssertEqual(text(final), [#"{"rows":4,"total":30}"#])
        let grouped = try client.select("""
            SELECT sum(amount) AS total FROM (
                SELECT any(amount) AS amount FROM trades_replayed
                GROUP BY _source_topic, _source_partition, _source_offset, _source_index)
            """)
        XCTAssertEqual(text(grouped), [#"{"total":30}"#])
        let stored = try client.select("""
            SELECT _source_topic AS t, _source_partition AS p, _source_offset AS o,
                _source_index AS i, account FROM trades_replayed FINAL ORDER BY p, o, i
            """)
        XCTAssertEqual(text(stored), [
            #"{"t":"trades","p":0,"o":10,"i":0,"account":"a"}"#,
            #"{"t":"trades","p":0,"o":11,"i":0,"account":"a"}"#,
            #"{"t":"trades","p":0,"o":11,"i":1,"account":"b"}"#,
            #"{"t":"trades","p":1,"o":10,"i":0,"account":"b"}"#,
        ])

        try client.execute("SYSTEM START MERGES trades_replayed")
        try client.execute("OPTIMIZE TABLE trades_replayed FINAL")
        let merged = try client.select("SELECT count() AS rows FROM trades_replayed")
        XCTAssertEqual(text(merged), [#"{"rows":4}"#], "a merge keeps one row per source")
        XCTAssertEqual(client.columnLookups, 1, "the columns are looked up once per table")
    }

    func testTableWithoutSourceColumnsGetsRowsUnchanged() throws {
        let client = try makeClient()
        try createEventsTable(client, name: "events_natural_key")
        let rows = [
            row(#"{"id":1,"name":"a","amount":3,"version":1}"#),
            row(#"{"id":2,"name":"b","amount":4,"version":1}"#),
        ]
        let sources = [
            RowSource(topic: "events", partition: 0, offset: 1, index: 0),
            RowSource(topic: "events", partition: 0, offset: 2, index: 0),
        ]

        try client.insert(table: "events_natural_key", rows: rows, sources: sources)
        try client.insert(table: "events_natural_key", rows: rows, sources: sources)

        let final = try client.select(
            "SELECT id, name, amount, version FROM events_natural_key FINAL ORDER BY id")
        XCTAssertEqual(text(final), text(rows))
        XCTAssertEqual(client.columnLookups, 1)
    }

    func testSourceColumnsAddedLaterNeedForgetSchemas() throws {
        let client = try makeClient()
        try client.execute("CREATE TABLE late_sources (id Int64) ENGINE = MergeTree ORDER BY id")
        let source = RowSource(topic: "trades", partition: 2, offset: 12, index: 0)
        try client.insert(table: "late_sources", rows: [row(#"{"id":1}"#)], sources: [source])

        try client.execute("""
            ALTER TABLE late_sources ADD COLUMN _source_topic String,
                ADD COLUMN _source_partition Int32, ADD COLUMN _source_offset Int64,
                ADD COLUMN _source_index UInt32
            """)
        try client.insert(table: "late_sources", rows: [row(#"{"id":2}"#)], sources: [source])
        XCTAssertEqual(client.columnLookups, 1, "the cached columns stay until forgetSchemas")

        client.forgetSchemas()
        try client.insert(table: "late_sources", rows: [row(#"{"id":3}"#)], sources: [source])

        XCTAssertEqual(client.columnLookups, 2)
        let rows = try client.select(
            "SELECT id, _source_topic AS t, _source_offset AS o FROM late_sources ORDER BY id")
        XCTAssertEqual(text(rows), [
            #"{"id":1,"t":"","o":0}"#,
            #"{"id":2,"t":"","o":0}"#,
            #"{"id":3,"t":"trades","o":12}"#,
        ])
    }

    func testInsertRetriesAfterSourceColumnsDropped() throws {
        let client = try makeClient()
        try client.execute("""
            CREATE TABLE dropped_sources (
                id Int64,
                _source_topic String,
                _source_partition Int32,
                _source_offset Int64,
                _source_index UInt32
            ) ENGINE = MergeTree ORDER BY id
            """)
        let source = RowSource(topic: "trades", partition: 0, offset: 5, index: 0)
        try client.insert(table: "dropped_sources", rows: [row(#"{"id":1}"#)], sources: [source])
        try client.execute("""
            ALTER TABLE dropped_sources DROP COLUMN _source_topic,
                DROP COLUMN _source_partition, DROP COLUMN _source_offset,
                DROP COLUMN _source_index
            """)

        try client.insert(table: "dropped_sources", rows: [row(#"{"id":2}"#)], sources: [source])

        XCTAssertEqual(client.columnLookups, 2, "the unknown-column error reloads the columns")
        let rows = try client.select("SELECT id FROM dropped_sources ORDER BY id")
        XCTAssertEqual(text(rows), [#"{"id":1}"#, #"{"id":2}"#])
    }

    func testRowWithSourceKeyIsRejected() throws {
        let client = try makeClient()
        try createSourcedTable(client, name: "trades_own_key")
        let rows = [
            row(#"{"account":"a","amount":1}"#),
            row(#"{"account":"b","amount":2,"_source_offset":5}"#),
        ]
        let sources = [
            RowSource(topic: "trades", partition: 0, offset: 5, index: 0),
            RowSource(topic: "trades", partition: 0, offset: 6, index: 0),
        ]

        let error = expectError { () throws(ClickHouseError) in
            try client.insert(table: "trades_own_key", rows: rows, sources: sources)
        }

        XCTAssertEqual(error?.kind, .invalidRequest)
        XCTAssertEqual(error?.target, "insert into trades_own_key")
        let message = error?.message ?? ""
        XCTAssertTrue(
            message.hasPrefix("row 2 of 2 (topic trades partition 0 offset 6 index 0)"), message)
        XCTAssertTrue(message.contains(#"already contains the key "_source_offset""#), message)
        let count = try client.select("SELECT count() AS rows FROM trades_own_key")
        XCTAssertEqual(text(count), [#"{"rows":0}"#], "no row of a rejected insert is sent")
    }

    func testRowWithoutSourceNeedsSourceKeys() throws {
        let client = try makeClient()
        try createSourcedTable(client, name: "trades_no_source")

        let error = expectError { () throws(ClickHouseError) in
            try client.insert(table: "trades_no_source", rows: [row(#"{"account":"a"}"#)])
        }

        XCTAssertEqual(error?.kind, .invalidRequest)
        let message = error?.message ?? ""
        XCTAssertTrue(message.hasPrefix("row 1 of 1 (no source) lacks _source_topic, "
            + "_source_partition, _source_offset, _source_index"), message)

        let complete = row(#"{"_source_topic":"trades","_source_partition":0,"#
            + #""_source_offset":3,"_source_index":0,"account":"a","amount":1}"#)
        try client.insert(table: "trades_no_source", rows: [complete])
        let stored = try client.select("SELECT _source_offset AS o FROM trades_no_source")
        XCTAssertEqual(text(stored), [#"{"o":3}"#])
    }

    func testPartialSourceColumnsAreRejected() throws {
        let client = try makeClient()
        try client.execute("""
            CREATE TABLE partial_sources (id Int64, _source_offset Int64)
            ENGINE = MergeTree ORDER BY id
            """)
        let source = RowSource(topic: "trades", partition: 0, offset: 1, index: 0)

        let error = expectError { () throws(ClickHouseError) in
            try client.insert(table: "partial_sources", rows: [row(#"{"id":1}"#)], sources: [source])
        }

        XCTAssertEqual(error?.kind, .invalidRequest)
        XCTAssertEqual(error?.target, "insert into partial_sources")
        XCTAssertEqual(
            error?.message,
            "table partial_sources has the source columns _source_offset but lacks "
                + "_source_topic, _source_partition, _source_index; declare all four "
                + "(_source_topic String, _source_partition Int32, _source_offset Int64, "
                + "_source_index UInt32) or none")
    }

    func testSourceCountMismatchIsNotSent() throws {
        let client = try makeClient()

        let error = expectError { () throws(ClickHouseError) in
            try client.insert(table: "events", rows: [row("{}"), row("{}")], sources: [nil])
        }

        XCTAssertEqual(error?.kind, .invalidRequest)
        XCTAssertEqual(error?.message, "got 2 rows but 1 sources: expected one source, or nil, per row")
        XCTAssertEqual(client.connectionsOpened, 0)
    }

    // MARK: - Unreachable servers (no ClickHouse needed)

    func testClosedPortIsUnreachableQuickly() throws {
        let port = try LocalClickHouse.freePorts(count: 1)[0]
        let client = try ClickHouseClient(
            settings: ClickHouseSettings(httpPort: port, timeoutMs: 5_000))

        let started = ContinuousClock.now
        let error = expectError { () throws(ClickHouseError) in
            try client.insert(table: "events", rows: [row(#"{"id":1}"#)])
        }
        let elapsed = ContinuousClock.now - started

        XCTAssertEqual(error?.kind, .unreachable)
        XCTAssertEqual(error?.isRetryable, true)
        XCTAssertNil(error?.status)
        XCTAssertEqual(error?.target, "insert into events")
        XCTAssertLessThan(
            elapsed, .seconds(2), "a refused connection must not wait for the timeout")
        XCTAssertFalse(client.ping())
    }

    func testSilentServerTimesOutAsUnreachable() throws {
        // A socket that listens but never accepts: connecting succeeds through the backlog,
        // and then no response ever arrives.
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(descriptor, 0)
        defer { close(descriptor) }
        let port = try LocalClickHouse.boundPort(descriptor, listen: true)
        let client = try ClickHouseClient(
            settings: ClickHouseSettings(httpPort: port, timeoutMs: 300))

        let started = ContinuousClock.now
        let error = expectError { () throws(ClickHouseError) in
            try client.execute("SELECT 1")
        }
        let elapsed = ContinuousClock.now - started

        XCTAssertEqual(error?.kind, .unreachable)
        XCTAssertNil(error?.status)
        XCTAssertTrue(error?.message.contains("timed out") ?? false, error?.message ?? "")
        XCTAssertGreaterThanOrEqual(elapsed, .milliseconds(250))
        XCTAssertLessThan(elapsed, .seconds(3))
    }

    func testProxyStatusWithoutExceptionIsUnreachable() throws {
        let responder = try CannedHTTPResponder(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 19\r\nConnection: close\r\n"
                + "\r\nno healthy upstream")
        let client = try ClickHouseClient(settings: ClickHouseSettings(httpPort: responder.port))

        let error = expectError { () throws(ClickHouseError) in
            try client.insert(table: "events", rows: [row(#"{"id":1}"#)])
        }
        responder.wait()

        XCTAssertEqual(error?.kind, .unreachable)
        XCTAssertEqual(error?.status, 503)
        XCTAssertNil(error?.exceptionCode)
        XCTAssertEqual(error?.message, "no healthy upstream")
    }

    func testExceptionCodeHeaderIsRead() throws {
        // ClickHouse 18.16 sends no such header, but newer servers do, as this response does.
        let body = "DB::Exception: Memory limit exceeded"
        let responder = try CannedHTTPResponder(
            "HTTP/1.1 500 Internal Server Error\r\nX-ClickHouse-Exception-Code: 241\r\n"
                + "Content-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)")
        let client = try ClickHouseClient(settings: ClickHouseSettings(httpPort: responder.port))

        let error = expectError { () throws(ClickHouseError) in
            try client.execute("OPTIMIZE TABLE events FINAL")
        }
        responder.wait()

        XCTAssertEqual(error?.kind, .rejected)
        XCTAssertEqual(error?.status, 500)
        XCTAssertEqual(error?.exceptionCode, 241)
        XCTAssertEqual(error?.message, "Memory limit exceeded")
        XCTAssertEqual(error?.target, #"statement "OPTIMIZE TABLE events FINAL""#)
    }

    func testInvalidSettingsAreRejected() {
        let cases: [(String, ClickHouseSettings)] = [
            ("empty host", ClickHouseSettings(host: "")),
            ("port 0", ClickHouseSettings(httpPort: 0)),
            ("zero timeout", ClickHouseSettings(timeoutMs: 0)),
            ("user with line break", ClickHouseSettings(user: "a\r\nX-Other: 1")),
            ("password with line break", ClickHouseSettings(password: "a\nb")),
        ]
        for (name, settings) in cases {
            do throws(ClickHouseError) {
                _ = try ClickHouseClient(settings: settings)
                XCTFail("\(name): expected invalidRequest")
            } catch {
                XCTAssertEqual(error.kind, .invalidRequest, name)
            }
        }
    }

    func testSettingsDescriptionHidesPassword() {
        let settings = ClickHouseSettings(password: "hidden-value")

        XCTAssertFalse("\(settings)".contains("hidden-value"))
        XCTAssertFalse(String(reflecting: settings).contains("hidden-value"))
    }

    // MARK: - Text helpers

    func testFormatClauseDetection() {
        let cases: [(String, Bool)] = [
            ("SELECT 1", false),
            ("SELECT 1 FORMAT TSV", true),
            ("select 1 format JSONEachRow;", true),
            ("SELECT 1 FORMAT TSV -- trailing comment", true),
            ("SELECT format FROM t", false),
            ("SELECT 'FORMAT TSV'", false),
            ("SELECT `FORMAT` FROM t", false),
            ("SELECT 1 /* FORMAT TSV */", false),
            ("SELECT 'it\\'s' FORMAT CSV", true),
        ]
        for (sql, expected) in cases {
            XCTAssertEqual(ClickHouseClient.SQLText.hasFormatClause(sql), expected, sql)
        }
    }

    func testServerMessageCleanup() {
        let old = "Code: 117, e.displayText() = DB::Exception: Unknown field found: nope: "
            + "(at row 1)\n, e.what() = DB::Exception\n"
        let new = "Code: 60. DB::Exception: Table default.x doesn't exist. (UNKNOWN_TABLE) "
            + "(version 23.8.1)\n"

        XCTAssertEqual(ClickHouseError.ServerMessage.code(Array(old.utf8)), 117)
        XCTAssertEqual(
            ClickHouseError.ServerMessage.clean(Array(old.utf8)),
            "Unknown field found: nope: (at row 1)")
        XCTAssertEqual(ClickHouseError.ServerMessage.code(Array(new.utf8)), 60)
        XCTAssertEqual(
            ClickHouseError.ServerMessage.clean(Array(new.utf8)),
            "Table default.x doesn't exist. (UNKNOWN_TABLE) (version 23.8.1)")
        XCTAssertNil(ClickHouseError.ServerMessage.code(Array("Bad Gateway".utf8)))
        XCTAssertEqual(ClickHouseError.ServerMessage.clean([]), "empty response body")
    }

    func testStatementTargetKeepsFirstWords() {
        XCTAssertEqual(
            ClickHouseClient.statementTarget("  CREATE TABLE IF NOT EXISTS events\n (id Int64)"),
            #"statement "CREATE TABLE IF NOT EXISTS events""#)
    }

    func testQueryValueEncoding() {
        XCTAssertEqual(
            ClickHouseClient.URLQuery.encode("INSERT INTO t FORMAT JSONEachRow"),
            "INSERT%20INTO%20t%20FORMAT%20JSONEachRow")
        XCTAssertEqual(ClickHouseClient.URLQuery.encode("a&b=c/é~_.-"), "a%26b%3Dc%2F%C3%A9~_.-")
    }

    // MARK: - Source columns without a server

    func testObjectKeyScan() throws {
        let cases: [(String, Int, [String])] = [
            ("{}", 0, []),
            (#"  {"a":1}"#, 2, ["a"]),
            (#"{ "k" : "v" , "l" : 2 }"#, 0, ["k", "l"]),
            (#"{"a":{"_source_offset":1},"b":[1,"}",{"c":2}],"d":"x\"}y","e":null,"f":-1.5e3}"#,
             0, ["a", "b", "d", "e", "f"]),
            (#"{"\u005fsource_offset":7}"#, 0, ["_source_offset"]),
        ]
        for (json, brace, keys) in cases {
            let scanned = try JSONObjectKeys(scanning: row(json))
            XCTAssertEqual(scanned.openingBrace, brace, json)
            XCTAssertEqual(scanned.keys, keys, json)
        }
    }

    func testObjectKeyScanRejectsNonObjects() {
        let cases = ["", "[1]", #"{"a"}"#, #"{"a":1"#, #"{"a":"x"#, #"{"a":1,}"#, #"{"a":}"#,
                     #"{"a":[1,2}"#, "{a:1}"]
        for json in cases {
            do throws(SourceRowError) {
                _ = try JSONObjectKeys(scanning: row(json))
                XCTFail("\(json): expected a SourceRowError")
            } catch {
                XCTAssertTrue(error.reason.hasPrefix("is not a JSON object: "), error.reason)
            }
        }
    }

    func testInsertBodyWritesSourceAfterBrace() throws {
        let types = ClickHouseClient.SourceColumnTypes(
            partition: .int32, offset: .int64, index: .uint32)
        let source = RowSource(topic: #"odd "topic"\"#, partition: 3, offset: 42, index: 1)
        let keys = #""_source_topic":"odd \"topic\"\\","_source_partition":3,"#
            + #""_source_offset":42,"_source_index":1"#

        let body = try ClickHouseClient.insertBody(
            rows: [row(#"{"a":1}"#), row(" { }"), row(#"{"id":2}"#)],
            sources: [source, source, source], columns: .present(types),
            target: "insert into t")

        let lines = text([body])[0].split(separator: "\n").map(String.init)
        XCTAssertEqual(lines, [
            "{" + keys + #","a":1}"#,
            " {" + keys + " }",
            "{" + keys + #","id":2}"#,
        ])
        XCTAssertEqual(body.last, UInt8(ascii: "\n"))
    }

    func testInsertBodyLeavesRowsWithoutSourceColumns() throws {
        let rows = [row(#"{"a":1}"#), row("not even JSON")]
        let source = RowSource(topic: "t", partition: 0, offset: 0, index: 0)

        let body = try ClickHouseClient.insertBody(
            rows: rows, sources: [source, nil], columns: .absent, target: "insert into t")

        XCTAssertEqual(text([body]), ["{\"a\":1}\nnot even JSON\n"])
    }

    func testInsertBodyRejectsSourceOutsideColumnType() {
        let cases: [(ClickHouseClient.SourceColumnTypes, RowSource, String)] = [
            (ClickHouseClient.SourceColumnTypes(partition: .uint32, offset: .int64, index: .uint32),
             RowSource(topic: "t", partition: -1, offset: 0, index: 0),
             "has _source_partition -1, which does not fit the column type UInt32"),
            (ClickHouseClient.SourceColumnTypes(partition: .int32, offset: .uint64, index: .uint32),
             RowSource(topic: "t", partition: 0, offset: -5, index: 0),
             "has _source_offset -5, which does not fit the column type UInt64"),
            (ClickHouseClient.SourceColumnTypes(partition: .int32, offset: .int64, index: .int32),
             RowSource(topic: "t", partition: 0, offset: 0, index: Int(Int32.max) + 1),
             "has _source_index 2147483648, which does not fit the column type Int32"),
        ]
        for (types, source, reason) in cases {
            let error = expectError { () throws(ClickHouseError) in
                _ = try ClickHouseClient.insertBody(
                    rows: [row("{}")], sources: [source], columns: .present(types),
                    target: "insert into t")
            }
            XCTAssertEqual(error?.kind, .invalidRequest, reason)
            XCTAssertEqual(error?.message, "row 1 of 1 (\(source)) \(reason)")
        }
    }

    func testSourceColumnsFromDescribeOutput() throws {
        func describe(_ columns: [(String, String, String)]) -> [[UInt8]] {
            columns.map { name, type, defaultKind in
                row(#"{"name":"\#(name)","type":"\#(type)","default_type":"\#(defaultKind)","#
                    + #""default_expression":"","comment_expression":""}"#)
            }
        }
        let complete = [
            ("_source_topic", "String", ""), ("_source_partition", "Int32", ""),
            ("_source_offset", "UInt64", ""), ("_source_index", "UInt32", ""),
            ("amount", "Int64", "DEFAULT"),
        ]

        XCTAssertEqual(
            try ClickHouseClient.SourceColumns(
                describeOutput: describe([("id", "Int64", "")]), table: "t", target: "insert into t"),
            .absent)
        XCTAssertEqual(
            try ClickHouseClient.SourceColumns(
                describeOutput: describe(complete), table: "t", target: "insert into t"),
            .present(ClickHouseClient.SourceColumnTypes(
                partition: .int32, offset: .uint64, index: .uint32)))
    }

    func testInvalidSourceColumnsAreRejected() {
        func describe(_ changed: (String, String, String)) -> [[UInt8]] {
            var columns = [
                ("_source_topic", "String", ""), ("_source_partition", "Int32", ""),
                ("_source_offset", "Int64", ""), ("_source_index", "UInt32", ""),
            ]
            columns.removeAll { $0.0 == changed.0 }
            if !changed.1.isEmpty { columns.append(changed) }
            return columns.map { name, type, defaultKind in
                row(#"{"name":"\#(name)","type":"\#(type)","default_type":"\#(defaultKind)"}"#)
            }
        }
        let cases: [((String, String, String), String)] = [
            (("_source_index", "", ""),
             "table t has the source columns _source_topic, _source_partition, _source_offset "
                + "but lacks _source_index; declare all four (_source_topic String, "
                + "_source_partition Int32, _source_offset Int64, _source_index UInt32) or none"),
            (("_source_partition", "UInt16", ""),
             "column _source_partition of table t has type UInt16; expected one of Int32, "
                + "Int64, UInt32, UInt64"),
            (("_source_offset", "Int32", ""),
             "column _source_offset of table t has type Int32; expected one of Int64, UInt64"),
            (("_source_topic", "Nullable(String)", ""),
             "column _source_topic of table t has type Nullable(String); expected String or "
                + "LowCardinality(String)"),
            (("_source_offset", "Int64", "MATERIALIZED"),
             "column _source_offset of table t is MATERIALIZED, so an insert cannot set it; "
                + "declare it as an ordinary column"),
        ]
        for (changed, message) in cases {
            let error = expectError { () throws(ClickHouseError) in
                _ = try ClickHouseClient.SourceColumns(
                    describeOutput: describe(changed), table: "t", target: "insert into t")
            }
            XCTAssertEqual(error?.kind, .invalidRequest, message)
            XCTAssertEqual(error?.message, message)
        }
    }

    func testUnreadableDescribeOutputIsRejected() {
        let error = expectError { () throws(ClickHouseError) in
            _ = try ClickHouseClient.SourceColumns(
                describeOutput: [self.row("id\tInt64")], table: "t", target: "insert into t")
        }

        XCTAssertEqual(error?.kind, .rejected)
        XCTAssertEqual(error?.message, "unexpected DESCRIBE TABLE t output line: id\tInt64")
    }

    // MARK: - Buffer

    func testBufferDueWhenOneTableReachesRowLimit() {
        let buffer = ClickHouseBuffer(flushRows: 3, flushBytes: 1 << 20, flushIntervalMs: 60_000)
        buffer.append(table: "a", row: row("{}"), nowMs: 0)
        buffer.append(table: "a", row: row("{}"), nowMs: 0)
        buffer.append(table: "b", row: row("{}"), nowMs: 0)
        buffer.append(table: "b", row: row("{}"), nowMs: 0)

        XCTAssertNil(buffer.dueReason(nowMs: 1), "4 rows over two tables stay under 3 per table")

        buffer.append(table: "b", row: row("{}"), nowMs: 1)

        XCTAssertEqual(buffer.dueReason(nowMs: 1), .rows)
        XCTAssertTrue(buffer.isDue(nowMs: 1))
    }

    func testBufferDueWhenBytesReachLimit() {
        // Each 9-byte row counts 10 bytes with its newline.
        let buffer = ClickHouseBuffer(flushRows: 100, flushBytes: 30, flushIntervalMs: 60_000)
        buffer.append(table: "a", row: row(#"{"id":10}"#), nowMs: 0)
        buffer.append(table: "b", row: row(#"{"id":11}"#), nowMs: 0)

        XCTAssertEqual(buffer.byteCount, 20)
        XCTAssertNil(buffer.dueReason(nowMs: 0))

        buffer.append(table: "c", row: row(#"{"id":12}"#), nowMs: 0)

        XCTAssertEqual(buffer.byteCount, 30)
        XCTAssertEqual(buffer.dueReason(nowMs: 0), .bytes)
    }

    func testBufferDueWhenOldestRowReachesInterval() {
        let buffer = ClickHouseBuffer(flushRows: 100, flushBytes: 1 << 20, flushIntervalMs: 500)
        XCTAssertNil(buffer.dueReason(nowMs: 10_000), "an empty buffer is never due")

        buffer.append(table: "a", row: row("{}"), nowMs: 1_000)
        buffer.append(table: "a", row: row("{}"), nowMs: 1_400)

        XCTAssertNil(buffer.dueReason(nowMs: 1_499))
        XCTAssertEqual(buffer.dueReason(nowMs: 1_500), .age)
    }

    func testBufferDrainGroupsRowsAndResets() {
        let buffer = ClickHouseBuffer(
            settings: ClickHouseSettings(flushRows: 2, flushBytes: 1 << 20, flushIntervalMs: 500))
        buffer.append(table: "b", row: row("1"), nowMs: 0)
        buffer.append(table: "a", row: row("2"), nowMs: 0)
        buffer.append(table: "b", row: row("3"), nowMs: 0)
        XCTAssertEqual(buffer.rowCount, 3)
        XCTAssertEqual(buffer.tableCount, 2)
        XCTAssertTrue(buffer.isDue(nowMs: 0))

        let drained = buffer.drain()

        XCTAssertEqual(drained.map(\.table), ["b", "a"])
        XCTAssertEqual(drained.map { text($0.rows) }, [["1", "3"], ["2"]])
        XCTAssertTrue(buffer.isEmpty)
        XCTAssertEqual(buffer.byteCount, 0)
        XCTAssertEqual(buffer.tableCount, 0)
        XCTAssertNil(buffer.dueReason(nowMs: 10_000), "a drained buffer restarts its age")
    }

    func testBufferDrainTablesKeepsSources() {
        let buffer = ClickHouseBuffer(flushRows: 10, flushBytes: 1 << 20, flushIntervalMs: 500)
        let first = RowSource(topic: "trades", partition: 1, offset: 7, index: 0)
        let second = RowSource(topic: "trades", partition: 1, offset: 7, index: 1)
        buffer.append(table: "b", row: row("1"), source: first, nowMs: 0)
        buffer.append(table: "a", row: row("2"), nowMs: 0)
        buffer.append(table: "b", row: row("3"), source: second, nowMs: 0)
        buffer.append(table: "b", row: row("4"), source: nil, nowMs: 0)

        let drained = buffer.drainTables()

        XCTAssertEqual(drained, [
            ClickHouseBuffer.TableRows(
                table: "b", rows: [row("1"), row("3"), row("4")], sources: [first, second, nil]),
            ClickHouseBuffer.TableRows(table: "a", rows: [row("2")], sources: [nil]),
        ])
        XCTAssertTrue(buffer.isEmpty)
        XCTAssertEqual(buffer.byteCount, 0)
    }

    func testRowSourceDescription() {
        let source = RowSource(topic: "trades", partition: 2, offset: 1041, index: 3)

        XCTAssertEqual("\(source)", "topic trades partition 2 offset 1041 index 3")
    }

    func testBufferDefaultClockIsMonotonic() {
        let first = ClickHouseBuffer.monotonicMilliseconds()
        let second = ClickHouseBuffer.monotonicMilliseconds()

        XCTAssertGreaterThanOrEqual(second, first)
    }
}

/// A one-request HTTP server on a loopback port that sends a fixed response from a
/// background thread, for responses that a real ClickHouse 18.16 does not produce.
private final class CannedHTTPResponder: Sendable {
    let port: Int
    private let listener: Int32
    private let finished = DispatchSemaphore(value: 0)

    init(_ response: String) throws {
        listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        port = try LocalClickHouse.boundPort(listener, listen: true)
        let listener = listener
        let finished = finished
        Thread.detachNewThread {
            let connection = accept(listener, nil, nil)
            if connection >= 0 {
                Self.readRequest(connection)
                _ = Array(response.utf8).withUnsafeBytes { bytes in
                    send(connection, bytes.baseAddress, bytes.count, 0)
                }
                close(connection)
            }
            finished.signal()
        }
    }

    /// Waits, for at most 5 s, until the response went out, then closes the listener.
    func wait() {
        _ = finished.wait(timeout: .now() + 5)
        close(listener)
    }

    /// Reads the headers and as many body bytes as Content-Length gives, so that the client
    /// has sent everything before the response arrives.
    private static func readRequest(_ connection: Int32) {
        var request: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = buffer.withUnsafeMutableBytes { bytes in
                recv(connection, bytes.baseAddress, bytes.count, 0)
            }
            if count <= 0 { return }
            request += buffer[0..<count]

            let text = String(decoding: request, as: UTF8.self)
            guard let headerEnd = text.firstRange(of: "\r\n\r\n") else { continue }
            let headers = text[..<headerEnd.lowerBound].lowercased()
            let lengthLine = headers.split(separator: "\r\n").first {
                $0.hasPrefix("content-length:")
            }
            let lengthText = lengthLine?.dropFirst("content-length:".count).filter {
                !$0.isWhitespace
            }
            let length = lengthText.flatMap { Int($0) } ?? 0
            let headerBytes = text[..<headerEnd.upperBound].utf8.count
            if request.count >= headerBytes + length { return }
        }
    }
}
