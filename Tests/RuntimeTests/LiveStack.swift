import CRdKafka
import Foundation
import Glibc
@testable import Runtime
import XCTest

/// The services that `projection-runtime run` needs, started once for a test class on
/// 127.0.0.1 at free ports: redis-server, clickhouse-server and the in-process dev broker.
///
/// Each test gets a `Workspace` with topics, a consumer group, a Redis database and a
/// ClickHouse database of its own, so tests that share the services share no data. A workspace
/// starts the runtime binary as a child process, as scripts/run-local.sh does.
final class LiveStack {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// Partitions of each test's bar topic and invalidation topic, as in scripts/run-local.sh.
    static let barPartitions: Int32 = 4
    static let invalidationPartitions: Int32 = 2
    /// Redis databases of the shared server. Each workspace takes the next one.
    static let redisDatabaseCount = 64

    static let kcatPath = "/usr/bin/kcat"
    static let curlPath = "/usr/bin/curl"

    let repository: URL
    let binary: URL
    let redis: LocalRedis
    let clickhouse: LocalClickHouse
    let broker: DevBroker
    private var workspaceCount = 0

    /// Starts the services. Throws XCTSkip when redis-server, clickhouse-server, kcat or curl is
    /// not installed, and fails when the runtime binary has not been built.
    init() throws {
        repository = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        binary = repository.appendingPathComponent(".build/debug/projection-runtime")
        guard FileManager.default.isExecutableFile(atPath: binary.path) else {
            throw Failure(description: "\(binary.path) is missing: run swift build first "
                + "(swift build --build-tests builds it with the tests)")
        }
        guard FileManager.default.isExecutableFile(atPath: Self.kcatPath) else {
            throw XCTSkip("kcat is not installed at \(Self.kcatPath)")
        }
        guard FileManager.default.isExecutableFile(atPath: Self.curlPath) else {
            throw XCTSkip("curl is not installed at \(Self.curlPath)")
        }
        guard LocalClickHouse.serverPath != nil else {
            throw XCTSkip("clickhouse-server is not installed")
        }

        redis = try LocalRedis(arguments: ["--databases", String(Self.redisDatabaseCount)])
        clickhouse = try LocalClickHouse(password: nil)
        do {
            broker = try DevBroker()
        } catch {
            clickhouse.stop()
            throw error
        }
    }

    /// Stops the broker, ClickHouse and Redis.
    func stop() {
        broker.stop()
        clickhouse.stop()
        redis.stop()
    }

    /// Creates the topics, databases and temporary folder of one test. `label` becomes part of
    /// the folder name.
    func makeWorkspace(label: String) throws -> Workspace {
        workspaceCount += 1
        guard workspaceCount < Self.redisDatabaseCount else {
            throw Failure(description: "more than \(Self.redisDatabaseCount - 1) workspaces in one test class: "
                + "raise LiveStack.redisDatabaseCount")
        }
        return try Workspace(stack: self, number: workspaceCount, label: label)
    }

    // MARK: - Workspace

    /// One test's share of the stack, and the runtime processes it starts.
    final class Workspace {
        let stack: LiveStack
        let folder: URL
        /// A copy of the repository's projections/ (with lib/), which the test may change.
        let projectionsFolder: URL
        let barTopic: String
        let invalidationTopic: String
        let groupId: String
        let redisDatabase: Int
        let clickhouseDatabase: String
        private var runtimes: [RuntimeProcess] = []

        fileprivate init(stack: LiveStack, number: Int, label: String) throws {
            self.stack = stack
            let safeLabel = String(label.map { $0.isLetter || $0.isNumber ? $0 : "-" })
            let unique = "\(getpid())-\(number)"
            folder = FileManager.default.temporaryDirectory
                .appendingPathComponent("live-runtime-\(unique)-\(safeLabel)")
            projectionsFolder = folder.appendingPathComponent("projections")
            barTopic = "live-\(unique)-bars"
            invalidationTopic = "live-\(unique)-invalidations"
            groupId = "live-\(unique)-group"
            redisDatabase = number
            clickhouseDatabase = "live_\(getpid())_\(number)"

            try? FileManager.default.removeItem(at: folder)
            try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
            try FileManager.default.copyItem(at: stack.repository.appendingPathComponent("projections"),
                                             to: projectionsFolder)
            try stack.broker.createTopic(.init(name: barTopic, partitions: Int(LiveStack.barPartitions)))
            try stack.broker.createTopic(.init(name: invalidationTopic,
                                               partitions: Int(LiveStack.invalidationPartitions)))
            _ = try clickhouseQuery("CREATE DATABASE IF NOT EXISTS \(clickhouseDatabase)", database: "default")
        }

        /// Stops every runtime still running and removes the folder, unless `keepFolder` is set
        /// (after a failure, so that the logs can be read).
        func close(keepFolder: Bool) {
            for runtime in runtimes {
                runtime.stop()
            }
            runtimes.removeAll()
            if keepFolder {
                print("LiveStack: the logs and projections of the failed test are in \(folder.path)")
            } else {
                try? FileManager.default.removeItem(at: folder)
            }
        }

        /// Returns the environment of a runtime in this workspace: the given ports, this
        /// workspace's topics, group and databases, and `overrides` on top. DATA_PROC_*
        /// variables of the test process are not passed on.
        func runtimeEnvironment(healthPort: Int, apiPort: Int,
                                overrides: [String: String]) -> [String: String] {
            var environment = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("DATA_PROC_") }
            environment["DATA_PROC_KAFKA_BOOTSTRAP"] = stack.broker.bootstrap
            environment["DATA_PROC_KAFKA_GROUP_ID"] = groupId
            environment["DATA_PROC_PROJECTION_AGGREGATED_TOPIC"] = barTopic
            environment["DATA_PROC_PROJECTION_INVALIDATION_TOPIC"] = invalidationTopic
            environment["DATA_PROC_REDIS_PORT"] = String(stack.redis.port)
            environment["DATA_PROC_REDIS_DB"] = String(redisDatabase)
            environment["DATA_PROC_CLICKHOUSE_HTTP_PORT"] = String(stack.clickhouse.httpPort)
            environment["DATA_PROC_CLICKHOUSE_DATABASE"] = clickhouseDatabase
            environment["DATA_PROC_PROJECTION_PORT"] = String(healthPort)
            environment["DATA_PROC_INTERNAL_API_PORT"] = String(apiPort)
            environment["DATA_PROC_PROJECTIONS_DIR"] = projectionsFolder.path
            environment["DATA_PROC_HTTP_BIND"] = "127.0.0.1"
            environment["DATA_PROC_SHUTDOWN_TIMEOUT_MS"] = "10000"
            // One group member per process: the mock cluster holds a rebalance until the
            // session timeout runs out, so a second worker joining late stalls the start.
            environment["DATA_PROC_WORKERS"] = "1"
            for (name, value) in overrides {
                environment[name] = value
            }
            return environment
        }

        /// Starts `projection-runtime run` and, when `waitUntilReady` is set, waits until it is
        /// ready and has joined its group. `environment` overrides single variables of
        /// `runtimeEnvironment`.
        func startRuntime(environment overrides: [String: String] = [:],
                          waitUntilReady: Bool = true) throws -> RuntimeProcess {
            let ports = try LocalClickHouse.freePorts(count: 2)
            let environment = runtimeEnvironment(healthPort: ports[0], apiPort: ports[1], overrides: overrides)
            let logFile = folder.appendingPathComponent("runtime-\(runtimes.count + 1).log")
            let runtime = try RuntimeProcess(binary: stack.binary, environment: environment,
                                             healthPort: ports[0], apiPort: ports[1], logFile: logFile)
            runtimes.append(runtime)
            if waitUntilReady {
                try runtime.waitUntilReady(timeoutSeconds: 30)
            }
            return runtime
        }

        /// Publishes `lines` (`key|value`) with kcat, as scripts/run-local.sh does, and returns
        /// once kcat has delivered them.
        func publish(lines: [String], to topic: String) throws {
            let file = folder.appendingPathComponent("publish-\(UUID().uuidString).kcat")
            try Data((lines.joined(separator: "\n") + "\n").utf8).write(to: file)
            defer { try? FileManager.default.removeItem(at: file) }
            try publish(file: file, to: topic)
        }

        /// Publishes a file of `key|value` lines with kcat.
        func publish(file: URL, to topic: String) throws {
            let result = try LiveStack.runTool(
                LiveStack.kcatPath,
                ["-b", stack.broker.bootstrap, "-t", topic, "-P", "-K|", "-l", file.path],
                timeoutSeconds: 20)
            guard result.status == 0 else {
                throw Failure(description: "kcat exited with status \(result.status) publishing "
                    + "\(file.lastPathComponent) to \(topic): \(result.standardError)")
            }
        }

        /// Runs `sql` on the shared ClickHouse over HTTP and returns the response body. 64-bit
        /// integers come back as JSON numbers, not strings.
        func clickhouseQuery(_ sql: String, database: String? = nil) throws -> String {
            let url = "http://127.0.0.1:\(stack.clickhouse.httpPort)/?database=\(database ?? clickhouseDatabase)"
                + "&output_format_json_quote_64bit_integers=0"
            let reply = try LiveStack.request("POST", url, body: Data(sql.utf8))
            guard reply.status == 200 else {
                throw Failure(description: "ClickHouse returned HTTP \(reply.status) for \(sql): \(reply.text)")
            }
            return reply.text
        }

        /// Returns the end offset (high watermark) of each partition of `topic`, read from the
        /// broker with ListOffsets.
        func endOffsets(topic: String, partitions: Int32) throws -> [Int32: Int64] {
            let configuration = try makeKafkaConfiguration([
                ("bootstrap.servers", stack.broker.bootstrap), ("log_level", "4"),
            ])
            rd_kafka_conf_set_log_cb(configuration, kafkaLogCallback)
            let handle = try makeKafkaHandle(RD_KAFKA_PRODUCER, configuration)
            defer { rd_kafka_destroy(handle) }

            var offsets: [Int32: Int64] = [:]
            for partition in 0..<partitions {
                var low: Int64 = 0
                var high: Int64 = 0
                let code = rd_kafka_query_watermark_offsets(handle, topic, partition, &low, &high, 10_000)
                guard code == RD_KAFKA_RESP_ERR_NO_ERROR else {
                    throw Failure(description: "reading the end offset of \(topic)/\(partition) failed: "
                        + errorText(code))
                }
                offsets[partition] = high
            }
            return offsets
        }

        /// Returns a consumer of this workspace's group that never subscribes, so it can read the
        /// group's committed offsets without joining the group.
        func makeOffsetReader() throws -> KafkaConsumer {
            try KafkaConsumer(settings: KafkaConsumerSettings(bootstrap: stack.broker.bootstrap, groupId: groupId))
        }

        /// Returns the offsets the runtime stored in Redis with its last applied batch, read
        /// with the same store the runtime uses.
        func redisOffsets(_ partitions: [TopicPartition]) throws -> [TopicPartition: Int64] {
            let connection = RedisConnection(settings: RedisSettings(port: stack.redis.port, db: redisDatabase))
            defer { connection.close() }
            return try RedisOffsetStore(connection: connection, namespace: groupId).storedOffsets(partitions)
        }

        /// Returns the offsets this workspace's group has committed for `partitions`.
        func committedOffsets(_ partitions: [TopicPartition]) throws -> [TopicPartition: Int64] {
            let reader = try makeOffsetReader()
            defer { reader.close() }
            return try reader.committed(partitions, timeoutMs: 10_000)
        }
    }

    // MARK: - Runtime process

    /// One `projection-runtime run` child process with its stderr (JSON log lines) in a file.
    ///
    /// NOTE: the child is stopped by `stop()` or `deinit` only. If the test process is killed,
    /// the runtime keeps running until it is sent SIGTERM.
    final class RuntimeProcess {
        let healthPort: Int
        let apiPort: Int
        let logFile: URL
        private let process = Process()
        private let exited = DispatchSemaphore(value: 0)
        private var hasExited = false

        fileprivate init(binary: URL, environment: [String: String], healthPort: Int, apiPort: Int,
                         logFile: URL) throws {
            self.healthPort = healthPort
            self.apiPort = apiPort
            self.logFile = logFile
            _ = FileManager.default.createFile(atPath: logFile.path, contents: nil)
            let log = try FileHandle(forWritingTo: logFile)
            defer { try? log.close() }

            process.executableURL = binary
            process.arguments = ["run"]
            process.environment = environment
            process.standardInput = FileHandle.nullDevice
            process.standardOutput = log
            process.standardError = log
            // Foundation's waitUntilExit polls slowly on Linux, so the handler signals the exit at once.
            let exited = self.exited
            process.terminationHandler = { _ in exited.signal() }
            try process.run()
        }

        deinit {
            stop()
        }

        var processIdentifier: Int32 { process.processIdentifier }
        var isRunning: Bool { process.isRunning }

        /// The exit status, or the signal number when `terminationReason` is
        /// `.uncaughtSignal`. Valid only after the process exited.
        var terminationStatus: Int32 { process.terminationStatus }
        var terminationReason: Process.TerminationReason { process.terminationReason }

        func send(_ signal: Int32) {
            if process.isRunning {
                kill(process.processIdentifier, signal)
            }
        }

        /// Waits for the process to exit. Returns false when it still runs after `timeoutSeconds`.
        func waitForExit(timeoutSeconds: Double) -> Bool {
            if hasExited { return true }
            guard exited.wait(timeout: .now() + timeoutSeconds) == .success else { return false }
            hasExited = true
            return true
        }

        /// Ends the process with SIGTERM, then SIGKILL if it is still running after 15 s.
        func stop() {
            guard !hasExited else { return }
            send(SIGTERM)
            if !waitForExit(timeoutSeconds: 15) {
                send(SIGKILL)
                _ = waitForExit(timeoutSeconds: 5)
            }
        }

        // MARK: HTTP

        func health(_ path: String, timeoutSeconds: Double = 5) throws -> HTTPReply {
            try LiveStack.request("GET", "http://127.0.0.1:\(healthPort)\(path)", timeoutSeconds: timeoutSeconds)
        }

        func api(_ path: String, method: String = "GET", timeoutSeconds: Double = 5) throws -> HTTPReply {
            try LiveStack.request(method, "http://127.0.0.1:\(apiPort)\(path)", timeoutSeconds: timeoutSeconds)
        }

        /// Polls until GET /ready returns 200 and GET /health reports the Kafka consumer
        /// joined, because /ready does not wait for the group and the tests need their
        /// partitions assigned.
        func waitUntilReady(timeoutSeconds: Double) throws {
            var last = "no reply"
            try waitUntil("GET /ready returns 200 and the consumer has joined", timeoutSeconds: timeoutSeconds,
                          detail: { last }) {
                guard let reply = try? self.health("/ready", timeoutSeconds: 2) else { return false }
                last = "/ready: HTTP \(reply.status): \(reply.text)"
                guard reply.status == 200, let health = try? self.health("/health", timeoutSeconds: 2) else {
                    return false
                }
                last = "/health: HTTP \(health.status): \(health.text)"
                return health.text.contains(#""state":"joined""#)
            }
        }

        /// Calls `condition` every 100 ms until it returns true. Throws after `timeoutSeconds`,
        /// or when the process exits first, with `detail()` and the end of the log.
        func waitUntil(_ description: String, timeoutSeconds: Double, detail: () -> String = { "" },
                       _ condition: () throws -> Bool) throws {
            let deadline = Date().addingTimeInterval(timeoutSeconds)
            while true {
                if try condition() { return }
                if !process.isRunning {
                    throw Failure(description: "projection-runtime exited with status \(process.terminationStatus) "
                        + "while waiting until \(description). \(detail())\nLog:\n\(logTail())")
                }
                if Date() >= deadline {
                    throw Failure(description: "timed out after \(timeoutSeconds) s waiting until \(description). "
                        + "\(detail())\nLog:\n\(logTail())")
                }
                usleep(100_000)
            }
        }

        // MARK: Log

        /// Returns the log lines written so far, each decoded as a JSON object. Lines that are
        /// not JSON objects are skipped.
        func logEntries() -> [[String: Any]] {
            let text = (try? String(contentsOf: logFile, encoding: .utf8)) ?? ""
            return text.split(separator: "\n").compactMap { line in
                (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
            }
        }

        /// Returns the log lines whose `msg` is `message`.
        func logEntries(message: String) -> [[String: Any]] {
            logEntries().filter { $0["msg"] as? String == message }
        }

        /// Returns the last `count` lines of the log, for failure messages.
        func logTail(_ count: Int = 40) -> String {
            let text = (try? String(contentsOf: logFile, encoding: .utf8)) ?? ""
            return text.split(separator: "\n").suffix(count).joined(separator: "\n")
        }
    }

    // MARK: - HTTP and tools

    /// An HTTP response: status, headers with lower-case names, and body.
    struct HTTPReply {
        var status: Int
        var headers: [String: String]
        var body: Data

        var text: String { String(decoding: body, as: UTF8.self) }

        func decode<Value: Decodable>(_ type: Value.Type) throws -> Value {
            let decoder = JSONDecoder()
            decoder.keyDecodingStrategy = .convertFromSnakeCase
            do {
                return try decoder.decode(type, from: body)
            } catch {
                throw Failure(description: "the body of HTTP \(status) is not a \(type): \(error)\nbody: \(text)")
            }
        }

        /// The body as a JSON object, or nil when it is something else.
        var jsonObject: [String: Any]? {
            (try? JSONSerialization.jsonObject(with: body)) as? [String: Any]
        }
    }

    /// Sends one request with curl. Throws when curl gets no HTTP response (connection
    /// refused, timeout).
    static func request(_ method: String, _ url: String, body: Data? = nil,
                        timeoutSeconds: Double = 5) throws -> HTTPReply {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("live-curl-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let headerFile = folder.appendingPathComponent("headers")
        let bodyFile = folder.appendingPathComponent("body")

        var arguments = ["-sS", "--max-time", String(timeoutSeconds), "-X", method,
                         "-D", headerFile.path, "-o", bodyFile.path, "-w", "%{http_code}"]
        if let body {
            let requestFile = folder.appendingPathComponent("request")
            try body.write(to: requestFile)
            arguments += ["--data-binary", "@\(requestFile.path)"]
        }
        arguments.append(url)

        let result = try runTool(curlPath, arguments, timeoutSeconds: timeoutSeconds + 5)
        guard result.status == 0, let status = Int(String(decoding: result.standardOutput, as: UTF8.self)) else {
            throw Failure(description: "curl \(method) \(url) failed with status \(result.status): "
                + result.standardError)
        }
        let headerText = (try? String(contentsOf: headerFile, encoding: .utf8)) ?? ""
        var headers: [String: String] = [:]
        for line in headerText.split(separator: "\r\n").dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].lowercased()
            headers[name] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        let responseBody = (try? Data(contentsOf: bodyFile)) ?? Data()
        return HTTPReply(status: status, headers: headers, body: responseBody)
    }

    struct ToolResult {
        var status: Int32
        var standardOutput: Data
        var standardError: String
    }

    /// Runs a program to completion. Its output goes through files, so a large output cannot
    /// fill a pipe and block it. Throws when it runs longer than `timeoutSeconds`, after
    /// killing it.
    static func runTool(_ path: String, _ arguments: [String], timeoutSeconds: Double) throws -> ToolResult {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("live-tool-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let outputFile = folder.appendingPathComponent("stdout")
        let errorFile = folder.appendingPathComponent("stderr")
        _ = FileManager.default.createFile(atPath: outputFile.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errorFile.path, contents: nil)
        let output = try FileHandle(forWritingTo: outputFile)
        let errors = try FileHandle(forWritingTo: errorFile)

        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = output
        process.standardError = errors
        let exited = DispatchSemaphore(value: 0)
        process.terminationHandler = { _ in exited.signal() }
        try process.run()
        try? output.close()
        try? errors.close()

        guard exited.wait(timeout: .now() + timeoutSeconds) == .success else {
            kill(process.processIdentifier, SIGKILL)
            _ = exited.wait(timeout: .now() + 5)
            let command = ([path] + arguments).joined(separator: " ")
            throw Failure(description: "\(command) timed out after \(timeoutSeconds) s")
        }
        return ToolResult(status: process.terminationStatus,
                          standardOutput: (try? Data(contentsOf: outputFile)) ?? Data(),
                          standardError: (try? String(contentsOf: errorFile, encoding: .utf8)) ?? "")
    }
}

// MARK: - Runtimes with command-line options

extension LiveStack.Workspace {
    /// Starts `projection-runtime run` followed by `options`, such as `["--config", path]`, and
    /// otherwise behaves as `startRuntime(environment:waitUntilReady:)`.
    ///
    /// `RuntimeProcess` always runs the binary with `run` alone, so this writes a shell script
    /// into the workspace folder that appends `options` and replaces itself with the runtime
    /// (`exec`). The process id stays the runtime's, so signals sent to it reach the runtime.
    func startRuntime(options: [String], environment overrides: [String: String] = [:],
                      waitUntilReady: Bool = true) throws -> LiveStack.RuntimeProcess {
        let number = runtimes.count + 1
        let launcher = folder.appendingPathComponent("runtime-\(number)-launcher.sh")
        let quoted = ([stack.binary.path] + options).map { "'" + $0.replacingOccurrences(of: "'", with: #"'\''"#) + "'" }
        let script = "#!/bin/sh\nexec \(quoted[0]) \"$@\" \(quoted.dropFirst().joined(separator: " "))\n"
        try Data(script.utf8).write(to: launcher)
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: launcher.path)

        let ports = try LocalClickHouse.freePorts(count: 2)
        let environment = runtimeEnvironment(healthPort: ports[0], apiPort: ports[1], overrides: overrides)
        let logFile = folder.appendingPathComponent("runtime-\(number).log")
        let runtime = try LiveStack.RuntimeProcess(binary: launcher, environment: environment,
                                                   healthPort: ports[0], apiPort: ports[1], logFile: logFile)
        runtimes.append(runtime)
        if waitUntilReady {
            try runtime.waitUntilReady(timeoutSeconds: 30)
        }
        return runtime
    }
}

/// The `LiveStack` that the tests of one class share: started on first use, stopped by the
/// class's `tearDown`. A failed start is kept, so that later tests fail at once instead of
/// starting the services again.
final class SharedLiveStack: @unchecked Sendable {
    private var stack: LiveStack?
    private var startError: (any Error)?

    /// Returns the running stack, starting it on the first call.
    func get() throws -> LiveStack {
        if let stack { return stack }
        if let startError { throw startError }
        do {
            let stack = try LiveStack()
            self.stack = stack
            return stack
        } catch {
            startError = error
            throw error
        }
    }

    /// Stops the stack if it was started.
    func stop() {
        stack?.stop()
        stack = nil
    }
}
