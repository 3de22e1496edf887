import CCurl
import Foundation
import HostAPI

/// Connection and batching settings for ClickHouse's HTTP interface.
public struct ClickHouseSettings: Sendable, Equatable, CustomStringConvertible {
    /// Host name or IP address of the HTTP interface.
    public var host: String
    public var httpPort: Int
    /// Database that unqualified table names resolve in, sent as `?database=`.
    public var database: String
    /// User name, sent in the `X-ClickHouse-User` header.
    public var user: String
    /// Password, sent in the `X-ClickHouse-Key` header. Nil sends no key.
    public var password: String?
    /// Limit on a whole request, connecting included, in milliseconds.
    public var timeoutMs: Int
    /// Limit on opening the TCP connection, in milliseconds.
    public var connectTimeoutMs: Int
    /// Row count of one table at which a `ClickHouseBuffer` is due for a flush.
    public var flushRows: Int
    /// Buffered row bytes, summed over all tables, at which a `ClickHouseBuffer` is due.
    public var flushBytes: Int
    /// Age in milliseconds of the oldest buffered row at which a `ClickHouseBuffer` is due.
    public var flushIntervalMs: Int

    /// Creates settings. A nil `connectTimeoutMs` takes the value of `timeoutMs`.
    public init(
        host: String = "127.0.0.1",
        httpPort: Int = 8123,
        database: String = "default",
        user: String = "default",
        password: String? = nil,
        timeoutMs: Int = 10_000,
        connectTimeoutMs: Int? = nil,
        flushRows: Int = 10_000,
        flushBytes: Int = 8 << 20,
        flushIntervalMs: Int = 1_000
    ) {
        self.host = host
        self.httpPort = httpPort
        self.database = database
        self.user = user
        self.password = password
        self.timeoutMs = timeoutMs
        self.connectTimeoutMs = connectTimeoutMs ?? timeoutMs
        self.flushRows = flushRows
        self.flushBytes = flushBytes
        self.flushIntervalMs = flushIntervalMs
    }

    /// The settings with the password masked, so that logging them leaks no secret.
    public var description: String {
        let shownPassword = password == nil ? "nil" : "<redacted>"
        return "ClickHouseSettings(host: \(host), httpPort: \(httpPort), database: \(database), "
            + "user: \(user), password: \(shownPassword), timeoutMs: \(timeoutMs), "
            + "connectTimeoutMs: \(connectTimeoutMs), flushRows: \(flushRows), "
            + "flushBytes: \(flushBytes), flushIntervalMs: \(flushIntervalMs))"
    }
}

/// A failed ClickHouse request, naming the table or the statement's first words. Row data
/// appears only where the server's message quotes it: 18.16's parse errors include a few
/// dozen bytes of input near the failure.
public struct ClickHouseError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// No usable HTTP response: connection refused, host not found, timed out, connection
        /// dropped, or a proxy status (502, 503, 504) without a ClickHouse exception. Retrying
        /// later may succeed.
        case unreachable
        /// The server returned an error status, or an exception after a 200 status, because the
        /// statement, the data or the credentials are wrong. The same request fails again.
        case rejected
        /// The client did not send the request because an argument is invalid, or because the
        /// table declares its source columns in a way the client cannot fill.
        case invalidRequest
    }

    public let kind: Kind
    /// Short name of the request: `insert into <table>`, `statement "<first words>"` or `ping`.
    public let target: String
    /// HTTP status, or nil when no response arrived.
    public let status: Int?
    /// ClickHouse exception code from the `X-ClickHouse-Exception-Code` header, or else from
    /// the `Code: N` prefix of the response body.
    public let exceptionCode: Int?
    /// The server's exception text, or libcurl's error text when no response arrived.
    public let message: String

    /// Whether the same request may succeed later.
    public var isRetryable: Bool { kind == .unreachable }

    public var description: String {
        var parts: [String] = []
        if let status { parts.append("HTTP \(status)") }
        if let exceptionCode { parts.append("exception code \(exceptionCode)") }
        let details = parts.isEmpty ? "" : " (\(parts.joined(separator: ", ")))"
        switch kind {
        case .unreachable:
            return "ClickHouse unreachable for \(target)\(details): \(message)"
        case .rejected:
            return "ClickHouse rejected \(target)\(details): \(message)"
        case .invalidRequest:
            return "invalid ClickHouse request for \(target): \(message)"
        }
    }
}

/// A client for ClickHouse's HTTP interface, written against clickhouse-server 18.16.
///
/// It reuses one libcurl easy handle, so consecutive requests share a keep-alive connection
/// while the server keeps it open (`keep_alive_timeout`, 3 s in Debian's stock config.xml).
/// libcurl opens a new connection when the server has closed an idle one.
/// The client is not thread-safe, so one thread owns it and makes every call.
public final class ClickHouseClient {
    public let settings: ClickHouseSettings

    /// Count of TCP connections opened so far. It stays at 1 while keep-alive reuses the
    /// connection.
    public private(set) var connectionsOpened = 0

    private let handle: UnsafeMutableRawPointer
    private let headers: UnsafeMutablePointer<curl_slist>
    private let errorText: UnsafeMutablePointer<CChar>
    private let response = ResponseCollector()
    private let baseURL: String

    /// Source columns of each table inserted into, keyed by the table name as the caller
    /// spelled it. Filled by DESCRIBE TABLE and emptied by `forgetSchemas()`.
    private var sourceColumnsByTable: [String: SourceColumns] = [:]
    /// Count of DESCRIBE TABLE requests sent so far.
    private(set) var columnLookups = 0

    /// libcurl wants curl_global_init before the first handle. A static is initialized once,
    /// thread-safely, on first use.
    private static let curlGlobalInitResult = curl_global_init(Int(CURL_GLOBAL_DEFAULT))

    /// Prepares the handle and the headers. The first request opens the connection.
    public init(settings: ClickHouseSettings) throws(ClickHouseError) {
        try Self.validate(settings)
        _ = Self.curlGlobalInitResult

        guard let handle = curl_easy_init() else {
            throw ClickHouseError(
                kind: .invalidRequest, target: "client setup", status: nil, exceptionCode: nil,
                message: "curl_easy_init failed")
        }
        self.settings = settings
        self.handle = handle
        self.errorText = .allocate(capacity: Int(CURL_ERROR_SIZE))
        self.errorText.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE))
        self.headers = Self.makeHeaders(settings)

        let host = settings.host.contains(":") ? "[\(settings.host)]" : settings.host
        self.baseURL = "http://\(host):\(settings.httpPort)/"
        configureHandle()
    }

    deinit {
        curl_easy_cleanup(handle)
        curl_slist_free_all(headers)
        errorText.deallocate()
    }

    /// Runs one statement that returns no rows (DDL such as `CREATE TABLE`).
    public func execute(_ sql: String) throws(ClickHouseError) {
        let target = Self.statementTarget(sql)
        try Self.requireStatement(sql, target: target)

        let url = queryURL([])
        _ = try send(url: url, body: Array(sql.utf8), target: target)
    }

    /// Inserts rows, each already one JSON object, that have no source. It is
    /// `insert(table:rows:sources:)` with a nil source for every row.
    @discardableResult
    public func insert(table: String, rows: [[UInt8]]) throws(ClickHouseError) -> Duration {
        try insert(table: table, rows: rows, sources: Array(repeating: nil, count: rows.count))
    }

    /// Inserts rows, each already one JSON object, with `INSERT INTO <table> FORMAT JSONEachRow`
    /// and fills the table's source columns from `sources`, which has one entry per row. Returns
    /// how long the requests took, the column lookup included. An empty `rows` sends nothing.
    ///
    /// The first insert into a table looks up its columns with `DESCRIBE TABLE`, and the client
    /// keeps them until `forgetSchemas()`. A table that declares `_source_topic`,
    /// `_source_partition`, `_source_offset` and `_source_index` gets those four keys written
    /// after each row's opening brace. A row without a source must then contain all four keys
    /// itself. A table with none of the four columns gets the rows unchanged.
    ///
    /// Before sending anything, the client throws `invalidRequest` in four cases. The table
    /// declares only some source columns, or one with an unsupported type. A row with a source
    /// already contains a key starting with `_source_`. A row without a source lacks one of
    /// the four keys. A source value does not fit its column type.
    ///
    /// A column that the table lacks fails the insert, because the request sets
    /// `input_format_skip_unknown_fields` to 0 over any value in the user's profile. That
    /// error also drops the table's cached columns. If the source columns were written and the
    /// table no longer has them, the client inserts once more without them.
    /// ClickHouse 18.16 parses and writes the body in blocks of `max_insert_block_size` rows
    /// (1,048,576 by default), so a bad row makes a smaller insert write nothing.
    /// NOTE: after an `unreachable` error the server may still have stored the rows, so a retry
    /// writes them twice. Only a ReplacingMergeTree keyed by the source columns, or by a
    /// natural key with a version, turns the second copy into a replacement.
    @discardableResult
    public func insert(table: String, rows: [[UInt8]], sources: [RowSource?])
        throws(ClickHouseError) -> Duration
    {
        let target = "insert into \(table)"
        try Self.requireTableName(table, target: target)
        if rows.isEmpty { return .zero }
        if sources.count != rows.count {
            throw ClickHouseError(
                kind: .invalidRequest, target: target, status: nil, exceptionCode: nil,
                message: "got \(rows.count) rows but \(sources.count) sources: expected one "
                    + "source, or nil, per row")
        }

        let clock = ContinuousClock()
        let started = clock.now
        let columns = try sourceColumns(of: table, target: target)
        let body = try Self.insertBody(
            rows: rows, sources: sources, columns: columns, target: target)
        do throws(ClickHouseError) {
            try sendInsert(table: table, body: body, target: target)
        } catch {
            try retryAfterUnknownColumn(
                error, table: table, rows: rows, sources: sources, writtenWith: columns)
        }
        return clock.now - started
    }

    /// Drops every table's cached columns, so that the next insert into each table runs
    /// `DESCRIBE TABLE` again. Call it after DDL that may add or remove source columns, such as
    /// a projection reload that runs new `CREATE TABLE` statements.
    /// NOTE: an `ALTER TABLE` made elsewhere is not noticed until this call, unless it removes
    /// columns that the client writes. Until then, rows inserted into a table that gained
    /// source columns get the type defaults, an empty topic and zeros, in those columns.
    public func forgetSchemas() {
        sourceColumnsByTable.removeAll()
    }

    /// Runs a query and returns its output split into lines: one JSON object per row unless
    /// the query names its own `FORMAT`.
    ///
    /// Without a FORMAT clause the client appends `FORMAT JSONEachRow` and sets
    /// `output_format_json_quote_64bit_integers=0`, so 64-bit integers arrive as JSON numbers
    /// with every digit. `wait_end_of_query=1` makes the server buffer the result, so an
    /// exception during the query returns an error status instead of a 200 with partial rows.
    public func select(_ sql: String) throws(ClickHouseError) -> [[UInt8]] {
        let target = Self.statementTarget(sql)
        try Self.requireStatement(sql, target: target)

        let addsFormat = !SQLText.hasFormatClause(sql)
        var statement = sql
        if addsFormat {
            statement = SQLText.trimmingTerminator(sql) + "\nFORMAT JSONEachRow"
        }
        let url = queryURL([
            ("wait_end_of_query", "1"),
            ("output_format_json_quote_64bit_integers", "0"),
        ])
        let body = try send(url: url, body: Array(statement.utf8), target: target)

        let lines = body.split(separator: UInt8(ascii: "\n")).map { Array($0) }
        if addsFormat, let last = lines.last, last.first != UInt8(ascii: "{") {
            // The query failed after the 200 status went out, and the server appended its
            // exception text to the rows.
            throw ClickHouseError.rejected(status: 200, headerCode: nil, body: last, target: target)
        }
        return lines
    }

    /// Returns true when `GET /ping` returns status 200 and the body `Ok.`, false on any failure.
    /// Failures are logged at debug level because callers poll this as a health check.
    public func ping() -> Bool {
        let result: Result
        do {
            result = try perform(url: baseURL + "ping", body: nil, target: "ping")
        } catch {
            Log.shared.debug("ClickHouse ping failed", [
                "clickhouse.host": .string(settings.host),
                "clickhouse.port": .int(settings.httpPort),
                "error": .string(error.description),
            ])
            return false
        }
        return result.status == 200 && result.body == Array("Ok.\n".utf8)
    }
}

// MARK: - Requests

extension ClickHouseClient {
    private struct Result {
        var status: Int
        var body: [UInt8]
        var exceptionCode: Int?
    }

    /// Sends a POST and returns the body of a 200 response, or throws the error it describes.
    private func send(url: String, body: [UInt8], target: String) throws(ClickHouseError)
        -> [UInt8]
    {
        let result = try perform(url: url, body: body, target: target)
        if result.status == 200 {
            return result.body
        }
        let proxyStatuses = [502, 503, 504]
        if result.exceptionCode == nil, proxyStatuses.contains(result.status),
            !result.body.starts(with: Array("Code: ".utf8))
        {
            throw ClickHouseError(
                kind: .unreachable, target: target, status: result.status, exceptionCode: nil,
                message: ClickHouseError.ServerMessage.clean(result.body))
        }
        throw ClickHouseError.rejected(
            status: result.status, headerCode: result.exceptionCode, body: result.body,
            target: target)
    }

    /// Runs one transfer on the shared handle: a POST of `body`, or a GET when `body` is nil.
    private func perform(url: String, body: [UInt8]?, target: String) throws(ClickHouseError)
        -> Result
    {
        response.reset()
        errorText[0] = 0
        ccurl_setopt_string(handle, CURLOPT_URL, url)

        let code: CURLcode
        if let body {
            precondition(!body.isEmpty, "a POST body must not be empty: libcurl would read stdin")
            ccurl_setopt_long(handle, CURLOPT_POST, 1)
            ccurl_setopt_off_t(handle, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(body.count))
            // libcurl reads the body through this pointer during curl_easy_perform only, and
            // the pointer is cleared before `body` goes out of scope.
            code = body.withUnsafeBytes { bytes in
                ccurl_setopt_pointer(handle, CURLOPT_POSTFIELDS, UnsafeMutableRawPointer(
                    mutating: bytes.baseAddress))
                return curl_easy_perform(handle)
            }
            ccurl_setopt_pointer(handle, CURLOPT_POSTFIELDS, nil)
        } else {
            ccurl_setopt_long(handle, CURLOPT_HTTPGET, 1)
            code = curl_easy_perform(handle)
        }

        var newConnections = 0
        ccurl_getinfo_long(handle, CURLINFO_NUM_CONNECTS, &newConnections)
        connectionsOpened += newConnections

        guard code == CURLE_OK else {
            throw transferError(code, target: target)
        }
        var status = 0
        ccurl_getinfo_long(handle, CURLINFO_RESPONSE_CODE, &status)
        return Result(status: status, body: response.body, exceptionCode: response.exceptionCode)
    }

    private func transferError(_ code: CURLcode, target: String) -> ClickHouseError {
        var text = String(cString: errorText)
        if text.isEmpty {
            text = String(cString: curl_easy_strerror(code))
        }
        let message = "\(text) (curl code \(code.rawValue), \(settings.host):\(settings.httpPort))"
        let clientSide = [CURLE_URL_MALFORMAT, CURLE_UNSUPPORTED_PROTOCOL,
                          CURLE_BAD_FUNCTION_ARGUMENT, CURLE_OUT_OF_MEMORY]
        let kind: ClickHouseError.Kind = clientSide.contains(code) ? .invalidRequest : .unreachable
        return ClickHouseError(
            kind: kind, target: target, status: nil, exceptionCode: nil, message: message)
    }

    /// Returns the URL for a query request: the database plus the given parameters,
    /// percent-encoded.
    private func queryURL(_ parameters: [(String, String)]) -> String {
        var url = baseURL + "?database=" + URLQuery.encode(settings.database)
        for (name, value) in parameters {
            url += "&" + name + "=" + URLQuery.encode(value)
        }
        return url
    }
}

// MARK: - Source columns

extension ClickHouseClient {
    private func sendInsert(table: String, body: [UInt8], target: String)
        throws(ClickHouseError)
    {
        let url = queryURL([
            ("query", "INSERT INTO \(table) FORMAT JSONEachRow"),
            ("input_format_skip_unknown_fields", "0"),
        ])
        _ = try send(url: url, body: body, target: target)
    }

    /// Handles a failed insert. An unknown-column error drops the table's cached columns, and
    /// when the source columns that were written no longer exist, the rows go in once more
    /// without them. Every other case rethrows `error`.
    private func retryAfterUnknownColumn(
        _ error: ClickHouseError, table: String, rows: [[UInt8]], sources: [RowSource?],
        writtenWith columns: SourceColumns
    ) throws(ClickHouseError) {
        guard error.isUnknownColumn else { throw error }
        sourceColumnsByTable[table] = nil
        guard columns != .absent else { throw error }

        // Retrying is safe only when the table has lost its source columns. Then the unknown
        // key was the first key of the first row, so ClickHouse rejected the first block and
        // wrote nothing.
        let refreshed = try sourceColumns(of: table, target: error.target)
        guard refreshed == .absent else { throw error }
        Log.shared.info("ClickHouse table lost its source columns; inserting the rows again", [
            "clickhouse.table": .string(table), "rows": .int(rows.count),
            "error": .string(error.description),
        ])
        let body = try Self.insertBody(
            rows: rows, sources: sources, columns: refreshed, target: error.target)
        try sendInsert(table: table, body: body, target: error.target)
    }

    /// Returns the table's source columns from the cache, or from `DESCRIBE TABLE` on a miss.
    /// A failed lookup is reported with the insert's target, since the insert did not happen.
    private func sourceColumns(of table: String, target: String) throws(ClickHouseError)
        -> SourceColumns
    {
        if let cached = sourceColumnsByTable[table] {
            return cached
        }
        columnLookups += 1
        let lines: [[UInt8]]
        do throws(ClickHouseError) {
            lines = try select("DESCRIBE TABLE \(table)")
        } catch {
            throw ClickHouseError(
                kind: error.kind, target: target, status: error.status,
                exceptionCode: error.exceptionCode, message: error.message)
        }
        let columns = try SourceColumns(describeOutput: lines, table: table, target: target)
        sourceColumnsByTable[table] = columns
        return columns
    }

    /// Joins the rows into a JSONEachRow body. When the table has source columns, each row
    /// with a source gets the source keys, and each row without one is checked for them.
    static func insertBody(
        rows: [[UInt8]], sources: [RowSource?], columns: SourceColumns, target: String
    ) throws(ClickHouseError) -> [UInt8] {
        // Each row adds its newline and, with source columns, about 110 bytes of source keys
        // for a topic name of 20 characters.
        let addedBytesPerRow = columns == .absent ? 1 : 111
        var body: [UInt8] = []
        body.reserveCapacity(rows.reduce(rows.count * addedBytesPerRow) { $0 + $1.count })

        for (position, row) in rows.enumerated() {
            let source = sources[position]
            do throws(SourceRowError) {
                switch (columns, source) {
                case (.absent, _):
                    body.append(contentsOf: row)
                case (.present(let types), let source?):
                    try SourceColumns.appendRow(row, source: source, types: types, to: &body)
                case (.present, nil):
                    try SourceColumns.requireSourceKeys(row)
                    body.append(contentsOf: row)
                }
            } catch {
                let origin = source.map { "\($0)" } ?? "no source"
                throw ClickHouseError(
                    kind: .invalidRequest, target: target, status: nil, exceptionCode: nil,
                    message: "row \(position + 1) of \(rows.count) (\(origin)) \(error.reason)")
            }
            body.append(UInt8(ascii: "\n"))
        }
        return body
    }
}

/// The reason one row cannot be inserted, worded to follow "row N of M (source)" in the
/// message of the `ClickHouseError` that reports it.
struct SourceRowError: Error {
    let reason: String
}

extension ClickHouseError {
    /// Whether the server rejected a JSONEachRow insert because a row names a column that the
    /// table lacks. ClickHouse 18.16 reports that as code 117 (INCORRECT_DATA) with the text
    /// "Unknown field found while parsing JSONEachRow format".
    var isUnknownColumn: Bool {
        kind == .rejected && exceptionCode == 117 && message.contains("Unknown field")
    }
}

extension ClickHouseClient {
    /// An integer type that a source column may have, with the values it holds. Narrower
    /// types are not accepted because Kafka partitions and offsets can outgrow them.
    enum SourceIntegerType: String, Sendable {
        case int32 = "Int32"
        case int64 = "Int64"
        case uint32 = "UInt32"
        case uint64 = "UInt64"

        func contains(_ value: Int64) -> Bool {
            switch self {
            case .int32: return Int64(Int32.min) <= value && value <= Int64(Int32.max)
            case .int64: return true
            case .uint32: return 0 <= value && value <= Int64(UInt32.max)
            case .uint64: return value >= 0
            }
        }
    }

    /// The integer types of a table's `_source_partition`, `_source_offset` and
    /// `_source_index` columns.
    struct SourceColumnTypes: Sendable, Equatable {
        var partition: SourceIntegerType
        var offset: SourceIntegerType
        var index: SourceIntegerType
    }

    /// The source columns that a table declares, and the rules for rows that go into it.
    enum SourceColumns: Sendable, Equatable {
        /// The table has none of the four columns, so rows go in unchanged.
        case absent
        /// The table has all four, and their integer types bound the values written.
        case present(SourceColumnTypes)

        static let topic = "_source_topic"
        static let partition = "_source_partition"
        static let offset = "_source_offset"
        static let index = "_source_index"
        static let names = [topic, partition, offset, index]
        /// Key prefix that a row with a source must not use, so that no row key collides with
        /// a source column, now or after one is added.
        static let reservedPrefix = "_source_"

        static let topicTypes = ["String", "LowCardinality(String)"]
        static let partitionTypes: [SourceIntegerType] = [.int32, .int64, .uint32, .uint64]
        static let offsetTypes: [SourceIntegerType] = [.int64, .uint64]
        static let indexTypes: [SourceIntegerType] = [.int32, .int64, .uint32, .uint64]

        /// The declaration that error messages suggest.
        static let expectedDeclaration = "_source_topic String, _source_partition Int32, "
            + "_source_offset Int64, _source_index UInt32"
    }
}

// MARK: - Reading DESCRIBE TABLE

extension ClickHouseClient.SourceColumns {
    /// One row of `DESCRIBE TABLE ... FORMAT JSONEachRow`. ClickHouse 18.16 also sends
    /// `default_expression` and `comment_expression`, which are not needed here.
    private struct DescribedColumn: Decodable {
        var name: String
        var type: String
        /// Empty, `DEFAULT`, `MATERIALIZED` or `ALIAS`.
        var defaultKind: String

        enum CodingKeys: String, CodingKey {
            case name
            case type
            case defaultKind = "default_type"
        }
    }

    /// Reads the source columns from DESCRIBE TABLE's output, one JSON object per line.
    /// Throws `invalidRequest` when the table declares only some of the four columns, or one
    /// that an insert cannot fill.
    init(describeOutput lines: [[UInt8]], table: String, target: String)
        throws(ClickHouseError)
    {
        func invalid(_ message: String) -> ClickHouseError {
            ClickHouseError(
                kind: .invalidRequest, target: target, status: nil, exceptionCode: nil,
                message: message)
        }

        var declared: [String: DescribedColumn] = [:]
        let decoder = JSONDecoder()
        for line in lines {
            guard let column = try? decoder.decode(DescribedColumn.self, from: Data(line)) else {
                throw ClickHouseError(
                    kind: .rejected, target: target, status: 200, exceptionCode: nil,
                    message: "unexpected DESCRIBE TABLE \(table) output line: "
                        + String(decoding: line.prefix(200), as: UTF8.self))
            }
            if Self.names.contains(column.name) {
                declared[column.name] = column
            }
        }
        if declared.isEmpty {
            self = .absent
            return
        }

        guard let topic = declared[Self.topic], let partition = declared[Self.partition],
            let offset = declared[Self.offset], let index = declared[Self.index]
        else {
            let present = Self.names.filter { declared[$0] != nil }.joined(separator: ", ")
            let missing = Self.names.filter { declared[$0] == nil }.joined(separator: ", ")
            throw invalid(
                "table \(table) has the source columns \(present) but lacks \(missing); "
                    + "declare all four (\(Self.expectedDeclaration)) or none")
        }

        for column in [topic, partition, offset, index]
        where column.defaultKind == "MATERIALIZED" || column.defaultKind == "ALIAS" {
            throw invalid(
                "column \(column.name) of table \(table) is \(column.defaultKind), so an insert "
                    + "cannot set it; declare it as an ordinary column")
        }
        if !Self.topicTypes.contains(topic.type) {
            throw invalid(
                "column \(Self.topic) of table \(table) has type \(topic.type); expected "
                    + Self.topicTypes.joined(separator: " or "))
        }

        func integerType(
            of column: DescribedColumn, allowed: [ClickHouseClient.SourceIntegerType]
        ) throws(ClickHouseError) -> ClickHouseClient.SourceIntegerType {
            if let type = ClickHouseClient.SourceIntegerType(rawValue: column.type),
                allowed.contains(type)
            {
                return type
            }
            let expected = allowed.map(\.rawValue).joined(separator: ", ")
            throw invalid(
                "column \(column.name) of table \(table) has type \(column.type); expected one "
                    + "of \(expected)")
        }
        self = .present(ClickHouseClient.SourceColumnTypes(
            partition: try integerType(of: partition, allowed: Self.partitionTypes),
            offset: try integerType(of: offset, allowed: Self.offsetTypes),
            index: try integerType(of: index, allowed: Self.indexTypes)))
    }
}

// MARK: - Writing source keys into rows

extension ClickHouseClient.SourceColumns {
    /// Appends `row` to `body` with the source keys written right after its opening brace,
    /// or throws without appending anything.
    static func appendRow(
        _ row: [UInt8], source: RowSource, types: ClickHouseClient.SourceColumnTypes,
        to body: inout [UInt8]
    ) throws(SourceRowError) {
        let object = try JSONObjectKeys(scanning: row)
        if let key = object.keys.first(where: { $0.hasPrefix(reservedPrefix) }) {
            throw SourceRowError(
                reason: "already contains the key \"\(key)\"; keys starting with "
                    + "\(reservedPrefix) are reserved for the source columns, which the client "
                    + "fills from the row's source")
        }
        let values: [(String, Int64, ClickHouseClient.SourceIntegerType)] = [
            (partition, Int64(source.partition), types.partition),
            (offset, source.offset, types.offset),
            (index, Int64(source.index), types.index),
        ]
        for (name, value, type) in values where !type.contains(value) {
            throw SourceRowError(
                reason: "has \(name) \(value), which does not fit the column type "
                    + type.rawValue)
        }

        var writer = JSONWriter()
        writer.field(topic, first: true)
        writer.string(source.topic)
        for (name, value, _) in values {
            writer.field(name)
            writer.integer(value)
        }

        let afterBrace = object.openingBrace + 1
        body.append(contentsOf: row[..<afterBrace])
        body.append(contentsOf: writer.bytes)
        if !object.keys.isEmpty {
            body.append(UInt8(ascii: ","))
        }
        body.append(contentsOf: row[afterBrace...])
    }

    /// Accepts a row without a source only when it carries all four source keys itself.
    /// Otherwise ClickHouse 18.16 would fill the missing columns with an empty topic and zeros,
    /// and every such row would share one sorting key and replace the others.
    static func requireSourceKeys(_ row: [UInt8]) throws(SourceRowError) {
        let keys = Set(try JSONObjectKeys(scanning: row).keys)
        let missing = names.filter { !keys.contains($0) }
        if !missing.isEmpty {
            throw SourceRowError(
                reason: "lacks \(missing.joined(separator: ", ")), which the table's source "
                    + "columns need; append the row with a RowSource so that the client adds "
                    + "them")
        }
    }
}

/// The top-level keys of a JSON object and the position of its opening brace. The scan skips
/// values without checking them, since ClickHouse parses the row in full.
struct JSONObjectKeys {
    /// Byte offset of the opening brace, after any leading whitespace.
    let openingBrace: Int
    /// Keys in the order they appear, with escape sequences decoded.
    let keys: [String]

    init(scanning bytes: [UInt8]) throws(SourceRowError) {
        var cursor = Cursor(bytes: bytes)
        cursor.skipWhitespace()
        openingBrace = cursor.position
        try cursor.expect(UInt8(ascii: "{"), "'{'")

        var keys: [String] = []
        cursor.skipWhitespace()
        if cursor.peek() == UInt8(ascii: "}") {
            self.keys = keys
            return
        }
        while true {
            cursor.skipWhitespace()
            guard cursor.peek() == UInt8(ascii: "\"") else {
                throw cursor.failure("expected a key")
            }
            keys.append(try Self.decodeKey(cursor.readString()))
            try cursor.expect(UInt8(ascii: ":"), "':'")
            try cursor.skipValue()

            cursor.skipWhitespace()
            if cursor.peek() == UInt8(ascii: ",") {
                cursor.position += 1
            } else if cursor.peek() == UInt8(ascii: "}") {
                break
            } else {
                throw cursor.failure("expected ',' or '}'")
            }
        }
        self.keys = keys
    }

    /// Decodes a key's bytes between the quotes. ClickHouse decodes escapes in keys, so
    /// `"\u005fsource_offset"` names the column `_source_offset`.
    private static func decodeKey(_ raw: ArraySlice<UInt8>) throws(SourceRowError) -> String {
        guard raw.contains(UInt8(ascii: "\\")) else {
            return String(decoding: raw, as: UTF8.self)
        }
        let quoted = [UInt8(ascii: "\"")] + raw + [UInt8(ascii: "\"")]
        guard let key = try? JSONDecoder().decode(String.self, from: Data(quoted)) else {
            throw SourceRowError(reason: "is not a JSON object: a key has an invalid escape")
        }
        return key
    }

    private struct Cursor {
        let bytes: [UInt8]
        var position = 0

        func peek() -> UInt8? {
            position < bytes.count ? bytes[position] : nil
        }

        func failure(_ problem: String) -> SourceRowError {
            SourceRowError(reason: "is not a JSON object: \(problem) at byte \(position)")
        }

        mutating func skipWhitespace() {
            while let byte = peek(), byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D {
                position += 1
            }
        }

        mutating func expect(_ byte: UInt8, _ name: String) throws(SourceRowError) {
            skipWhitespace()
            guard peek() == byte else { throw failure("expected \(name)") }
            position += 1
        }

        /// Reads a string from its opening quote and returns the bytes between the quotes.
        mutating func readString() throws(SourceRowError) -> ArraySlice<UInt8> {
            let start = position + 1
            position = start
            while let byte = peek() {
                if byte == UInt8(ascii: "\\") {
                    position += 2
                } else if byte == UInt8(ascii: "\"") {
                    position += 1
                    return bytes[start..<(position - 1)]
                } else {
                    position += 1
                }
            }
            throw failure("unterminated string")
        }

        /// Moves past one value: a string, an object or array with everything inside, or a
        /// number or literal, which ends at the next delimiter.
        mutating func skipValue() throws(SourceRowError) {
            skipWhitespace()
            switch peek() {
            case nil:
                throw failure("expected a value")
            case UInt8(ascii: "\""):
                _ = try readString()
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                try skipContainer()
            default:
                let start = position
                while let byte = peek(), !",}] \t\r\n".utf8.contains(byte) {
                    position += 1
                }
                if position == start { throw failure("expected a value") }
            }
        }

        private mutating func skipContainer() throws(SourceRowError) {
            var depth = 0
            while let byte = peek() {
                switch byte {
                case UInt8(ascii: "\""):
                    _ = try readString()
                    continue
                case UInt8(ascii: "{"), UInt8(ascii: "["):
                    depth += 1
                case UInt8(ascii: "}"), UInt8(ascii: "]"):
                    depth -= 1
                default:
                    break
                }
                position += 1
                if depth == 0 { return }
            }
            throw failure("unterminated object or array")
        }
    }
}

// MARK: - Setup

extension ClickHouseClient {
    private static func validate(_ settings: ClickHouseSettings) throws(ClickHouseError) {
        func invalid(_ message: String) -> ClickHouseError {
            ClickHouseError(
                kind: .invalidRequest, target: "client setup", status: nil, exceptionCode: nil,
                message: message)
        }
        if settings.host.isEmpty || settings.host.contains(where: { "/?#@ \r\n".contains($0) }) {
            throw invalid("invalid host \"\(settings.host)\": expected a host name or IP address")
        }
        if !(1...65535).contains(settings.httpPort) {
            throw invalid("invalid httpPort \(settings.httpPort): expected 1 to 65535")
        }
        if settings.timeoutMs <= 0 || settings.connectTimeoutMs <= 0 {
            throw invalid(
                "invalid timeout (timeoutMs \(settings.timeoutMs), connectTimeoutMs "
                    + "\(settings.connectTimeoutMs)): expected milliseconds above 0")
        }
        if settings.database.isEmpty {
            throw invalid("database is empty: expected a database name such as default")
        }
        // A line break would end the header early and let the rest inject other headers.
        let lineBreaks: Set<Character> = ["\r", "\n", "\r\n"]
        if settings.user.isEmpty || settings.user.contains(where: lineBreaks.contains) {
            throw invalid("invalid user \"\(settings.user)\": expected a name without line breaks")
        }
        if let password = settings.password, password.contains(where: lineBreaks.contains) {
            throw invalid("invalid password: it contains a line break")
        }
    }

    /// Builds the header list sent with every request. The client owns the list and frees it
    /// in deinit, after the handle that points to it.
    private static func makeHeaders(_ settings: ClickHouseSettings)
        -> UnsafeMutablePointer<curl_slist>
    {
        // ClickHouse 18.16 reads the key only together with the user header. A key alone
        // fails as "Unknown user".
        var lines = ["X-ClickHouse-User: \(settings.user)"]
        if let password = settings.password {
            lines.append("X-ClickHouse-Key: \(password)")
        }
        // An empty Expect header stops libcurl from waiting for "100 Continue" before large
        // bodies.
        lines.append("Expect:")

        var list: UnsafeMutablePointer<curl_slist>? = nil
        for line in lines {
            guard let extended = curl_slist_append(list, line) else {
                fatalError("curl_slist_append failed: out of memory")
            }
            list = extended
        }
        return list!
    }

    private func configureHandle() {
        let timeout = settings.timeoutMs
        let connectTimeout = settings.connectTimeoutMs
        ccurl_setopt_long(handle, CURLOPT_TIMEOUT_MS, timeout)
        ccurl_setopt_long(handle, CURLOPT_CONNECTTIMEOUT_MS, connectTimeout)
        // Timeouts must not use SIGALRM: other threads of the runtime would receive it.
        ccurl_setopt_long(handle, CURLOPT_NOSIGNAL, 1)
        // An empty proxy ignores http_proxy and similar variables in the environment.
        ccurl_setopt_string(handle, CURLOPT_PROXY, "")
        ccurl_setopt_pointer(handle, CURLOPT_HTTPHEADER, UnsafeMutableRawPointer(headers))
        ccurl_setopt_pointer(handle, CURLOPT_ERRORBUFFER, UnsafeMutableRawPointer(errorText))

        // The collector lives as long as the client, which outlives every transfer.
        let collector = Unmanaged.passUnretained(response).toOpaque()
        ccurl_setopt_pointer(handle, CURLOPT_WRITEDATA, collector)
        ccurl_setopt_pointer(handle, CURLOPT_HEADERDATA, collector)
        ccurl_setopt_write_function(handle, CURLOPT_WRITEFUNCTION) { data, size, count, context in
            let collector = Unmanaged<ResponseCollector>.fromOpaque(context!).takeUnretainedValue()
            let length = size * count
            collector.body.append(contentsOf: UnsafeRawBufferPointer(start: data, count: length))
            return length
        }
        ccurl_setopt_write_function(handle, CURLOPT_HEADERFUNCTION) { data, size, count, context in
            let collector = Unmanaged<ResponseCollector>.fromOpaque(context!).takeUnretainedValue()
            let length = size * count
            collector.readHeader(UnsafeRawBufferPointer(start: data, count: length))
            return length
        }
    }
}

// MARK: - Checks and names

extension ClickHouseClient {
    /// Names a statement by its first six words at most, so errors identify it without
    /// carrying whole literals.
    static func statementTarget(_ sql: String) -> String {
        let words = sql.split(whereSeparator: { $0.isWhitespace }).prefix(6)
        var text = words.joined(separator: " ")
        if text.count > 80 {
            text = String(text.prefix(80)) + "..."
        }
        return "statement \"\(text)\""
    }

    private static func requireStatement(_ sql: String, target: String) throws(ClickHouseError) {
        if sql.allSatisfy({ $0.isWhitespace || $0 == ";" }) {
            throw ClickHouseError(
                kind: .invalidRequest, target: target, status: nil, exceptionCode: nil,
                message: "the statement is empty")
        }
    }

    /// Accepts `table` or `database.table` made of ASCII letters, digits and underscores, not
    /// starting with a digit. The name is placed into SQL unquoted, so nothing else may pass.
    private static func requireTableName(_ table: String, target: String)
        throws(ClickHouseError)
    {
        let parts = table.split(separator: ".", omittingEmptySubsequences: false)
        let valid = (1...2).contains(parts.count) && parts.allSatisfy { part in
            guard let first = part.first, !first.isNumber else { return false }
            return part.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
        }
        if !valid {
            throw ClickHouseError(
                kind: .invalidRequest, target: target, status: nil, exceptionCode: nil,
                message: "invalid table name \"\(table)\": expected table or database.table "
                    + "made of ASCII letters, digits and underscores")
        }
    }
}

extension ClickHouseError {
    /// Builds a `rejected` error from an error response. The header code wins over the code
    /// in the body because newer servers send both and only the header is meant for programs.
    static func rejected(status: Int, headerCode: Int?, body: [UInt8], target: String)
        -> ClickHouseError
    {
        ClickHouseError(
            kind: .rejected, target: target, status: status,
            exceptionCode: headerCode ?? ServerMessage.code(body),
            message: ServerMessage.clean(body))
    }
}

extension ClickHouseClient {
    /// The body and the exception header of the current transfer, filled by libcurl's
    /// callbacks.
    private final class ResponseCollector {
        var body: [UInt8] = []
        var exceptionCode: Int?

        func reset() {
            body.removeAll(keepingCapacity: true)
            exceptionCode = nil
        }

        /// Reads one header line. A new status line starts a new response (after a redirect or
        /// a "100 Continue"), so it clears what earlier ones set.
        func readHeader(_ line: UnsafeRawBufferPointer) {
            let text = String(decoding: line, as: UTF8.self)
            if text.hasPrefix("HTTP/") {
                exceptionCode = nil
                return
            }
            let name = "x-clickhouse-exception-code:"
            if text.lowercased().hasPrefix(name) {
                let value = text.dropFirst(name.count).filter { !$0.isWhitespace }
                exceptionCode = Int(value)
            }
        }
    }
}

// MARK: - Text helpers

extension ClickHouseError {
    /// Reads ClickHouse's exception text, which 18.16 writes as
    /// `Code: 60, e.displayText() = DB::Exception: <text>, e.what() = DB::Exception` and newer
    /// servers as `Code: 60. DB::Exception: <text> (<NAME>) (version ...)`.
    enum ServerMessage {
        /// Maximum message length kept, in characters. Syntax errors list every expected token.
        static let maxLength = 600

        static func code(_ body: [UInt8]) -> Int? {
            let start = String(decoding: body.prefix(24), as: UTF8.self)
            guard start.hasPrefix("Code: ") else { return nil }
            return Int(start.dropFirst(6).prefix(while: { $0.isASCII && $0.isNumber }))
        }

        /// Returns the exception text on one line, without the code and class prefixes.
        static func clean(_ body: [UInt8]) -> String {
            let lines = String(decoding: body, as: UTF8.self).split(whereSeparator: \.isNewline)
            var text = Substring(lines.map { trim($0) }.joined(separator: " "))

            if text.hasPrefix("Code: ") {
                text = text.dropFirst(6).drop(while: { $0.isASCII && $0.isNumber })
                text = text.drop(while: { $0 == "," || $0 == "." || $0 == " " })
            }
            for prefix in ["e.displayText() = ", "DB::Exception: "] where text.hasPrefix(prefix) {
                text = text.dropFirst(prefix.count)
            }
            if let suffix = text.firstRange(of: ", e.what() = ") {
                text = text[..<suffix.lowerBound]
            }

            var message = trim(text)
            if message.isEmpty {
                message = "empty response body"
            } else if message.count > maxLength {
                message = String(message.prefix(maxLength)) + "..."
            }
            return message
        }

        private static func trim(_ text: Substring) -> String {
            let start = text.drop(while: \.isWhitespace)
            let end = start.reversed().drop(while: \.isWhitespace).count
            return String(start.prefix(end))
        }
    }
}

extension ClickHouseClient {
    /// Just enough SQL lexing to find a trailing FORMAT clause: string literals, quoted names
    /// and comments are skipped, so a word inside them does not count.
    enum SQLText {
        /// Returns whether the statement ends in `FORMAT <name>`, optionally followed by
        /// semicolons.
        static func hasFormatClause(_ sql: String) -> Bool {
            let tokens = significantTokens(Array(sql.utf8))
            guard tokens.count >= 2, let name = tokens[tokens.count - 1],
                let keyword = tokens[tokens.count - 2]
            else {
                return false
            }
            let startsLikeName = name.first.map { !$0.isNumber } ?? false
            return keyword.uppercased() == "FORMAT" && startsLikeName
        }

        /// Drops trailing whitespace and semicolons, so that a clause can be appended.
        static func trimmingTerminator(_ sql: String) -> String {
            var text = Substring(sql)
            while let last = text.last, last.isWhitespace || last == ";" {
                text = text.dropLast()
            }
            return String(text)
        }

        /// Returns the statement's tokens without comments and trailing semicolons: each word
        /// as its text, and each literal, quoted name or punctuation mark as nil.
        private static func significantTokens(_ bytes: [UInt8]) -> [String?] {
            var tokens: [String?] = []
            var index = 0
            while index < bytes.count {
                let byte = bytes[index]
                let next = index + 1 < bytes.count ? bytes[index + 1] : 0
                switch byte {
                case UInt8(ascii: "'"), UInt8(ascii: "\""), UInt8(ascii: "`"):
                    index = endOfQuoted(bytes, from: index)
                    tokens.append(nil)
                case UInt8(ascii: "-") where next == UInt8(ascii: "-"):
                    index = bytes[index...].firstIndex(of: UInt8(ascii: "\n")) ?? bytes.count
                case UInt8(ascii: "/") where next == UInt8(ascii: "*"):
                    index = endOfBlockComment(bytes, from: index)
                case _ where isWordByte(byte):
                    let end = bytes[index...].firstIndex(where: { !isWordByte($0) }) ?? bytes.count
                    tokens.append(String(decoding: bytes[index..<end], as: UTF8.self))
                    index = end
                case _ where byte == UInt8(ascii: ";") || byte <= 0x20:
                    index += 1
                default:
                    tokens.append(nil)
                    index += 1
                }
            }
            return tokens
        }

        private static func isWordByte(_ byte: UInt8) -> Bool {
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A)
                || (byte >= 0x61 && byte <= 0x7A) || byte == UInt8(ascii: "_") || byte >= 0x80
        }

        /// Returns the index after the closing quote. A backslash escapes the next byte.
        private static func endOfQuoted(_ bytes: [UInt8], from start: Int) -> Int {
            let quote = bytes[start]
            var index = start + 1
            while index < bytes.count {
                if bytes[index] == UInt8(ascii: "\\") {
                    index += 2
                } else if bytes[index] == quote {
                    return index + 1
                } else {
                    index += 1
                }
            }
            return bytes.count
        }

        private static func endOfBlockComment(_ bytes: [UInt8], from start: Int) -> Int {
            var index = start + 2
            while index + 1 < bytes.count {
                if bytes[index] == UInt8(ascii: "*") && bytes[index + 1] == UInt8(ascii: "/") {
                    return index + 2
                }
                index += 1
            }
            return bytes.count
        }
    }

    /// Percent-encoding for URL query values: every byte except the unreserved characters of
    /// RFC 3986 (letters, digits, `-`, `.`, `_`, `~`).
    enum URLQuery {
        static func encode(_ value: String) -> String {
            let hexDigits = Array("0123456789ABCDEF".utf8)
            var encoded: [UInt8] = []
            encoded.reserveCapacity(value.utf8.count)
            for byte in value.utf8 {
                let isUnreserved = (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A)
                    || (byte >= 0x61 && byte <= 0x7A) || "-._~".utf8.contains(byte)
                if isUnreserved {
                    encoded.append(byte)
                } else {
                    encoded.append(UInt8(ascii: "%"))
                    encoded.append(hexDigits[Int(byte >> 4)])
                    encoded.append(hexDigits[Int(byte & 0x0F)])
                }
            }
            return String(decoding: encoded, as: UTF8.self)
        }
    }
}

@available(*, unavailable)
extension ClickHouseClient: Sendable {}
