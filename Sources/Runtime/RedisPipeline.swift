import HostAPI

/// Pipelines, MULTI/EXEC transactions and the script cache of a `RedisConnection`.
extension RedisConnection {
    /// Sends `commands` in one write and returns their replies in command order.
    ///
    /// An error reply, such as WRONGTYPE, is returned as `.error` in its command's place and
    /// does not affect the other commands. A script call that fails with NOSCRIPT is retried
    /// once, after SCRIPT LOAD, in a second round trip. The retried EVALSHA therefore runs
    /// after every other command of the pipeline. Callers whose scripts must run in order
    /// call `ensureScriptsLoaded` first or use `transaction`.
    ///
    /// Throws when the connection fails. It is then closed and the next call reconnects.
    /// Commands before the failure may have run.
    public func pipeline(_ commands: [RedisCommand]) throws(RedisError) -> [RedisReply] {
        var replies = try roundTrip(commands)
        recordScriptReplies(commands, replies)

        let missingScripts = commands.indices.filter { Self.isNoScript(replies[$0], of: commands[$0]) }
        if !missingScripts.isEmpty {
            try retryAfterLoadingScripts(commands, at: missingScripts, replies: &replies)
        }
        return replies
    }

    /// Runs `commands` atomically with MULTI and EXEC in one round trip and returns the
    /// replies that EXEC returned, in command order.
    ///
    /// It loads the scripts of script calls first with `ensureScriptsLoaded`, because a
    /// NOSCRIPT inside EXEC cannot be retried without breaking atomicity. A command that ran
    /// and failed (WRONGTYPE, or NOSCRIPT when the script cache was flushed in between) has
    /// its error reply in its place, and Redis keeps the effects of the other commands.
    ///
    /// Throws `.transactionAborted` when the server rejected a command while queuing it
    /// (unknown command, wrong number of arguments) or EXEC returned nil. Nothing ran then.
    public func transaction(_ commands: [RedisCommand]) throws(RedisError) -> [RedisReply] {
        guard !commands.isEmpty else { return [] }
        try ensureScriptsLoaded(Self.scripts(of: commands))

        let replies = try roundTrip(commands, inTransaction: true)
        try checkQueuedReplies(replies, of: commands)

        switch replies[replies.count - 1] {
        case .array(let results) where results.count == commands.count:
            recordScriptReplies(commands, results)
            return results
        case .null:
            throw RedisError(kind: .transactionAborted, endpoint: endpoint, command: "EXEC",
                             message: "Redis at \(endpoint) aborted the transaction: EXEC returned nil because a watched key changed")
        case .error(let message):
            throw RedisError(kind: .transactionAborted, endpoint: endpoint, command: "EXEC",
                             message: "Redis at \(endpoint) aborted the transaction: \(redactedServerError(message))")
        default:
            close()
            throw RedisError(kind: .protocol, endpoint: endpoint, command: "EXEC",
                             message: "Redis at \(endpoint) sent an unexpected reply to EXEC: expected an array of \(commands.count) replies")
        }
    }

    /// Loads the scripts that the server does not have yet: SCRIPT EXISTS for the scripts not
    /// cached on this connection, then SCRIPT LOAD for the missing ones. It sends nothing
    /// when every script is cached, so calling it before each transaction is cheap.
    ///
    /// Throws `.reply` when a script does not compile or its source does not hash to `sha1`.
    public func ensureScriptsLoaded(_ scripts: [(sha1: String, source: [UInt8])]) throws(RedisError) {
        var uncached: [(sha1: String, source: [UInt8])] = []
        var seen = Set<String>()
        for script in scripts where !loadedScripts.contains(script.sha1) && seen.insert(script.sha1).inserted {
            uncached.append(script)
        }
        guard !uncached.isEmpty else { return }

        let existsArguments = [Array("SCRIPT".utf8), Array("EXISTS".utf8)] + uncached.map { Array($0.sha1.utf8) }
        let exists = try command(existsArguments)
        guard case .array(let flags) = exists, flags.count == uncached.count else {
            throw RedisError(kind: .reply, endpoint: endpoint, command: "SCRIPT EXISTS",
                             message: "Redis at \(endpoint) returned an unexpected reply to SCRIPT EXISTS: \(Self.describeUnexpected(exists))")
        }

        let absent = zip(uncached, flags).filter { $0.1 != .integer(1) }.map(\.0)
        let loadReplies = try roundTrip(absent.map(Self.scriptLoadCommand))
        for (script, reply) in zip(absent, loadReplies) {
            if let problem = Self.scriptLoadProblem(reply, expectedSHA1: script.sha1) {
                throw RedisError(kind: .reply, endpoint: endpoint, command: "SCRIPT LOAD",
                                 message: "Redis at \(endpoint) could not load script \(script.sha1): \(problem)")
            }
        }
        loadedScripts.formUnion(uncached.map(\.sha1))
    }

    /// Loads the scripts that projections declared, as `ensureScriptsLoaded(_:)` above does.
    public func ensureScriptsLoaded(_ scripts: [RedisScript]) throws(RedisError) {
        try ensureScriptsLoaded(scripts.map { (sha1: $0.sha1, source: $0.source) })
    }

    /// Loads the scripts that failed with NOSCRIPT and reruns their calls, in one round trip
    /// and in their original relative order, storing the new replies in `replies`.
    private func retryAfterLoadingScripts(_ commands: [RedisCommand], at indices: [Int],
                                          replies: inout [RedisReply]) throws(RedisError) {
        let scripts = Self.scripts(of: indices.map { commands[$0] })
        let retried = try roundTrip(scripts.map(Self.scriptLoadCommand) + indices.map { commands[$0] })

        var loadFailures: [String: RedisReply] = [:]
        for (position, script) in scripts.enumerated() {
            if let problem = Self.scriptLoadProblem(retried[position], expectedSHA1: script.sha1) {
                loadFailures[script.sha1] = .error(problem)
            } else {
                loadedScripts.insert(script.sha1)
            }
        }
        for (position, index) in indices.enumerated() {
            let sha1 = commands[index].scriptSHA1 ?? ""
            // A failed load leaves the retry with another NOSCRIPT, and the load's own error
            // (such as a compile error) explains more.
            replies[index] = loadFailures[sha1] ?? retried[scripts.count + position]
        }
    }

    /// Throws when MULTI or the queuing of a command failed, naming the first such command.
    private func checkQueuedReplies(_ replies: [RedisReply], of commands: [RedisCommand]) throws(RedisError) {
        if let message = replies[0].errorMessage {
            throw RedisError(kind: .transactionAborted, endpoint: endpoint, command: "MULTI",
                             message: "Redis at \(endpoint) rejected MULTI: \(redactedServerError(message))")
        }
        for (index, command) in commands.enumerated() {
            guard let message = replies[index + 1].errorMessage else { continue }
            throw RedisError(kind: .transactionAborted, endpoint: endpoint, command: command.summary,
                             message: "Redis at \(endpoint) aborted the transaction: \(command.summary) (command \(index + 1) of \(commands.count)) was rejected: \(redactedServerError(message))")
        }
    }

    /// Keeps the script cache in step with what script calls returned: NOSCRIPT means the
    /// server lost the script, and any other reply means it has it.
    func recordScriptReplies(_ commands: [RedisCommand], _ replies: [RedisReply]) {
        // Calls of one script usually follow each other, so a repeat of the last recorded
        // script is recognised by comparing strings, without hashing the SHA-1 again.
        var lastRecorded: String?
        for (command, reply) in zip(commands, replies) {
            guard let sha1 = command.scriptSHA1 else { continue }
            if Self.isNoScript(reply, of: command) {
                loadedScripts.remove(sha1)
                lastRecorded = nil
            } else if sha1 != lastRecorded {
                loadedScripts.insert(sha1)
                lastRecorded = sha1
            }
        }
    }

    private static func isNoScript(_ reply: RedisReply, of command: RedisCommand) -> Bool {
        guard command.scriptSHA1 != nil, let message = reply.errorMessage else { return false }
        return message.hasPrefix("NOSCRIPT")
    }

    /// Returns the distinct scripts of the script calls in `commands`, in first-use order.
    private static func scripts(of commands: [RedisCommand]) -> [(sha1: String, source: [UInt8])] {
        var scripts: [(sha1: String, source: [UInt8])] = []
        var seen = Set<String>()
        var last: String?
        for command in commands {
            // A repeat of the previous call's script is skipped without hashing its SHA-1.
            guard case .script(let sha1, let source, _, _) = command, sha1 != last else { continue }
            last = sha1
            if seen.insert(sha1).inserted {
                scripts.append((sha1: sha1, source: source))
            }
        }
        return scripts
    }

    private static func scriptLoadCommand(_ script: (sha1: String, source: [UInt8])) -> RedisCommand {
        .arguments([Array("SCRIPT".utf8), Array("LOAD".utf8), script.source])
    }

    /// Returns why a SCRIPT LOAD failed, as Redis error text, or nil when it succeeded.
    private static func scriptLoadProblem(_ reply: RedisReply, expectedSHA1: String) -> String? {
        switch reply {
        case .string(let bytes):
            let loaded = String(decoding: bytes, as: UTF8.self)
            if loaded == expectedSHA1.lowercased() {
                return nil
            }
            return "ERR the script source hashes to \(loaded), not to the SHA-1 \(expectedSHA1) that the command names"
        case .error(let message):
            return redactedServerError(message)
        default:
            return "ERR unexpected reply to SCRIPT LOAD: \(describeUnexpected(reply))"
        }
    }

    private static func describeUnexpected(_ reply: RedisReply) -> String {
        switch reply {
        case .error(let message): redactedServerError(message)
        case .status: "a status reply"
        case .integer: "an integer reply"
        case .string: "a bulk string reply"
        case .null: "a nil reply"
        case .array(let items): "an array of \(items.count) replies"
        case .double: "a double reply"
        case .bool: "a boolean reply"
        }
    }
}

extension RedisCommand {
    /// The SHA-1 of a script call, or nil for other commands.
    var scriptSHA1: String? {
        if case .script(let sha1, _, _, _) = self {
            return sha1
        }
        return nil
    }
}
