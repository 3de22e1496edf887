import Foundation
import XCTest

@testable import HostAPI

/// A private redis-server listening only on a Unix socket in a temporary folder, with
/// persistence off. Commands go through one `redis-cli -2 --json` process each, whose one-line
/// JSON output maps onto `QueryReply`.
final class RedisTestServer {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    let socketPath: String
    private let folder: URL
    private let cli: URL
    private let server: Process
    private var stopped = false

    /// Starts redis-server and waits, for at most `timeout` seconds, until it replies to PING.
    init(timeout: TimeInterval = 5) throws {
        let serverURL = try Self.executable("redis-server")
        cli = try Self.executable("redis-cli")

        // Unix socket paths are limited to about 100 bytes, so the folder name stays short.
        folder = URL(fileURLWithPath: NSTemporaryDirectory())
            .appendingPathComponent("redis-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        socketPath = folder.appendingPathComponent("redis.sock").path
        let logPath = folder.appendingPathComponent("redis.log").path

        server = Process()
        server.executableURL = serverURL
        server.arguments = [
            "--port", "0", "--unixsocket", socketPath, "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", folder.path, "--logfile", logPath,
        ]
        server.standardInput = FileHandle.nullDevice
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        try server.run()

        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if !server.isRunning {
                let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
                try? FileManager.default.removeItem(at: folder)
                throw Failure(description: "redis-server exited with status \(server.terminationStatus) before it served \(socketPath). Log:\n\(log)")
            }
            if FileManager.default.fileExists(atPath: socketPath), (try? run(["PING"])) == .bytes(Array("PONG".utf8)) {
                break
            }
            if Date() > deadline {
                stop()
                throw Failure(description: "redis-server timed out: no reply to PING on \(socketPath) within \(timeout) s")
            }
            Thread.sleep(forTimeInterval: 0.01)
        }
    }

    deinit {
        stop()
    }

    /// Terminates the server, waits for it to exit and removes its folder.
    func stop() {
        guard !stopped else { return }
        stopped = true
        if server.isRunning {
            server.terminate()
        }
        server.waitUntilExit()
        try? FileManager.default.removeItem(at: folder)
    }

    /// Finds `name` on PATH or in /usr/bin and /usr/local/bin.
    private static func executable(_ name: String) throws -> URL {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let folders = path.split(separator: ":").map(String.init) + ["/usr/bin", "/usr/local/bin"]
        for folder in folders where !folder.isEmpty {
            let candidate = folder + "/" + name
            if FileManager.default.isExecutableFile(atPath: candidate) {
                return URL(fileURLWithPath: candidate)
            }
        }
        throw Failure(description: "\(name) is not installed (not found on PATH, in /usr/bin or in /usr/local/bin). Run scripts/install-deps.sh, which installs the redis-server package.")
    }

    /// Runs one command and returns its reply. A Redis error reply comes back as `.error`, and a
    /// failure of redis-cli itself (for example a refused connection) is thrown.
    func run(_ arguments: [String]) throws -> QueryReply {
        let line = try runCLI(["-2", "--json"] + arguments)
        return try Self.reply(fromOutput: line, command: arguments.first ?? "")
    }

    /// Returns a section of INFO as text. redis-cli prints INFO unformatted even with --json.
    func info(_ section: String) throws -> String {
        try runCLI(["INFO", section])
    }

    /// Runs redis-cli with `options` and returns its output without the final newline.
    private func runCLI(_ options: [String]) throws -> String {
        let process = Process()
        process.executableURL = cli
        process.arguments = ["-s", socketPath] + options
        let output = Pipe()
        let errors = Pipe()
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = output
        process.standardError = errors
        // The waitUntilExit of swift-corelibs-foundation runs the run loop in 50 ms steps, which
        // made each command take about that long, so the termination handler signals the exit.
        let exited = DispatchSemaphore(value: 0)
        process.terminationHandler = { _ in exited.signal() }
        try process.run()
        let outputData = output.fileHandleForReading.readDataToEndOfFile()
        let errorData = errors.fileHandleForReading.readDataToEndOfFile()
        exited.wait()

        guard process.terminationStatus == 0 else {
            let message = String(decoding: errorData, as: UTF8.self)
            throw Failure(description: "redis-cli \(options.joined(separator: " ").prefix(80)) exited with status \(process.terminationStatus): \(message)")
        }
        return String(decoding: outputData, as: UTF8.self).trimmingCharacters(in: .newlines)
    }

    /// Runs one command whose arguments are bytes. They must be UTF-8 without NUL bytes,
    /// because they pass through the argument vector of redis-cli.
    func run(bytes arguments: [[UInt8]]) throws -> QueryReply {
        var words: [String] = []
        for argument in arguments {
            guard !argument.contains(0), let word = String(validating: argument, as: UTF8.self) else {
                throw Failure(description: "argument \(argument) is not UTF-8 without NUL bytes, so redis-cli cannot pass it")
            }
            words.append(word)
        }
        return try run(words)
    }

    /// Parses the output of `redis-cli --json` for RESP2: an error is printed as `error:"..."`,
    /// nil as `null`, an integer as a JSON number, a bulk or status string as a JSON string and a
    /// multi-bulk reply as a JSON array.
    private static func reply(fromOutput line: String, command: String) throws -> QueryReply {
        if line.hasPrefix("error:") {
            let quoted = Data(line.dropFirst("error:".count).utf8)
            let message = (try? JSONSerialization.jsonObject(with: quoted, options: .fragmentsAllowed)) as? String
            return .error(message ?? String(line.dropFirst("error:".count)))
        }
        let value: Any
        do {
            value = try JSONSerialization.jsonObject(with: Data(line.utf8), options: .fragmentsAllowed)
        } catch {
            throw Failure(description: "invalid JSON in the redis-cli output of \(command): \(line)")
        }
        return try reply(fromJSON: value, command: command)
    }

    private static func reply(fromJSON value: Any, command: String) throws -> QueryReply {
        switch value {
        case is NSNull:
            return .null
        case let text as String:
            return .bytes(Array(text.utf8))
        case let items as [Any]:
            return .array(try items.map { try reply(fromJSON: $0, command: command) })
        case let number as Int:
            return .integer(Int64(number))
        case let number as NSNumber:
            return .integer(number.int64Value)
        default:
            throw Failure(description: "unexpected value \(value) in the redis-cli output of \(command)")
        }
    }

    /// Loads a script with SCRIPT LOAD and returns the SHA-1 that Redis computed for it.
    func loadScript(_ source: [UInt8]) throws -> String {
        let reply = try run(bytes: [Array("SCRIPT".utf8), Array("LOAD".utf8), source])
        guard case .bytes(let sha) = reply else {
            throw Failure(description: "SCRIPT LOAD returned \(reply), expected a SHA-1")
        }
        return String(decoding: sha, as: UTF8.self)
    }

    /// Applies one event's effects in order, as the live runtime does, and returns the reply of
    /// each Redis command and script call. Scripts run with EVALSHA, and a NOSCRIPT error loads the
    /// source from `scripts` (keyed by script name) and retries once. Effects for ClickHouse,
    /// keyed state, logs and counters are skipped. A Redis error reply is thrown.
    @discardableResult
    func apply(_ effects: [Effect], scripts: [String: RedisScript]) throws -> [QueryReply] {
        var replies: [QueryReply] = []
        for effect in effects {
            switch effect {
            case .redis(let arguments):
                replies.append(try checked(run(bytes: arguments), arguments.first.map { text($0) } ?? ""))
            case .redisScript(let name, let sha1, let keys, let arguments):
                let call = [Array("EVALSHA".utf8), Array(sha1.utf8), Array(String(keys.count).utf8)] + keys + arguments
                var reply = try run(bytes: call)
                if case .error(let message) = reply, message.hasPrefix("NOSCRIPT") {
                    guard let script = scripts[name] else {
                        throw Failure(description: "script '\(name)' is not loaded in Redis and its source is unknown")
                    }
                    _ = try loadScript(script.source)
                    reply = try run(bytes: call)
                }
                replies.append(try checked(reply, "EVALSHA of script '\(name)'"))
            case .insert, .clickhouseStatement, .state, .log, .count:
                continue
            }
        }
        return replies
    }

    private func checked(_ reply: QueryReply, _ command: String) throws -> QueryReply {
        if case .error(let message) = reply {
            throw Failure(description: "\(command) failed in Redis: \(message)")
        }
        return reply
    }
}

/// The Redis side of projection queries, served by a `RedisTestServer`. It records the command
/// names, and ClickHouse reads return an error.
final class RedisQueryBackend: QueryBackend {
    private let server: RedisTestServer
    private(set) var commands: [String] = []

    init(server: RedisTestServer) {
        self.server = server
    }

    func redis(_ arguments: [[UInt8]]) -> QueryReply {
        commands.append(arguments.first.map { text($0) } ?? "")
        do {
            return try server.run(bytes: arguments)
        } catch {
            return .error("\(error)")
        }
    }

    func clickhouse(_ sql: String) -> QueryReply {
        .error("no ClickHouse in this test")
    }
}
