import CHiredis
import Foundation
import HostAPI
import XCTest

@testable import Runtime

/// RedisConnection against a real redis-server that each test starts on a free port.
final class RedisClientTests: XCTestCase {
    private func bytes(_ text: String) -> [UInt8] {
        Array(text.utf8)
    }

    private func arguments(_ words: String...) -> [[UInt8]] {
        words.map { Array($0.utf8) }
    }

    private func connection(to server: LocalRedis, db: Int = 0, password: String? = nil,
                            commandTimeoutMs: Int = 2000) -> RedisConnection {
        RedisConnection(settings: RedisSettings(port: server.port, db: db, password: password,
                                                commandTimeoutMs: commandTimeoutMs))
    }

    /// Calls `body`, which must throw a RedisError, and returns that error.
    private func redisError(_ body: () throws -> Void,
                            file: StaticString = #filePath, line: UInt = #line) -> RedisError? {
        do {
            try body()
            XCTFail("expected a RedisError", file: file, line: line)
        } catch let error as RedisError {
            return error
        } catch {
            XCTFail("expected a RedisError, got \(error)", file: file, line: line)
        }
        return nil
    }

    /// Returns the `calls` count of one command in INFO commandstats, or 0 before its first call.
    private func commandCalls(_ name: String, on redis: RedisConnection) throws -> Int {
        guard case .string(let info) = try redis.command(arguments("INFO", "commandstats")) else {
            XCTFail("INFO commandstats did not return a bulk string")
            return -1
        }
        let prefix = "cmdstat_\(name):calls="
        for line in String(decoding: info, as: UTF8.self).split(whereSeparator: \.isNewline)
        where line.hasPrefix(prefix) {
            let count = line.dropFirst(prefix.count).prefix { $0.isNumber }
            return Int(count) ?? -1
        }
        return 0
    }

    // MARK: - Connecting

    func testConnectAndPing() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        try redis.connect()

        XCTAssertTrue(redis.isConnected)
        XCTAssertEqual(try redis.command(arguments("PING")), .status("PONG"))
    }

    func testCommandConnectsOnDemand() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        XCTAssertEqual(try redis.command(arguments("PING")), .status("PONG"))
        XCTAssertTrue(redis.isConnected)
    }

    func testUnixSocketConnection() throws {
        let server = try LocalRedis(listenOnUnixSocket: true)
        let path = try XCTUnwrap(server.unixSocketPath)
        let redis = RedisConnection(settings: RedisSettings(unixSocketPath: path))

        XCTAssertEqual(try redis.command(arguments("PING")), .status("PONG"))
        XCTAssertEqual(redis.endpoint, "unix:\(path)")
    }

    func testSelectIsolatesDatabases() throws {
        let server = try LocalRedis()
        let first = connection(to: server, db: 1)
        let second = connection(to: server, db: 2)

        XCTAssertEqual(try first.command(arguments("SET", "shared-key", "one")), .status("OK"))

        XCTAssertEqual(try second.command(arguments("GET", "shared-key")), .null)
        XCTAssertEqual(try first.command(arguments("GET", "shared-key")), .string(bytes("one")))
    }

    func testSelectOfMissingDatabaseFails() throws {
        let server = try LocalRedis(arguments: ["--databases", "4"])
        let redis = connection(to: server, db: 9)

        let error = redisError { try redis.connect() }

        XCTAssertEqual(error?.kind, .connect)
        XCTAssertTrue(error?.message.contains("SELECT 9") ?? false, error?.message ?? "")
        XCTAssertFalse(redis.isConnected)
    }

    func testAuthWithRightPassword() throws {
        let server = try LocalRedis(arguments: ["--requirepass", "right-secret-41"])
        let redis = connection(to: server, password: "right-secret-41")

        XCTAssertEqual(try redis.command(arguments("PING")), .status("PONG"))
    }

    func testAuthWithWrongPassword() throws {
        let server = try LocalRedis(arguments: ["--requirepass", "right-secret-41"])
        let redis = connection(to: server, password: "wrong-secret-97")

        let error = redisError { try redis.connect() }

        XCTAssertEqual(error?.kind, .auth)
        XCTAssertTrue(error?.message.contains("127.0.0.1:\(server.port)") ?? false, error?.message ?? "")
        XCTAssertTrue(error?.message.contains("rejected AUTH") ?? false, error?.message ?? "")
        XCTAssertFalse(error?.message.contains("wrong-secret-97") ?? true)
        XCTAssertFalse(String(describing: error).contains("wrong-secret-97"))
        XCTAssertFalse(redis.isConnected)
    }

    func testMissingPasswordIsAnAuthError() throws {
        let server = try LocalRedis(arguments: ["--requirepass", "right-secret-41"])
        let redis = connection(to: server)

        let error = redisError { try redis.connect() }

        XCTAssertEqual(error?.kind, .auth)
        XCTAssertTrue(error?.message.contains("NOAUTH") ?? false, error?.message ?? "")
    }

    func testAuthFailureIsNotRetried() throws {
        let server = try LocalRedis(arguments: ["--requirepass", "right-secret-41"])
        let redis = connection(to: server, password: "wrong-secret-97")
        let started = ContinuousClock.now

        let error = redisError { try redis.ensureConnected(deadline: .now + .seconds(5)) }

        XCTAssertEqual(error?.kind, .auth)
        XCTAssertLessThan(ContinuousClock.now - started, .seconds(1))
    }

    func testClosedPortFailsFast() throws {
        let port = try LocalRedis.freePort()
        let redis = RedisConnection(settings: RedisSettings(port: port))
        let started = ContinuousClock.now

        let error = redisError { try redis.connect() }

        XCTAssertLessThan(ContinuousClock.now - started, .seconds(1))
        XCTAssertEqual(error?.kind, .connect)
        XCTAssertEqual(error?.message, "Redis at 127.0.0.1:\(port) is unreachable: Connection refused")
    }

    func testInvalidPortIsRejected() {
        let redis = RedisConnection(settings: RedisSettings(port: 70000))

        let error = redisError { try redis.connect() }

        XCTAssertEqual(error?.kind, .connect)
        XCTAssertTrue(error?.message.contains("70000") ?? false, error?.message ?? "")
    }

    // MARK: - Pipelines

    func testPipelineOfThousandBinarySetGet() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let count = 1000
        // Keys and values contain NUL bytes and invalid UTF-8 (0xff, and 0xc3 without its
        // continuation byte).
        let keys = (0..<count).map { Array("key:\($0)".utf8) + [0x00, 0xff] }
        let values = (0..<count).map { [0x00, 0xc3, 0x28, 0xff] + Array(String($0).utf8) + [0x00] }

        var commands: [RedisCommand] = []
        for (key, value) in zip(keys, values) {
            commands.append(.arguments([bytes("SET"), key, value]))
        }
        for key in keys {
            commands.append(.arguments([bytes("GET"), key]))
        }
        let replies = try redis.pipeline(commands)

        XCTAssertEqual(replies.count, 2 * count)
        XCTAssertEqual(replies[0..<count].filter { $0 == .status("OK") }.count, count)
        for index in 0..<count {
            XCTAssertEqual(replies[count + index], .string(values[index]), "GET of key \(index)")
        }
    }

    func testReplyErrorDoesNotBreakPipeline() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        let replies = try redis.pipeline([
            .arguments(arguments("SET", "text", "not a number")),
            .arguments(arguments("INCR", "text")),
            .arguments(arguments("INCR", "counter")),
            .arguments(arguments("GET", "text")),
        ])

        XCTAssertEqual(replies.count, 4)
        XCTAssertEqual(replies[0], .status("OK"))
        XCTAssertTrue(replies[1].errorMessage?.hasPrefix("ERR") ?? false, "\(replies[1])")
        XCTAssertEqual(replies[2], .integer(1))
        XCTAssertEqual(replies[3], .string(bytes("not a number")))
        XCTAssertTrue(redis.isConnected)
    }

    func testEmptyCommandIsRejectedBeforeSending() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        let error = redisError {
            _ = try redis.pipeline([.arguments(arguments("SET", "never", "sent")), .arguments([])])
        }

        XCTAssertEqual(error?.kind, .invalidCommand)
        XCTAssertEqual(try redis.command(arguments("EXISTS", "never")), .integer(0))
    }

    func testEmptyPipelineSendsNothing() throws {
        let redis = RedisConnection(settings: RedisSettings(port: try LocalRedis.freePort()))

        XCTAssertEqual(try redis.pipeline([]), [])
        XCTAssertEqual(try redis.transaction([]), [])
        XCTAssertFalse(redis.isConnected)
    }

    // MARK: - Scripts

    private let incrementScript = RedisScript(
        name: "increment", source: Array("return redis.call('INCRBY', KEYS[1], ARGV[1])".utf8))

    func testEvalshaLoadsScriptOnNoscript() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        let replies = try redis.pipeline([
            .arguments(arguments("SET", "counter", "1")),
            .script(incrementScript, keys: [bytes("counter")], arguments: [bytes("10")]),
            .arguments(arguments("SET", "counter", "100")),
        ])

        // The retried EVALSHA runs after the rest of the pipeline, so it increments 100.
        XCTAssertEqual(replies, [.status("OK"), .integer(110), .status("OK")])
        XCTAssertEqual(try redis.command(arguments("GET", "counter")), .string(bytes("110")))
    }

    func testEvalshaOfLoadedScriptKeepsOrder() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        try redis.ensureScriptsLoaded([incrementScript])

        let replies = try redis.pipeline([
            .arguments(arguments("SET", "counter", "1")),
            .script(incrementScript, keys: [bytes("counter")], arguments: [bytes("10")]),
            .arguments(arguments("SET", "counter", "100")),
        ])

        XCTAssertEqual(replies, [.status("OK"), .integer(11), .status("OK")])
    }

    func testScriptCompileErrorIsReturnedPerCommand() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let broken = RedisScript(name: "broken", source: Array("return +".utf8))

        let replies = try redis.pipeline([
            .script(broken, keys: [], arguments: []),
            .arguments(arguments("PING")),
        ])

        XCTAssertTrue(replies[0].errorMessage?.contains("Error compiling script") ?? false, "\(replies[0])")
        XCTAssertEqual(replies[1], .status("PONG"))
    }

    func testEnsureScriptsLoadedRejectsCompileError() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let broken = RedisScript(name: "broken", source: Array("return +".utf8))

        let error = redisError { try redis.ensureScriptsLoaded([broken]) }

        XCTAssertEqual(error?.kind, .reply)
        XCTAssertTrue(error?.message.contains(broken.sha1) ?? false, error?.message ?? "")
        XCTAssertTrue(redis.isConnected)
    }

    func testEnsureScriptsLoadedIsCachedPerConnection() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        try redis.ensureScriptsLoaded([incrementScript])
        try redis.ensureScriptsLoaded([incrementScript])
        try redis.ensureScriptsLoaded([(sha1: incrementScript.sha1, source: incrementScript.source)])

        XCTAssertEqual(try commandCalls("script|exists", on: redis), 1)
        XCTAssertEqual(try commandCalls("script|load", on: redis), 1)
        XCTAssertEqual(try redis.command([bytes("SCRIPT"), bytes("EXISTS"), bytes(incrementScript.sha1)]),
                       .array([.integer(1)]))
    }

    // MARK: - Transactions

    func testTransactionWithLoadedScript() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        try redis.ensureScriptsLoaded([incrementScript])

        let replies = try redis.transaction([
            .script(incrementScript, keys: [bytes("total")], arguments: [bytes("5")]),
            .arguments(arguments("GET", "total")),
            .arguments(arguments("SET", "done", "yes")),
        ])

        XCTAssertEqual(replies, [.integer(5), .string(bytes("5")), .status("OK")])
        XCTAssertEqual(try commandCalls("script|exists", on: redis), 1)
    }

    func testTransactionLoadsMissingScriptFirst() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        let replies = try redis.transaction([
            .script(incrementScript, keys: [bytes("total")], arguments: [bytes("2")]),
        ])

        XCTAssertEqual(replies, [.integer(2)])
    }

    func testTransactionAfterScriptFlushRecovers() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        let call = RedisCommand.script(incrementScript, keys: [bytes("total")], arguments: [bytes("1")])
        _ = try redis.transaction([call])
        XCTAssertEqual(try redis.command(arguments("SCRIPT", "FLUSH")), .status("OK"))

        let afterFlush = try redis.transaction([call])
        let reloaded = try redis.transaction([call])

        XCTAssertTrue(afterFlush[0].errorMessage?.hasPrefix("NOSCRIPT") ?? false, "\(afterFlush)")
        XCTAssertEqual(reloaded, [.integer(2)])
    }

    func testTransactionAbortNamesCommand() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        let error = redisError {
            _ = try redis.transaction([
                .arguments(arguments("SET", "first", "secret-value-1")),
                .arguments(arguments("SET", "lonely-key")),
                .arguments(arguments("INCR", "third")),
            ])
        }

        XCTAssertEqual(error?.kind, .transactionAborted)
        XCTAssertEqual(error?.command, "SET lonely-key")
        XCTAssertTrue(error?.message.contains("SET lonely-key (command 2 of 3)") ?? false, error?.message ?? "")
        XCTAssertTrue(error?.message.contains("wrong number of arguments") ?? false, error?.message ?? "")
        XCTAssertFalse(error?.message.contains("secret-value-1") ?? true)
        XCTAssertEqual(try redis.command(arguments("EXISTS", "first", "third")), .integer(0))
        XCTAssertTrue(redis.isConnected)
    }

    func testTransactionAbortHidesUnknownCommandArguments() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        let error = redisError {
            _ = try redis.transaction([.arguments(arguments("NOSUCHCOMMAND", "some-key", "secret-value-2"))])
        }

        XCTAssertEqual(error?.kind, .transactionAborted)
        XCTAssertTrue(error?.message.contains("unknown command") ?? false, error?.message ?? "")
        XCTAssertFalse(error?.message.contains("secret-value-2") ?? true, error?.message ?? "")
    }

    func testTransactionReturnsRuntimeErrorsInPlace() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        let replies = try redis.transaction([
            .arguments(arguments("SET", "text", "abc")),
            .arguments(arguments("LPUSH", "text", "item")),
            .arguments(arguments("SET", "after", "1")),
        ])

        XCTAssertEqual(replies[0], .status("OK"))
        XCTAssertTrue(replies[1].errorMessage?.hasPrefix("WRONGTYPE") ?? false, "\(replies[1])")
        XCTAssertEqual(replies[2], .status("OK"))
    }

    // MARK: - Failures and reconnecting

    func testReconnectAfterServerRestart() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)
        XCTAssertEqual(try redis.command(arguments("SET", "before", "1")), .status("OK"))

        server.kill()
        let lost = redisError { _ = try redis.command(arguments("GET", "before")) }
        let connectFailure = redisError { _ = try redis.command(arguments("PING")) }
        let stillDown = redisError { try redis.ensureConnected(deadline: .now + .milliseconds(300)) }

        XCTAssertEqual(lost?.kind, .io)
        XCTAssertEqual(lost?.command, "GET before")
        XCTAssertEqual(connectFailure?.kind, .connect)
        XCTAssertEqual(stillDown?.kind, .connect)
        XCTAssertFalse(redis.isConnected)

        try server.start()
        try redis.ensureConnected(deadline: .now + .seconds(5))

        XCTAssertEqual(try redis.command(arguments("PING")), .status("PONG"))
    }

    func testEnsureConnectedWithWallClockDeadline() throws {
        let server = try LocalRedis()
        let redis = connection(to: server)

        try redis.ensureConnected(deadline: Date().timeIntervalSince1970 + 1)

        XCTAssertTrue(redis.isConnected)
    }

    func testCommandTimeout() throws {
        let server = try LocalRedis()
        let redis = connection(to: server, commandTimeoutMs: 200)
        let started = ContinuousClock.now

        // BLPOP blocks for 2 s on an empty list, without blocking the whole server as DEBUG
        // SLEEP would.
        let error = redisError { _ = try redis.command(arguments("BLPOP", "empty-list", "2")) }

        XCTAssertLessThan(ContinuousClock.now - started, .milliseconds(1500))
        XCTAssertEqual(error?.kind, .timeout)
        XCTAssertEqual(error?.message, "Redis at 127.0.0.1:\(server.port) timed out after 200 ms on BLPOP empty-list")
        XCTAssertFalse(redis.isConnected)
        XCTAssertEqual(try redis.command(arguments("PING")), .status("PONG"))
    }

    // MARK: - Values without a server

    func testQueryReplyConversion() {
        let reply = RedisReply.array([
            .status("OK"), .error("ERR bad"), .integer(-7), .string([0, 0xff]), .null,
            .double(1.5), .bool(true), .array([]),
        ])

        XCTAssertEqual(reply.queryReply, .array([
            .bytes(bytes("OK")), .error("ERR bad"), .integer(-7), .bytes([0, 0xff]), .null,
            .number(1.5), .boolean(true), .array([]),
        ]))
    }

    func testEncodingMatchesHiredisFormat() {
        let script = RedisCommand.script(sha1: String(repeating: "ab", count: 20), source: bytes("return 1"),
                                         keys: [bytes("k1"), bytes("k2")], arguments: [[], [0, 13, 10, 255]])
        let commands: [RedisCommand] = [
            .arguments([bytes("PING")]),
            .arguments([bytes("SET"), bytes("key"), []]),
            .arguments([bytes("HSET"), bytes("h"), Array(repeating: 7, count: 1000), bytes("-12")]),
            script,
        ]
        for command in commands {
            var encoded: [UInt8] = []
            command.encode(into: &encoded)
            XCTAssertEqual(encoded, hiredisFormat(command.wireArguments), command.summary)
        }
    }

    func testDecimalEncodingOfExtremes() {
        for value in [Int64.min, -10, -1, 0, 9, 10, 1_764_800_060_000, Int64.max] {
            var encoded: [UInt8] = []
            RESPWriter.appendDecimal(value, to: &encoded)
            XCTAssertEqual(String(decoding: encoded, as: UTF8.self), String(value))
        }
        for value in [Int.min + 1, -100, -9, 0, 9, 10, 99, 100, Int.max] {
            XCTAssertEqual(RESPWriter.decimalDigitCount(value), String(value).utf8.count, "\(value)")
        }
    }

    /// Returns what hiredis' redisFormatCommandArgv makes of `arguments`.
    private func hiredisFormat(_ arguments: [[UInt8]]) -> [UInt8] {
        let copies = arguments.map { argument -> UnsafeMutablePointer<CChar> in
            let pointer = UnsafeMutablePointer<CChar>.allocate(capacity: max(argument.count, 1))
            argument.withUnsafeBytes { raw in
                if let base = raw.baseAddress {
                    UnsafeMutableRawPointer(pointer).copyMemory(from: base, byteCount: raw.count)
                }
            }
            return pointer
        }
        defer { copies.forEach { $0.deallocate() } }
        var values: [UnsafePointer<CChar>?] = copies.map { UnsafePointer($0) }
        let lengths = arguments.map(\.count)
        var target: UnsafeMutablePointer<CChar>?
        let length = redisFormatCommandArgv(&target, Int32(arguments.count), &values, lengths)
        guard length >= 0, let target else { return [] }
        defer { free(target) }
        return Array(UnsafeRawBufferPointer(start: target, count: Int(length)))
    }

    func testCommandSummaryOmitsValues() {
        XCTAssertEqual(RedisCommand.arguments(arguments("set", "user:1", "value")).summary, "SET user:1")
        XCTAssertEqual(RedisCommand.arguments(arguments("AUTH", "user", "password")).summary, "AUTH")
        XCTAssertEqual(RedisCommand.arguments(arguments("EVAL", "return 1", "1", "k", "v")).summary, "EVAL k")
        XCTAssertEqual(RedisCommand.arguments(arguments("EVAL", "return 1", "0", "v")).summary, "EVAL")
        XCTAssertEqual(RedisCommand.script(incrementScript, keys: [bytes("k")], arguments: [bytes("v")]).summary,
                       "EVALSHA \(incrementScript.sha1) k")
        let longKey = String(repeating: "k", count: 100)
        XCTAssertEqual(RedisCommand.arguments(arguments("GET", longKey)).summary,
                       "GET \(String(repeating: "k", count: 64))...")
    }

    func testSettingsDescriptionHidesPassword() {
        let settings = RedisSettings(password: "settings-secret-3")

        XCTAssertFalse(settings.description.contains("settings-secret-3"))
        XCTAssertFalse(String(reflecting: settings).contains("settings-secret-3"))
        var dumped = ""
        dump(settings, to: &dumped)
        XCTAssertFalse(dumped.contains("settings-secret-3"), dumped)
    }
}
