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
