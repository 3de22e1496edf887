import CCurl

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
        /// The client did not send the request because an argument is invalid.
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

    /// Inserts rows, each already one JSON object, with `INSERT INTO <table> FORMAT JSONEachRow`
    /// and returns how long the request took. An empty `rows` sends nothing.
    ///
    /// A column that the table lacks fails the insert, because the request sets
    /// `input_format_skip_unknown_fields` to 0 over any value in the user's profile.
    /// ClickHouse 18.16 parses and writes the body in blocks of `max_insert_block_size` rows
    /// (1,048,576 by default), so a bad row makes a smaller insert write nothing.
    /// NOTE: after an `unreachable` error the server may still have stored the rows, so a retry
    /// can write them twice unless the table deduplicates (ReplacingMergeTree).
    @discardableResult
    public func insert(table: String, rows: [[UInt8]]) throws(ClickHouseError) -> Duration {
        let target = "insert into \(table)"
        try Self.requireTableName(table, target: target)
        if rows.isEmpty { return .zero }

        var body: [UInt8] = []
        body.reserveCapacity(rows.reduce(rows.count) { $0 + $1.count })
        for row in rows {
            body.append(contentsOf: row)
            body.append(UInt8(ascii: "\n"))
        }
        let url = queryURL([
            ("query", "INSERT INTO \(table) FORMAT JSONEachRow"),
            ("input_format_skip_unknown_fields", "0"),
        ])

        let clock = ContinuousClock()
        let started = clock.now
        _ = try send(url: url, body: body, target: target)
        return clock.now - started
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
