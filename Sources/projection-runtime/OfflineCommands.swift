import Foundation
import HostAPI
import Runtime

/// `check`: validates the configuration, loads the projections once and lists every error
/// with file:line.
struct CheckCommand {
    var configFile: String?
    var flags: [String: String]

    func run() -> Int32 {
        let config: RuntimeConfig
        do {
            config = try RuntimeConfig.load(environment: ProcessInfo.processInfo.environment,
                                            configFile: configFile, flags: flags)
        } catch {
            print("error  configuration: \(error)")
            return 1
        }
        print("ok     configuration" + (configFile.map { " \($0)" } ?? " (defaults and environment)"))
        for name in config.unrecognizedEnvironmentVariables {
            print("warn   configuration: unknown variable \(name) is ignored; check its spelling in docs/configuration.md")
        }
        if let notice = config.clickhousePortNotice {
            print("warn   configuration: \(notice)")
        }
        let folder = config.projections.directory
        let loader = ProjectionLoader(folder: folder, settings: config.hostSettings)
        let report: ReloadReport
        let set: ProjectionSet
        do {
            (set, report) = try loader.load(nowMs: currentTimeMs())
        } catch {
            printError("error: \(error)")
            return 1
        }
        for definition in set.projections {
            let topics = definition.topics.joined(separator: ", ")
            print("ok     \(definition.code.file): projection \(definition.name), version \(definition.shortVersion), topics \(topics)")
        }
        for failure in report.failures {
            print("error  \(failure)")
            if !failure.traceback.isEmpty {
                print(failure.traceback.split(separator: "\n").map { "       " + $0 }.joined(separator: "\n"))
            }
        }
        if set.projections.isEmpty && report.failures.isEmpty {
            printError("error: no projection files (*.lua) in \(folder)")
            return 1
        }
        print("\(set.projections.count) loaded, \(report.failures.count) failed")
        return report.failures.isEmpty ? 0 : 1
    }
}

/// `test`: runs an events file through one file or a folder offline, and with `--redis` also
/// applies the Redis effects to a Redis server.
struct TestCommand {
    var path: String
    var eventsFile: String
    var topic: String?
    /// The server and database that receive the Redis effects, or nil to only print them.
    var redis: RedisSettings?

    func run() throws(UsageError) -> Int32 {
        var settings = HostSettings()
        settings.sortObjectKeys = true
        let (set, report) = try loadProjections(settings: settings)
        for failure in report.failures {
            printError("error: \(failure)")
        }
        guard !set.projections.isEmpty else {
            printError("error: no projection loaded from \(path)")
            return 1
        }
        guard let data = FileManager.default.contents(atPath: eventsFile) else {
            throw UsageError(message: "test: cannot read the events file \(eventsFile)")
        }

        let runner: OfflineRunner
        do {
            runner = try OfflineRunner(set: set, settings: settings, topic: topic)
        } catch {
            printError("error: \(error.message)")
            return 1
        }
        var writer: RedisEffectWriter?
        if let redis {
            do {
                writer = try RedisEffectWriter(settings: redis, projections: set)
            } catch {
                printError("error: \(error.message)")
                return 1
            }
        }

        // Written in blocks while the events run, so a large events file does not keep all
        // of its output in memory.
        var output = OutputBuffer()
        output.append(runner.initLines())
        var number = 0
        for line in data.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            number += 1
            let lines = runner.run(line: Array(line), number: number)
            output.append(lines)
            do {
                try writer?.add(lines)
            } catch {
                output.flush()
                printError("error: \(error.message)")
                return 1
            }
        }
        output.flush()

        var rejected = 0
        if let writer {
            do {
                try writer.finish()
            } catch {
                printError("error: \(error.message)")
                return 1
            }
            rejected = writer.rejectedCount
            printError("test: applied \(writer.appliedCount) Redis commands to \(writer.endpoint), \(rejected) rejected")
        }
        let failed = runner.errorCount + report.failures.count + rejected
        return failed == 0 ? 0 : 1
    }

    /// Loads `path` as a folder, or as a single file with the `lib` folder beside it.
    private func loadProjections(settings: HostSettings) throws(UsageError) -> (ProjectionSet, ReloadReport) {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw UsageError(message: "test: \(path) does not exist")
        }
        let folder = isDirectory.boolValue ? path : (path as NSString).deletingLastPathComponent
        let loader = ProjectionLoader(folder: folder.isEmpty ? "." : folder, settings: settings)
        do {
            if isDirectory.boolValue {
                return try loader.load(nowMs: 0)
            }
            return try loader.loadFile(path, nowMs: 0)
        } catch {
            throw UsageError(message: "test: \(error)")
        }
    }
}

/// `run`: loads the configuration and runs the service until SIGTERM or SIGINT.
struct RunCommand {
    var configFile: String?
    var flags: [String: String]

    func run() -> Int32 {
        let config: RuntimeConfig
        do {
            config = try RuntimeConfig.load(environment: ProcessInfo.processInfo.environment,
                                            configFile: configFile, flags: flags)
        } catch {
            printError("projection-runtime: \(error)")
            return 2
        }
        Log.shared.level = config.logLevel
        return RuntimeService(config: config).run()
    }
}

/// Collects output lines and writes them to standard output in blocks of about 1 MiB.
struct OutputBuffer {
    private var bytes: [UInt8] = []
    private static let blockBytes = 1 << 20

    mutating func append(_ lines: [String]) {
        for line in lines {
            bytes.append(contentsOf: line.utf8)
            bytes.append(UInt8(ascii: "\n"))
        }
        if bytes.count >= Self.blockBytes {
            flush()
        }
    }

    mutating func flush() {
        guard !bytes.isEmpty else { return }
        FileHandle.standardOutput.write(Data(bytes))
        bytes.removeAll(keepingCapacity: true)
    }
}

/// A failure of `test --redis` that stops the run, such as a lost connection.
struct RedisEffectError: Error {
    var message: String
}

/// Applies the Redis effects that `test` prints to a Redis server, in output order: `test --redis`.
///
/// `OfflineRunner` returns effects only as formatted lines, so the writer reads the `redis` and
/// `redis_script` lines back. Their arguments are JSON strings, or `{"base64": ...}` objects for
/// bytes that are not UTF-8. Commands go out in pipelines of up to `maxPipelineCommands`.
/// Every script the projections declare is loaded before the first pipeline, so a script call
/// fails with NOSCRIPT only when the server loses its script cache during the run (a restart,
/// SCRIPT FLUSH). `RedisConnection.pipeline` then loads the script and runs the call again,
/// after the other commands of its pipeline.
///
/// A command that Redis rejects (WRONGTYPE, a wrong number of arguments) is reported on
/// standard error with its event line and counted, and the other commands still run.
final class RedisEffectWriter {
    /// Where a queued command comes from, for error messages.
    private struct Origin {
        var line: Int
        var projection: String
        var summary: String
    }

    static let maxPipelineCommands = 1000
    /// Rejected commands reported one by one; the rest are only counted.
    static let maxReportedRejections = 20

    private let connection: RedisConnection
    /// Script sources by SHA-1, from the loaded projections' `scripts`.
    private let scriptSources: [String: [UInt8]]
    private var commands: [RedisCommand] = []
    private var origins: [Origin] = []

    private(set) var appliedCount = 0
    private(set) var rejectedCount = 0

    var endpoint: String { "\(connection.endpoint)/\(connection.settings.db)" }

    /// Connects, retrying for up to 2 s, and loads every script that `projections` declare.
    init(settings: RedisSettings, projections: ProjectionSet) throws(RedisEffectError) {
        connection = RedisConnection(settings: settings)
        var sources: [String: [UInt8]] = [:]
        for definition in projections.projections {
            for script in definition.scripts {
                sources[script.sha1] = script.source
            }
        }
        scriptSources = sources
        do {
            try connection.ensureConnected(deadline: Date().timeIntervalSince1970 + 2)
            try connection.ensureScriptsLoaded(sources.map { (sha1: $0.key, source: $0.value) })
        } catch {
            throw RedisEffectError(message: "test --redis: \(error.message); check the --redis address and that the server runs")
        }
    }

    /// Queues the Redis effects among `lines` (the output of one event) and sends a pipeline
    /// when enough commands are queued.
    func add(_ lines: [String]) throws(RedisEffectError) {
        for line in lines where Self.isRedisEffect(line) {
            let (command, origin) = try parse(line)
            commands.append(command)
            origins.append(origin)
        }
        if commands.count >= Self.maxPipelineCommands {
            try send()
        }
    }

    /// Sends the commands still queued.
    func finish() throws(RedisEffectError) {
        try send()
        if rejectedCount > Self.maxReportedRejections {
            printError("error: \(rejectedCount - Self.maxReportedRejections) more commands were rejected by Redis at \(endpoint)")
        }
    }

    private func send() throws(RedisEffectError) {
        guard !commands.isEmpty else { return }
        let replies: [RedisReply]
        do {
            replies = try connection.pipeline(commands)
        } catch {
            let first = origins.first!.line
            let last = origins.last!.line
            throw RedisEffectError(message: "test --redis: applying the Redis effects of event lines \(first) to \(last) failed, and some of them may have run: \(error.message)")
        }
        var rejectedHere = 0
        for (reply, origin) in zip(replies, origins) {
            guard case .error(let message) = reply else { continue }
            rejectedHere += 1
            if rejectedCount + rejectedHere <= Self.maxReportedRejections {
                printError("error: line \(origin.line), projection \(origin.projection): Redis rejected \(origin.summary): \(message)")
            }
        }
        rejectedCount += rejectedHere
        appliedCount += commands.count - rejectedHere
        commands.removeAll(keepingCapacity: true)
        origins.removeAll(keepingCapacity: true)
    }

    private static let effectField = Array(#","effect":""#.utf8)
    private static let redisEffectNames = [Array(#"redis""#.utf8), Array(#"redis_script""#.utf8)]

    /// Whether `line` is a `redis` or `redis_script` effect. The first `,"effect":"` of a line
    /// is the formatter's own field, because a quote inside a JSON string is always escaped.
    private static func isRedisEffect(_ line: String) -> Bool {
        var line = line
        return line.withUTF8 { bytes in
            guard let start = firstRange(of: effectField, in: bytes) else { return false }
            let rest = bytes[(start + effectField.count)...]
            return redisEffectNames.contains { rest.starts(with: $0) }
        }
    }

    private static func firstRange(of pattern: [UInt8], in bytes: UnsafeBufferPointer<UInt8>) -> Int? {
        guard bytes.count >= pattern.count else { return nil }
        for start in 0...(bytes.count - pattern.count)
        where bytes[start] == pattern[0] && bytes[start..<(start + pattern.count)].elementsEqual(pattern) {
            return start
        }
        return nil
    }

    private func parse(_ line: String) throws(RedisEffectError) -> (RedisCommand, Origin) {
        let invalid = { (reason: String) in
            RedisEffectError(message: "test --redis: cannot read back the effect line \(line.prefix(200)): \(reason)")
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
              let number = object["line"] as? Int else {
            throw invalid("not a JSON object with a line number")
        }
        let projection = object["projection"] as? String ?? ""
        switch object["effect"] as? String {
        case "redis":
            guard let arguments = Self.byteStrings(object["command"]), let name = arguments.first else {
                throw invalid("\"command\" must be a non-empty list of strings")
            }
            let summary = Self.summary(String(decoding: name, as: UTF8.self).uppercased(),
                                       key: arguments.count > 1 ? arguments[1] : nil)
            return (.arguments(arguments), Origin(line: number, projection: projection, summary: summary))
        case "redis_script":
            guard let sha1 = object["sha1"] as? String, let keys = Self.byteStrings(object["keys"]),
                  let arguments = Self.byteStrings(object["args"]) else {
                throw invalid("\"sha1\", \"keys\" and \"args\" are required")
            }
            let name = object["script"] as? String ?? ""
            guard let source = scriptSources[sha1] else {
                throw RedisEffectError(message: "test --redis: line \(number), projection \(projection) calls script \(name) (\(sha1)), which no loaded projection declares")
            }
            let summary = Self.summary("EVALSHA \(sha1)", key: keys.first) + " (script \(name))"
            return (.script(sha1: sha1, source: source, keys: keys, arguments: arguments),
                    Origin(line: number, projection: projection, summary: summary))
        default:
            throw invalid("not a redis or redis_script effect")
        }
    }

    /// Decodes a list of formatter byte strings: JSON strings, or `{"base64": ...}`.
    private static func byteStrings(_ value: Any?) -> [[UInt8]]? {
        guard let items = value as? [Any] else { return nil }
        var result: [[UInt8]] = []
        result.reserveCapacity(items.count)
        for item in items {
            if let text = item as? String {
                result.append(Array(text.utf8))
            } else if let wrapped = item as? [String: Any], let encoded = wrapped["base64"] as? String,
                      let data = Data(base64Encoded: encoded) {
                result.append(Array(data))
            } else {
                return nil
            }
        }
        return result
    }

    /// The command name and its first key, cut to 64 bytes, for error messages.
    private static func summary(_ name: String, key: [UInt8]?) -> String {
        guard let key else { return name }
        let keyText = String(decoding: key.prefix(64), as: UTF8.self)
        return key.count > 64 ? "\(name) \(keyText)..." : "\(name) \(keyText)"
    }
}
