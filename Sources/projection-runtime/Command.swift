import Foundation
import HostAPI
import Runtime

let runtimeVersion = "0.1.0"

/// A mistake in the command line; exits with status 2.
struct UsageError: Error {
    var message: String
}

let mainHelp = """
    projection-runtime \(runtimeVersion): hosts market-data projections written in Lua.

    Usage:
      projection-runtime run [--config FILE] [options]
      projection-runtime dev-broker --topic NAME:PARTITIONS ...
      projection-runtime check [--config FILE] [--projections DIR]
      projection-runtime test PATH --events FILE.jsonl [--topic TOPIC] [--redis HOST:PORT[/DB]]
      projection-runtime --help | --version

    Commands:
      run         Consume Kafka, write Redis and ClickHouse, serve the health port and the API.
      dev-broker  Run librdkafka's mock Kafka cluster on 127.0.0.1 for local work and tests.
      check       Validate the configuration, compile every projection and run its init;
                  list every error with file:line.
      test        Run events through one projection file or a folder offline and print the effects.

    Run 'projection-runtime COMMAND --help' for a command's options.
    """

var runHelp: String {
    """
    Usage: projection-runtime run [--config FILE] [options]

    Consumes the projections' Kafka topics, applies their effects to Redis and ClickHouse,
    serves /health, /ready and /metrics on the health port and the query API on the API port.
    SIGHUP reloads the projections; SIGTERM and SIGINT stop gracefully (flush, commit, leave).

    Settings come from defaults < the YAML file < DATA_PROC_* environment variables < flags.

    """ + RuntimeConfig.helpText()
}

let checkHelp = """
    Usage: projection-runtime check [--config FILE] [--projections DIR]

    Validates the configuration the way `run` reads it (defaults < FILE < DATA_PROC_* variables
    < --projections), then compiles every projection file of the projections folder, checks the
    table each returns, and runs its init. Prints one line per projection and one per error with
    file:line. Exits 0 when the configuration is valid and every file loaded, 1 otherwise.
    Nothing connects to Kafka, Redis or ClickHouse: init's ClickHouse statements are only listed.

    Options:
      --config FILE       the YAML configuration file to validate
      --projections DIR   the projections folder (default: projections, or
                          DATA_PROC_PROJECTIONS_DIR); library modules are in DIR/lib
      --help              show this help
    """

let testHelp = """
    Usage: projection-runtime test PATH --events FILE.jsonl [--topic TOPIC] [--redis HOST:PORT[/DB]]

    Runs the events of FILE.jsonl through the projection file PATH (its library folder is
    lib/ beside it) or through every projection of the folder PATH, without Kafka, Redis or
    ClickHouse. Prints each effect (Redis commands, ClickHouse rows, state changes, logs,
    counters, errors) as one JSON object per line, in a stable order, for golden files.

    Each line of FILE.jsonl is an event payload when --topic is given, else an envelope:
      {"topic": "aggregation.bars.v1", "value": {...}, "key": "...", "partition": 0,
       "offset": 0, "timestamp_ms": 0, "headers": {"name": "value"}}
    A bad line is reported with its line number and the run goes on.
    Exits 0 when every event was handled, 1 when any line or handler failed or Redis rejected
    a command.

    Options:
      --events FILE            the events file (JSON lines)
      --topic TOPIC            the topic of every line, which then holds a bare payload
      --redis HOST:PORT[/DB]   also apply the Redis commands and script calls of every handled
                               event, in event order, to this Redis server and database
                               (default database 0), to inspect the end state; keyed state is
                               not written there
      --help                   show this help
    """

enum Command {
    case help(String)
    case version
    case run(configFile: String?, flags: [String: String])
    case devBroker(arguments: [String])
    case check(configFile: String?, flags: [String: String])
    case test(path: String, events: String, topic: String?, redis: RedisSettings?)

    static func parse(_ arguments: [String]) throws(UsageError) -> Command {
        guard let first = arguments.first else { return .help(mainHelp) }
        if arguments.contains("--version") {
            return .version
        }
        var options = OptionReader(Array(arguments.dropFirst()))
        switch first {
        case "--help", "-h", "help":
            return .help(mainHelp)
        case "--version":
            return .version
        case "run":
            if options.flag("--help") { return .help(runHelp) }
            let configFile = try options.value("--config")
            var flags: [String: String] = [:]
            for flag in RuntimeConfig.flagNames {
                if let value = try options.value(flag) {
                    flags[flag] = value
                }
            }
            try options.finish()
            return .run(configFile: configFile, flags: flags)
        case "dev-broker":
            return .devBroker(arguments: Array(arguments.dropFirst()))
        case "check":
            if options.flag("--help") { return .help(checkHelp) }
            let configFile = try options.value("--config")
            var flags: [String: String] = [:]
            if let folder = try options.value("--projections") {
                flags["--projections"] = folder
            }
            try options.finish()
            return .check(configFile: configFile, flags: flags)
        case "test":
            if options.flag("--help") { return .help(testHelp) }
            guard let events = try options.value("--events") else {
                throw UsageError(message: "test: --events FILE.jsonl is required")
            }
            let topic = try options.value("--topic")
            let redis = try options.value("--redis").map(Self.redisSettings(parsing:))
            guard let path = options.positional() else {
                throw UsageError(message: "test: the projection file or folder is missing")
            }
            try options.finish()
            return .test(path: path, events: events, topic: topic, redis: redis)
        default:
            throw UsageError(message: "unknown command '\(first)'")
        }
    }

    func run() throws(UsageError) -> Int32 {
        switch self {
        case .help(let text):
            print(text)
            return 0
        case .version:
            print("projection-runtime \(runtimeVersion)")
            return 0
        case .run(let configFile, let flags):
            return RunCommand(configFile: configFile, flags: flags).run()
        case .devBroker(let arguments):
            return DevBroker.runCommand(arguments: arguments)
        case .check(let configFile, let flags):
            return CheckCommand(configFile: configFile, flags: flags).run()
        case .test(let path, let events, let topic, let redis):
            return try TestCommand(path: path, eventsFile: events, topic: topic, redis: redis).run()
        }
    }

    /// Parses the `--redis` value `HOST:PORT` or `HOST:PORT/DB`. The port is the text after
    /// the last colon, so an IPv6 host needs no brackets.
    static func redisSettings(parsing text: String) throws(UsageError) -> RedisSettings {
        let invalid = { (reason: String) in
            UsageError(message: "test: invalid --redis value '\(text)': \(reason); expected HOST:PORT or HOST:PORT/DB, e.g. 127.0.0.1:6379/0")
        }
        var address = Substring(text)
        var db = 0
        if let slash = address.lastIndex(of: "/") {
            guard let number = Int(address[address.index(after: slash)...]), number >= 0 else {
                throw invalid("the database must be a whole number from 0")
            }
            db = number
            address = address[..<slash]
        }
        guard let colon = address.lastIndex(of: ":") else {
            throw invalid("the port is missing")
        }
        let host = String(address[..<colon])
        guard !host.isEmpty else {
            throw invalid("the host is missing")
        }
        guard let port = Int(address[address.index(after: colon)...]), (1...65535).contains(port) else {
            throw invalid("the port must be a number from 1 to 65535")
        }
        return RedisSettings(host: host, port: port, db: db)
    }
}

/// Reads `--name value` options and positional arguments, rejecting leftovers.
struct OptionReader {
    private var arguments: [String]

    init(_ arguments: [String]) {
        self.arguments = arguments
    }

    mutating func flag(_ name: String) -> Bool {
        guard let index = arguments.firstIndex(of: name) else { return false }
        arguments.remove(at: index)
        return true
    }

    mutating func value(_ name: String) throws(UsageError) -> String? {
        if let index = arguments.firstIndex(where: { $0.hasPrefix(name + "=") }) {
            let value = String(arguments[index].dropFirst(name.count + 1))
            arguments.remove(at: index)
            return value
        }
        guard let index = arguments.firstIndex(of: name) else { return nil }
        guard index + 1 < arguments.count else {
            throw UsageError(message: "\(name) needs a value")
        }
        let value = arguments[index + 1]
        arguments.removeSubrange(index...index + 1)
        return value
    }

    mutating func positional() -> String? {
        guard let index = arguments.firstIndex(where: { !$0.hasPrefix("--") }) else { return nil }
        return arguments.remove(at: index)
    }

    func finish() throws(UsageError) {
        if let extra = arguments.first {
            throw UsageError(message: "unexpected argument '\(extra)'")
        }
    }
}

func printError(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}

func currentTimeMs() -> Int64 {
    Int64(Date().timeIntervalSince1970 * 1000)
}
