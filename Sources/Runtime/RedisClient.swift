import CHiredis
import Foundation

/// A blocking connection to one Redis server through hiredis' synchronous API.
///
/// One thread owns a connection for its whole life, so the type is not `Sendable`. Calls
/// connect on demand. After an I/O error, a timeout or a server restart the connection is
/// closed and the failing call throws. The next call then makes one connect attempt, while
/// `ensureConnected(deadline:)` retries with backoff.
///
/// It uses hiredis 0.14 (Debian 12's libhiredis-dev), which has no `redisConnectWithOptions`
/// and no RESP3, so it connects with `redisConnectWithTimeout` and speaks RESP2.
public final class RedisConnection {
    public let settings: RedisSettings

    /// The hiredis context, or nil while disconnected. This connection owns it and frees it
    /// with `redisFree` in `close()` or `deinit`.
    private var context: UnsafeMutablePointer<redisContext>?

    /// SHA-1s of the scripts that the server of the current connection has loaded, so that
    /// `ensureScriptsLoaded` sends nothing for them. Cleared on every reconnect, because the
    /// server may have restarted with an empty script cache.
    var loadedScripts: Set<String> = []
    /// The RESP bytes of the current round trip, kept between calls to reuse its capacity.
    private var requestBuffer: [UInt8] = []

    private static let initialBackoffMs = 50
    private static let maxBackoffMs = 2000

    public init(settings: RedisSettings) {
        self.settings = settings
    }

    deinit {
        if let context {
            redisFree(context)
        }
    }

    public var isConnected: Bool { context != nil }

    public var endpoint: String { settings.endpoint }

    /// Opens a new connection, replacing any current one: connects within
    /// `connectTimeoutMs`, sets the command timeout, sends AUTH when a password is set, and
    /// SELECTs `db`.
    public func connect() throws(RedisError) {
        close()
        if let problem = settings.invalidSettingMessage {
            throw RedisError(kind: .connect, endpoint: endpoint, message: problem)
        }
        _ = Self.brokenPipeSignalIgnored

        context = try openSocket()
        do {
            try applyCommandTimeout()
            try authenticate()
            try selectDatabase()
        } catch {
            close()
            throw error
        }
        Log.shared.info("Redis connected", ["redis.endpoint": .string(endpoint), "redis.db": .int(settings.db)])
    }

    /// Connects unless connected, retrying failed attempts with exponential backoff: 50 ms
    /// doubling up to 2 s, each delay drawn between half and all of that value.
    ///
    /// Throws the last error once `deadline` has passed. One attempt may end up to
    /// `connectTimeoutMs` after the deadline. An AUTH failure is thrown at once, because
    /// retrying with the same password cannot succeed.
    public func ensureConnected(deadline: ContinuousClock.Instant) throws(RedisError) {
        if isConnected {
            return
        }
        var attempt = 1
        var backoffMs = Self.initialBackoffMs
        while true {
            do {
                try connect()
                if attempt > 1 {
                    Log.shared.info("Redis reconnected", ["redis.endpoint": .string(endpoint), "attempts": .int(attempt)])
                }
                return
            } catch {
                let remainingMs = Self.milliseconds(ContinuousClock.now.duration(to: deadline))
                if error.kind == .auth || remainingMs <= 0 {
                    throw error
                }
                let delayMs = min(Int.random(in: backoffMs / 2...backoffMs), remainingMs)
                // Log passes at most 20 lines of one message per 10 s, so a long outage shared
                // by many connections does not flood the log.
                Log.shared.warn("Redis connect failed, retrying", [
                    "redis.endpoint": .string(endpoint), "attempt": .int(attempt),
                    "retry_in_ms": .int(delayMs), "error": .string(error.message),
                ])
                Thread.sleep(forTimeInterval: Double(delayMs) / 1000)
                backoffMs = min(backoffMs * 2, Self.maxBackoffMs)
                attempt += 1
            }
        }
    }

    /// Connects unless connected, as `ensureConnected(deadline:)` above, with the deadline in
    /// seconds since 1970 as `Date().timeIntervalSince1970` returns.
    public func ensureConnected(deadline secondsSince1970: Double) throws(RedisError) {
        let remaining = secondsSince1970 - Date().timeIntervalSince1970
        let clamped = min(max(remaining, 0), Double(Int32.max))
        try ensureConnected(deadline: ContinuousClock.now + .milliseconds(Int64(clamped * 1000)))
    }

    /// Closes the connection, so the next call reconnects.
    public func close() {
        guard let context else { return }
        redisFree(context)
        self.context = nil
        loadedScripts.removeAll()
    }

    /// Runs one command, typically a read, and returns its reply. An error reply is returned
    /// as `.error`, not thrown.
    public func command(_ arguments: [[UInt8]]) throws(RedisError) -> RedisReply {
        let replies = try roundTrip([.arguments(arguments)])
        return replies[0]
    }

    /// Appends every command to hiredis' output buffer, writes them in one go and reads the
    /// replies in order. Connects first when disconnected. With `inTransaction`, MULTI comes
    /// before the commands and EXEC after them, and their replies are first and last.
    ///
    /// On an I/O error, a timeout or an unreadable reply it closes the connection and throws.
    /// Commands before the failing one may have run.
    func roundTrip(_ commands: [RedisCommand], inTransaction: Bool = false) throws(RedisError) -> [RedisReply] {
        if let empty = commands.firstIndex(where: \.isEmpty) {
            throw RedisError(kind: .invalidCommand, endpoint: endpoint,
                             message: "Redis command \(empty + 1) of \(commands.count) has no arguments, but needs at least the command name")
        }
        guard !commands.isEmpty else { return [] }
        if context == nil {
            try connect()
        }
        guard let context else {
            throw RedisError(kind: .connect, endpoint: endpoint, message: "Redis at \(endpoint) is not connected")
        }
        let sent = SentCommands(commands: commands, inTransaction: inTransaction)

        // The commands are formatted here in RESP, as redisAppendCommandArgv would format each,
        // and handed to hiredis in one call, which copies them into its output buffer.
        requestBuffer.removeAll(keepingCapacity: true)
        if inTransaction {
            Self.multiCommand.encode(into: &requestBuffer)
        }
        for command in commands {
            command.encode(into: &requestBuffer)
        }
        if inTransaction {
            Self.execCommand.encode(into: &requestBuffer)
        }
        let status = requestBuffer.withUnsafeBytes { bytes in
            redisAppendFormattedCommand(context, bytes.baseAddress!.assumingMemoryBound(to: CChar.self), bytes.count)
        }
        if requestBuffer.capacity > Self.maxKeptRequestCapacity {
            requestBuffer = []
        }
        if status != REDIS_OK {
            throw failure(of: sent, at: 0, errorNumber: errno)
        }

        var replies: [RedisReply] = []
        replies.reserveCapacity(sent.count)
        for index in 0..<sent.count {
            // The first call writes the whole output buffer. On success hiredis hands over
            // the reply tree: this function owns it and frees it with freeReplyObject.
            var raw: UnsafeMutableRawPointer?
            let status = redisGetReply(context, &raw)
            let errorNumber = errno
            guard status == REDIS_OK, let raw else {
                throw failure(of: sent, at: index, errorNumber: errorNumber)
            }
            defer { freeReplyObject(raw) }

            guard let reply = RedisReply(copying: raw.assumingMemoryBound(to: redisReply.self)) else {
                close()
                let summary = sent.summary(at: index)
                throw RedisError(kind: .protocol, endpoint: endpoint, command: summary,
                                 message: "Redis at \(endpoint) sent a reply of an unsupported type to \(summary)")
            }
            replies.append(reply)
        }
        return replies
    }

    private static let multiCommand = RedisCommand.arguments([Array("MULTI".utf8)])
    private static let execCommand = RedisCommand.arguments([Array("EXEC".utf8)])
    /// The largest request buffer kept for the next call, so that one large transaction does
    /// not hold its memory for the life of the connection.
    private static let maxKeptRequestCapacity = 1 << 20

    /// The commands of one round trip, with MULTI and EXEC around them in a transaction.
    private struct SentCommands {
        var commands: [RedisCommand]
        var inTransaction: Bool

        var count: Int { commands.count + (inTransaction ? 2 : 0) }

        func summary(at index: Int) -> String {
            guard inTransaction else { return commands[index].summary }
            if index == 0 { return "MULTI" }
            if index == count - 1 { return "EXEC" }
            return commands[index - 1].summary
        }
    }

    /// Builds the error for a failed append or read from the context's error, then closes
    /// the connection, because unread replies leave it out of step.
    private func failure(of commands: SentCommands, at index: Int, errorNumber: Int32) -> RedisError {
        let code = context?.pointee.err ?? 0
        let cause = context.map(Self.errorText) ?? "not connected"
        close()

        let summary = commands.summary(at: index)
        let position = commands.count > 1 ? " (command \(index + 1) of \(commands.count))" : ""
        // hiredis 0.14 reports a socket timeout as an I/O error with errno EAGAIN from read(2)
        // or write(2) under SO_RCVTIMEO or SO_SNDTIMEO.
        let timedOut = code == REDIS_ERR_IO
            && (errorNumber == EAGAIN || errorNumber == EWOULDBLOCK || errorNumber == ETIMEDOUT)
        if timedOut {
            return RedisError(kind: .timeout, endpoint: endpoint, command: summary,
                              message: "Redis at \(endpoint) timed out after \(settings.commandTimeoutMs) ms on \(summary)\(position)")
        }
        if code == REDIS_ERR_PROTOCOL {
            return RedisError(kind: .protocol, endpoint: endpoint, command: summary,
                              message: "Redis at \(endpoint) sent an invalid reply to \(summary)\(position): \(cause)")
        }
        return RedisError(kind: .io, endpoint: endpoint, command: summary,
                          message: "Redis at \(endpoint) failed on \(summary)\(position): \(cause)")
    }

    private func openSocket() throws(RedisError) -> UnsafeMutablePointer<redisContext> {
        let timeout = Self.timeval(milliseconds: settings.connectTimeoutMs)
        // hiredis allocates the context, and from here on this connection owns it, even when
        // connecting failed and the context holds only the error.
        let opened: UnsafeMutablePointer<redisContext>?
        switch (settings.unixSocketPath, settings.connectTimeoutMs) {
        case (let path?, 0): opened = redisConnectUnix(path)
        case (let path?, _): opened = redisConnectUnixWithTimeout(path, timeout)
        case (nil, 0): opened = redisConnect(settings.host, Int32(settings.port))
        case (nil, _): opened = redisConnectWithTimeout(settings.host, Int32(settings.port), timeout)
        }
        guard let opened else {
            throw RedisError(kind: .connect, endpoint: endpoint,
                             message: "Redis at \(endpoint) is unreachable: hiredis could not allocate a context")
        }
        if opened.pointee.err != 0 {
            let cause = Self.errorText(opened)
            redisFree(opened)
            throw RedisError(kind: .connect, endpoint: endpoint, message: "Redis at \(endpoint) is unreachable: \(cause)")
        }
        return opened
    }

    private func applyCommandTimeout() throws(RedisError) {
        guard let context, settings.commandTimeoutMs > 0 else { return }
        if redisSetTimeout(context, Self.timeval(milliseconds: settings.commandTimeoutMs)) != REDIS_OK {
            throw RedisError(kind: .connect, endpoint: endpoint,
                             message: "Redis at \(endpoint): setting the command timeout failed: \(Self.errorText(context))")
        }
    }

    /// Sends AUTH when a password is set. Neither the log nor any error contains the
    /// password, because AUTH's summary is its name alone.
    private func authenticate() throws(RedisError) {
        guard let password = settings.password else { return }
        var arguments = [Array("AUTH".utf8)]
        if let username = settings.username {
            arguments.append(Array(username.utf8))
        }
        arguments.append(Array(password.utf8))

        let reply = try command(arguments)
        if let message = reply.errorMessage {
            throw RedisError(kind: .auth, endpoint: endpoint, command: "AUTH",
                             message: "Redis at \(endpoint) rejected AUTH: \(redactedServerError(message)). Check the Redis password.")
        }
    }

    private func selectDatabase() throws(RedisError) {
        let reply = try command([Array("SELECT".utf8), Array(String(settings.db).utf8)])
        guard let message = reply.errorMessage else { return }
        if message.hasPrefix("NOAUTH") {
            throw RedisError(kind: .auth, endpoint: endpoint, command: "SELECT",
                             message: "Redis at \(endpoint) requires a password: \(message). Set the Redis password.")
        }
        throw RedisError(kind: .connect, endpoint: endpoint, command: "SELECT",
                         message: "Redis at \(endpoint) rejected SELECT \(settings.db): \(redactedServerError(message))")
    }

    /// Writing to a socket whose peer has closed raises SIGPIPE, which ends the process by
    /// default. hiredis writes with write(2) and cannot pass MSG_NOSIGNAL, so the first
    /// connection ignores SIGPIPE for the whole process and such writes fail with EPIPE.
    private static let brokenPipeSignalIgnored: Bool = {
        signal(SIGPIPE, SIG_IGN)
        return true
    }()

    private static func errorText(_ context: UnsafeMutablePointer<redisContext>) -> String {
        withUnsafeBytes(of: context.pointee.errstr) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    private static func timeval(milliseconds: Int) -> Glibc.timeval {
        Glibc.timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
    }

    private static func milliseconds(_ duration: Duration) -> Int {
        let parts = duration.components
        return Int(parts.seconds) * 1000 + Int(parts.attoseconds / 1_000_000_000_000_000)
    }
}

@available(*, unavailable)
extension RedisConnection: Sendable {}
