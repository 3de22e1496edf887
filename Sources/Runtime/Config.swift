import Foundation
import HostAPI

/// The runtime's settings after the defaults, the config file, the environment and the
/// command-line options were applied, in increasing order of precedence.
///
/// Build it with `load(environment:configFile:flags:)`. Each setting is declared once, in
/// `RuntimeConfig.settings`, which drives parsing, validation, `--help` and the redacted
/// startup description. The initial field values below are placeholders that `load` always
/// replaces with the table's defaults.
public struct RuntimeConfig: Sendable, Equatable {
    /// Name of the deployment environment, such as `dev` or `prod`.
    public var deploymentEnvironment = ""
    public var logLevel = LogLevel.info
    public var kafka = Kafka()
    public var clickhouse = ClickHouse()
    public var redis = Redis()
    public var http = HTTP()
    public var projections = Projections()
    public var limits = Limits()
    /// Time a graceful shutdown may take, in milliseconds.
    public var shutdownTimeoutMs = 0
    /// Worker threads, each a member of the consumer group with its own partitions; 0 means
    /// one per processor core.
    public var workers = 0

    /// The source of each setting's value, by YAML key (`redis.port`).
    public internal(set) var sources: [String: SettingSource] = [:]
    /// `DATA_PROC_*` environment variables that match no setting, sorted. They are ignored, and
    /// the caller should log them because a misspelt name would otherwise go unnoticed.
    public internal(set) var unrecognizedEnvironmentVariables: [String] = []

    public struct Kafka: Sendable, Equatable {
        /// librdkafka `bootstrap.servers` entries, each `host:port`.
        public var bootstrapServers: [String] = []
        public var groupID = ""
        public var aggregatedTopic = ""
        public var invalidationTopic = ""
        /// Dead-letter topic template, where `{topic}` is replaced by the source topic.
        public var deadLetterTopic = ""
        /// Maximum number of messages consumed per poll batch.
        public var pollBatch = 0
        public var pollTimeoutMs = 0
        /// librdkafka properties from the config file, passed verbatim.
        public var properties: [String: String] = [:]
    }

    public struct ClickHouse: Sendable, Equatable {
        public var host = ""
        /// Port of the HTTP interface, the only one this runtime speaks.
        public var httpPort = 0
        /// The native protocol port from `DATA_PROC_CLICKHOUSE_PORT` or `clickhouse.nativePort`,
        /// recorded for `clickhousePortNotice` and otherwise unused.
        public var nativePort: Int?
        public var database = ""
        public var user = ""
        public var password = ""
        public var flushRows = 0
        public var flushBytes = 0
        public var flushIntervalMs = 0
        /// Timeout of one HTTP request, in milliseconds.
        public var timeoutMs = 0
    }

    public struct Redis: Sendable, Equatable {
        public var host = ""
        public var port = 0
        public var db = 0
        /// Password for AUTH, empty when the server requires none.
        public var password = ""
        public var connectTimeoutMs = 0
        public var commandTimeoutMs = 0
    }

    public struct HTTP: Sendable, Equatable {
        /// IPv4 or IPv6 address that both HTTP servers listen on.
        public var bindAddress = ""
        public var healthPort = 0
        public var apiPort = 0
    }

    public struct Projections: Sendable, Equatable {
        public var directory = ""
        /// Extra `settings` values by projection file stem.
        public var settings: [String: [String: SettingValue]] = [:]
    }

    public struct Limits: Sendable, Equatable {
        /// Memory limit of each Lua state in MiB, where 0 disables the limit.
        public var luaMemoryMiB = 0
        /// Lua VM instructions per `on_event` or query call, where 0 disables the limit.
        public var luaInstructionsPerCall = 0
        public var jsonMaxBytes = 0
        public var jsonMaxDepth = 0
    }

    init() {}
}

// MARK: - Loading

extension RuntimeConfig {
    /// Builds the configuration from the defaults, then the YAML file at `configFile`, then
    /// `environment`, then `flags`, each overriding the one before.
    ///
    /// `flags` maps option names as typed (`--health-port`) to their values. `--config` is not
    /// one of them, because the caller reads it to find `configFile`. Throws on an unreadable or
    /// invalid file, an unknown YAML key or option, and any invalid value, naming the setting and
    /// where the value came from.
    public static func load(environment: [String: String], configFile: String?,
                            flags: [String: String]) throws(ConfigError) -> RuntimeConfig {
        var config = defaults
        if let configFile {
            try config.applyFile(at: configFile)
        }
        try config.applyEnvironment(environment)
        try config.applyFlags(flags)
        try config.validateCombination()
        return config
    }

    /// The configuration with every table default applied and nothing else.
    static let defaults: RuntimeConfig = {
        var config = RuntimeConfig()
        for spec in settings {
            guard let text = spec.defaultValue else { continue }
            do throws(SettingValueError) {
                try spec.kind.apply(text: text, to: &config)
            } catch {
                preconditionFailure("default '\(text)' of \(spec.key) is invalid: expected \(error.expected)")
            }
            config.sources[spec.key] = .defaultValue
        }
        return config
    }()

    private mutating func applyEnvironment(_ environment: [String: String]) throws(ConfigError) {
        for spec in Self.settings {
            guard let name = spec.environmentVariable, let text = environment[name] else { continue }
            try apply(spec, text: text, source: .environment(name))
        }
        unrecognizedEnvironmentVariables = environment.keys
            .filter { $0.hasPrefix("DATA_PROC_") && Self.setting(forEnvironmentVariable: $0) == nil }
            .sorted()
    }

    private mutating func applyFlags(_ flags: [String: String]) throws(ConfigError) {
        for name in flags.keys.sorted() {
            guard let spec = Self.settings.first(where: { $0.flag?.name == name }) else {
                let known = Self.flagNames.joined(separator: ", ")
                throw ConfigError("unknown option \(name) (options that set a value: --config, \(known))")
            }
            try apply(spec, text: flags[name]!, source: .flag(name))
        }
    }

    private mutating func apply(_ spec: SettingSpec, text: String,
                                source: SettingSource) throws(ConfigError) {
        do throws(SettingValueError) {
            try spec.kind.apply(text: text, to: &self)
        } catch {
            throw ConfigError.invalidValue(text, for: spec, from: source, expected: error.expected)
        }
        sources[spec.key] = source
    }

    /// Checks rules that involve more than one setting.
    private func validateCombination() throws(ConfigError) {
        if http.healthPort == http.apiPort {
            throw ConfigError("http.healthPort and http.apiPort are both \(http.apiPort) "
                + "(from \(source(of: "http.healthPort")) and \(source(of: "http.apiPort"))), "
                + "but the two HTTP servers need different ports")
        }
    }

    private func source(of key: String) -> SettingSource {
        sources[key] ?? .defaultValue
    }
}

// MARK: - Derived values

extension RuntimeConfig {
    /// The settings the Lua host reads: topics, per-projection settings and sandbox limits.
    public var hostSettings: HostSettings {
        HostSettings(
            aggregatedTopic: kafka.aggregatedTopic,
            invalidationTopic: kafka.invalidationTopic,
            projectionSettings: projections.settings,
            limits: LuaLimits(memoryBytes: limits.luaMemoryMiB << 20,
                              instructionsPerCall: limits.luaInstructionsPerCall),
            jsonLimits: JSONLimits(maxDepth: limits.jsonMaxDepth, maxBytes: limits.jsonMaxBytes))
    }

    /// An explanation for the startup log when the native ClickHouse port was configured, which
    /// old runbooks do with `DATA_PROC_CLICKHOUSE_PORT=9000`, or nil when it was not.
    public var clickhousePortNotice: String? {
        guard let nativePort = clickhouse.nativePort else { return nil }
        let setting = switch source(of: "clickhouse.nativePort") {
        case .configFile: "clickhouse.nativePort"
        default: "DATA_PROC_CLICKHOUSE_PORT"
        }
        let httpPort = "DATA_PROC_CLICKHOUSE_HTTP_PORT=\(clickhouse.httpPort)"
        if nativePort == 9000 {
            return "\(setting)=9000 is ClickHouse's native protocol port; "
                + "this runtime uses the HTTP interface on \(httpPort)"
        }
        return "\(setting)=\(nativePort) is read as ClickHouse's native protocol port, which this "
            + "runtime does not use. It uses the HTTP interface on \(httpPort)"
    }

    /// Lists every setting as (YAML key, value) in table order, for the startup log. Secret values
    /// are "***" (an empty secret stays empty, so the log shows whether one is set). Maps are
    /// expanded to one entry per key, such as `kafka.properties.sasl.mechanism`.
    public func redactedDescription() -> [(key: String, value: String)] {
        var lines: [(key: String, value: String)] = []
        for spec in Self.settings {
            switch spec.kind {
            case .kafkaProperties(let keyPath):
                for (name, value) in self[keyPath: keyPath].sorted(by: { $0.key < $1.key }) {
                    let loggedValue = SettingKind.isSecretProperty(name) ? Self.redacted(value) : value
                    lines.append(("\(spec.key).\(name)", loggedValue))
                }
            case .projectionSettings(let keyPath):
                for (stem, values) in self[keyPath: keyPath].sorted(by: { $0.key < $1.key }) {
                    for (name, value) in values.sorted(by: { $0.key < $1.key }) {
                        lines.append(("\(spec.key).\(stem).\(name)", Self.describe(value)))
                    }
                }
            default:
                let value = spec.kind.formattedValue(in: self)
                lines.append((spec.key, spec.isSecret ? Self.redacted(value) : value))
            }
        }
        return lines
    }

    private static func redacted(_ value: String) -> String {
        value.isEmpty ? "" : "***"
    }

    private static func describe(_ value: SettingValue) -> String {
        switch value {
        case .string(let text): text
        case .integer(let number): String(number)
        case .number(let number): String(number)
        case .boolean(let flag): String(flag)
        }
    }
}

// MARK: - Help text

extension RuntimeConfig {
    /// The option names that `load` accepts in `flags`, in table order.
    public static var flagNames: [String] {
        settings.compactMap { $0.flag?.name }
    }

    /// Generates the options and settings part of `--help` from the settings table. The caller
    /// puts its usage line above it.
    public static func helpText() -> String {
        var text = "Options:\n"
        text += option("--config FILE", "YAML config file, described in docs/configuration.md.")
        for spec in settings {
            guard let flag = spec.flag else { continue }
            text += option("\(flag.name) \(flag.valueName)", "Sets \(spec.key). \(spec.help)")
        }
        text += """

            Settings, by YAML key, with the environment variable and option that also set them.
            Precedence, lowest first: default, --config file, environment variable, option.

            """
        for spec in settings {
            var sources = [spec.environmentVariable ?? "YAML only"]
            if let flag = spec.flag { sources.append(flag.name) }
            text += "  \(spec.key) (\(sources.joined(separator: ", ")))\n"
            var details = "\(spec.help) Type: \(spec.kind.typeDescription)."
            if let value = spec.defaultValue, !value.isEmpty { details += " Default: \(value)." }
            if spec.isSecret { details += " Secret: never logged." }
            text += wrap(details, indent: 6)
        }
        return text
    }

    private static func option(_ name: String, _ help: String) -> String {
        let padded = name.padding(toLength: max(name.count, 24), withPad: " ", startingAt: 0)
        return wrap("\(padded) \(help)", indent: 2, hangingIndent: 27)
    }

    /// Wraps `text` at 100 columns.
    private static func wrap(_ text: String, indent: Int, hangingIndent: Int? = nil) -> String {
        let width = 100
        var output = ""
        var line = String(repeating: " ", count: indent)
        var lineHasWord = false
        for word in text.split(separator: " ", omittingEmptySubsequences: false) {
            if lineHasWord && line.count + 1 + word.count > width {
                output += line + "\n"
                line = String(repeating: " ", count: hangingIndent ?? indent)
                lineHasWord = false
            }
            line += (lineHasWord ? " " : "") + word
            lineHasWord = true
        }
        return output + line + "\n"
    }
}

// MARK: - Errors and sources

/// A configuration that cannot start the runtime: an unreadable or invalid file, an unknown key
/// or option, or an invalid value. The message names the setting and where its value came from.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String

    public init(_ message: String) {
        self.message = message
    }

    public var description: String { message }

    /// Builds the error for `value` of `spec`, such as "invalid value 'abc' for DATA_PROC_REDIS_PORT
    /// (redis.port): expected an integer 1-65535". A secret value is shown as '***'.
    static func invalidValue(_ value: String?, for spec: SettingSpec, from source: SettingSource,
                             expected: String) -> ConfigError {
        let origin = switch source {
        case .defaultValue: "\(spec.key) (default)"
        case .configFile(let path, let line, let column): "\(spec.key) at \(path):\(line):\(column)"
        case .environment(let name): "\(name) (\(spec.key))"
        case .flag(let name): "\(name) (\(spec.key))"
        }
        guard let value else {
            return ConfigError("invalid value for \(origin): expected \(expected)")
        }
        let quotedValue = spec.isSecret ? "***" : value
        return ConfigError("invalid value '\(quotedValue)' for \(origin): expected \(expected)")
    }
}

/// The source of a setting's value.
public enum SettingSource: Sendable, Equatable, CustomStringConvertible {
    case defaultValue
    /// A YAML file, at the 1-based position of the value.
    case configFile(path: String, line: Int, column: Int)
    case environment(String)
    case flag(String)

    public var description: String {
        switch self {
        case .defaultValue: "default"
        case .configFile(let path, let line, let column): "\(path):\(line):\(column)"
        case .environment(let name): name
        case .flag(let name): name
        }
    }
}

/// A value that a setting's parser rejected. The caller adds the setting and the source.
struct SettingValueError: Error {
    /// The accepted values, phrased to follow "expected" in the message.
    var expected: String
    /// The position of the offending part of a YAML value, when it is not the value's start.
    var mark: YAMLMark?
    /// The text to quote in the message when it is not the whole value.
    var quotedValue: String?

    init(expected: String, at mark: YAMLMark? = nil, quotedValue: String? = nil) {
        self.expected = expected
        self.mark = mark
        self.quotedValue = quotedValue
    }
}

// MARK: - The settings table

/// One setting: its YAML key, the environment variable and option that also set it, its type
/// and default, and its help line.
public struct SettingSpec: Sendable {
    /// An option that sets the value, such as `--health-port N`.
    public struct Flag: Sendable {
        public var name: String
        /// The placeholder for the value in `--help`.
        public var valueName: String
    }

    /// The dotted YAML key path, such as `redis.port`.
    public let key: String
    public let environmentVariable: String?
    public let flag: Flag?
    let kind: SettingKind
    /// The default in the same text form that the environment variable takes, or nil when the
    /// setting has no value unless one is configured.
    public let defaultValue: String?
    public let help: String
    /// True for passwords: the value is never logged or quoted in errors.
    public let isSecret: Bool

    /// The type and accepted range as `--help` shows it.
    public var typeDescription: String { kind.typeDescription }

    init(_ key: String, env: String?, flag: (name: String, valueName: String)? = nil,
         _ kind: SettingKind, default defaultValue: String?, secret: Bool = false, help: String) {
        self.key = key
        self.environmentVariable = env
        self.flag = flag.map { Flag(name: $0.name, valueName: $0.valueName) }
        self.kind = kind
        self.defaultValue = defaultValue
        self.help = help
        self.isSecret = secret
    }
}

extension RuntimeConfig {
    private static let port = 1...65535
    private static let positive = 1...Int.max
    private static let nonNegative = 0...Int.max

    /// Every setting, in the order `--help` and the startup log list them. Environment variable
    /// names are those of the service this runtime replaces, so its runbooks keep working.
    public static let settings: [SettingSpec] = [
        SettingSpec("environment", env: "DATA_PROC_ENV", .string(\.deploymentEnvironment, allowsEmpty: false),
                    default: "dev", help: "Name of the deployment environment, such as dev or prod."),
        SettingSpec("logLevel", env: "DATA_PROC_LOG_LEVEL", flag: ("--log-level", "LEVEL"),
                    .logLevel(\.logLevel), default: "info",
                    help: "Lowest level of log lines written, case-insensitive. warning is read as warn."),

        SettingSpec("kafka.bootstrap", env: "DATA_PROC_KAFKA_BOOTSTRAP", flag: ("--kafka-bootstrap", "HOSTS"),
                    .list(\.kafka.bootstrapServers), default: "127.0.0.1:9092",
                    help: "Kafka bootstrap servers as host:port, separated by commas."),
        SettingSpec("kafka.groupId", env: "DATA_PROC_KAFKA_GROUP_ID",
                    .string(\.kafka.groupID, allowsEmpty: false), default: "projection-service",
                    help: "Kafka consumer group id."),
        SettingSpec("kafka.aggregatedTopic", env: "DATA_PROC_PROJECTION_AGGREGATED_TOPIC",
                    .string(\.kafka.aggregatedTopic, allowsEmpty: false), default: "aggregation.bars.v1",
                    help: "Topic of aggregated OHLCV bars, given to projections as "
                        + "settings.aggregated_topic."),
        SettingSpec("kafka.invalidationTopic", env: "DATA_PROC_PROJECTION_INVALIDATION_TOPIC",
                    .string(\.kafka.invalidationTopic, allowsEmpty: false),
                    default: "projection.invalidation.v1",
                    help: "Topic of cache-invalidation events, given to projections as "
                        + "settings.invalidation_topic."),
        SettingSpec("kafka.deadLetterTopic", env: "DATA_PROC_DEAD_LETTER_TOPIC",
                    .string(\.kafka.deadLetterTopic, allowsEmpty: false), default: "{topic}.dlq",
                    help: "Topic for events a projection could not handle, where {topic} is replaced by "
                        + "the source topic."),
        SettingSpec("kafka.pollBatch", env: "DATA_PROC_KAFKA_POLL_BATCH",
                    .integer(\.kafka.pollBatch, positive), default: "500",
                    help: "Maximum number of messages consumed per poll batch."),
        SettingSpec("kafka.pollTimeoutMs", env: "DATA_PROC_KAFKA_POLL_TIMEOUT_MS",
                    .milliseconds(\.kafka.pollTimeoutMs, positive), default: "100",
                    help: "Maximum time one Kafka poll waits for messages, in milliseconds."),
        SettingSpec("kafka.properties", env: nil, .kafkaProperties(\.kafka.properties), default: nil,
                    help: "librdkafka properties passed verbatim, such as security.protocol, sasl.mechanism "
                        + "and session.timeout.ms. Values of keys that contain password or secret, and "
                        + "ssl.key.pem and sasl.oauthbearer.config, are redacted in logs."),

        SettingSpec("clickhouse.host", env: "DATA_PROC_CLICKHOUSE_HOST",
                    .string(\.clickhouse.host, allowsEmpty: false), default: "127.0.0.1",
                    help: "ClickHouse host name or address."),
        SettingSpec("clickhouse.httpPort", env: "DATA_PROC_CLICKHOUSE_HTTP_PORT",
                    .integer(\.clickhouse.httpPort, port), default: "8123",
                    help: "Port of ClickHouse's HTTP interface, which this runtime uses."),
        SettingSpec("clickhouse.nativePort", env: "DATA_PROC_CLICKHOUSE_PORT",
                    .optionalInteger(\.clickhouse.nativePort, port), default: nil,
                    help: "ClickHouse's native protocol port, usually 9000. Accepted so that old runbooks "
                        + "still start, but unused: this runtime speaks HTTP on clickhouse.httpPort."),
        SettingSpec("clickhouse.database", env: "DATA_PROC_CLICKHOUSE_DATABASE",
                    .string(\.clickhouse.database, allowsEmpty: false), default: "default",
                    help: "ClickHouse database of the projection tables."),
        SettingSpec("clickhouse.user", env: "DATA_PROC_CLICKHOUSE_USER",
                    .string(\.clickhouse.user, allowsEmpty: false), default: "default",
                    help: "ClickHouse user name."),
        SettingSpec("clickhouse.password", env: "DATA_PROC_CLICKHOUSE_PASSWORD",
                    .string(\.clickhouse.password, allowsEmpty: true), default: "", secret: true,
                    help: "ClickHouse password. When empty, none is sent."),
        SettingSpec("clickhouse.flushRows", env: "DATA_PROC_CLICKHOUSE_FLUSH_ROWS",
                    .integer(\.clickhouse.flushRows, positive), default: "10000",
                    help: "Number of buffered rows that triggers a flush to ClickHouse."),
        SettingSpec("clickhouse.flushBytes", env: "DATA_PROC_CLICKHOUSE_FLUSH_BYTES",
                    .integer(\.clickhouse.flushBytes, positive), default: "8388608",
                    help: "Size of buffered rows in bytes that triggers a flush to ClickHouse "
                        + "(8388608 is 8 MiB)."),
        SettingSpec("clickhouse.flushIntervalMs", env: "DATA_PROC_CLICKHOUSE_FLUSH_INTERVAL_MS",
                    .milliseconds(\.clickhouse.flushIntervalMs, positive), default: "1000",
                    help: "Maximum time a row waits in the buffer before a flush, in milliseconds."),
        SettingSpec("clickhouse.timeoutMs", env: "DATA_PROC_CLICKHOUSE_TIMEOUT_MS",
                    .milliseconds(\.clickhouse.timeoutMs, positive), default: "10000",
                    help: "Timeout of one ClickHouse HTTP request, in milliseconds."),

        SettingSpec("redis.host", env: "DATA_PROC_REDIS_HOST", .string(\.redis.host, allowsEmpty: false),
                    default: "127.0.0.1", help: "Redis host name or address."),
        SettingSpec("redis.port", env: "DATA_PROC_REDIS_PORT", .integer(\.redis.port, port),
                    default: "6379", help: "Redis port."),
        SettingSpec("redis.db", env: "DATA_PROC_REDIS_DB", .integer(\.redis.db, 0...Int(Int32.max)),
                    default: "0", help: "Redis database number, selected after connecting."),
        SettingSpec("redis.password", env: "DATA_PROC_REDIS_PASSWORD",
                    .string(\.redis.password, allowsEmpty: true), default: "", secret: true,
                    help: "Password for Redis AUTH. When empty, AUTH is skipped."),
        SettingSpec("redis.connectTimeoutMs", env: "DATA_PROC_REDIS_CONNECT_TIMEOUT_MS",
                    .milliseconds(\.redis.connectTimeoutMs, positive), default: "2000",
                    help: "Timeout of connecting to Redis, in milliseconds."),
        SettingSpec("redis.commandTimeoutMs", env: "DATA_PROC_REDIS_COMMAND_TIMEOUT_MS",
                    .milliseconds(\.redis.commandTimeoutMs, positive), default: "5000",
                    help: "Timeout of one Redis command or transaction, in milliseconds."),

        SettingSpec("http.bind", env: "DATA_PROC_HTTP_BIND", .address(\.http.bindAddress),
                    default: "0.0.0.0",
                    help: "Address both HTTP servers listen on. The default 0.0.0.0 (every interface) "
                        + "lets Kubernetes probes and Prometheus reach the pod, and 127.0.0.1 keeps "
                        + "them local."),
        SettingSpec("http.healthPort", env: "DATA_PROC_PROJECTION_PORT", flag: ("--health-port", "N"),
                    .integer(\.http.healthPort, port), default: "8084",
                    help: "Port of the health HTTP server."),
        SettingSpec("http.apiPort", env: "DATA_PROC_INTERNAL_API_PORT", flag: ("--api-port", "N"),
                    .integer(\.http.apiPort, port), default: "8085",
                    help: "Port of the internal API HTTP server, which serves projection queries."),

        SettingSpec("projections.dir", env: "DATA_PROC_PROJECTIONS_DIR", flag: ("--projections", "DIR"),
                    .string(\.projections.directory, allowsEmpty: false), default: "projections",
                    help: "Folder of projection files, with library modules in its lib subfolder."),
        SettingSpec("projections.settings", env: nil, .projectionSettings(\.projections.settings),
                    default: nil,
                    help: "Extra values of the settings table by projection file stem, written as "
                        + "projections.settings.<stem>.<key>. Plain true and false are booleans, plain "
                        + "numbers are integers or floats, and quoted values are strings."),

        SettingSpec("limits.luaMemoryMb", env: "DATA_PROC_LUA_MEMORY_LIMIT_MB",
                    .integer(\.limits.luaMemoryMiB, 0...1_048_576), default: "64",
                    help: "Memory limit of each Lua state in MiB, where 0 disables the limit."),
        SettingSpec("limits.luaInstructionsPerCall", env: "DATA_PROC_LUA_INSTRUCTION_LIMIT",
                    .integer(\.limits.luaInstructionsPerCall, nonNegative), default: "10000000",
                    help: "Lua VM instructions allowed per on_event or query call, where 0 disables "
                        + "the limit."),
        SettingSpec("limits.jsonMaxBytes", env: "DATA_PROC_JSON_MAX_BYTES",
                    .integer(\.limits.jsonMaxBytes, positive), default: "1048576",
                    help: "Largest event payload the JSON decoder accepts, in bytes."),
        SettingSpec("limits.jsonMaxDepth", env: "DATA_PROC_JSON_MAX_DEPTH",
                    .integer(\.limits.jsonMaxDepth, positive), default: "64",
                    help: "Deepest nesting of arrays and objects the JSON decoder accepts."),

        SettingSpec("workers", env: "DATA_PROC_WORKERS",
                    .integer(\.workers, 0...256), default: "0",
                    help: "Worker threads, each a consumer-group member owning its partitions and Lua "
                        + "states, where 0 means one per processor core."),
        SettingSpec("shutdownTimeoutMs", env: "DATA_PROC_SHUTDOWN_TIMEOUT_MS",
                    .milliseconds(\.shutdownTimeoutMs, positive), default: "20000",
                    help: "Time a graceful shutdown may take after SIGTERM or SIGINT, in milliseconds."),
    ]

    private static let settingsByKey = Dictionary(uniqueKeysWithValues: settings.map { ($0.key, $0) })

    private static let settingsByEnvironmentVariable = Dictionary(
        uniqueKeysWithValues: settings.compactMap { spec in spec.environmentVariable.map { ($0, spec) } })

    static func setting(forKey key: String) -> SettingSpec? {
        settingsByKey[key]
    }

    static func setting(forEnvironmentVariable name: String) -> SettingSpec? {
        settingsByEnvironmentVariable[name]
    }

    /// True when `key` is a prefix of setting keys, such as `redis` or `projections`.
    static func isSection(_ key: String) -> Bool {
        settings.contains { $0.key.hasPrefix(key + ".") }
    }

    /// Returns the sorted names directly under `section`, or at the top level when it is empty.
    static func childKeys(of section: String) -> [String] {
        let prefix = section.isEmpty ? "" : section + "."
        let names = settings.compactMap { spec -> String? in
            guard spec.key.hasPrefix(prefix) else { return nil }
            return spec.key.dropFirst(prefix.count).split(separator: ".").first.map(String.init)
        }
        return Array(Set(names)).sorted()
    }
}

// MARK: - Setting types

/// A setting's type, accepted range and field. Each case parses the text form that environment
/// variables, options and YAML scalars share.
enum SettingKind: Sendable {
    case string(WritableKeyPath<RuntimeConfig, String> & Sendable, allowsEmpty: Bool)
    /// An IPv4 or IPv6 address in numeric form, as bind(2) needs.
    case address(WritableKeyPath<RuntimeConfig, String> & Sendable)
    case integer(WritableKeyPath<RuntimeConfig, Int> & Sendable, ClosedRange<Int>)
    /// An integer that stays nil unless configured.
    case optionalInteger(WritableKeyPath<RuntimeConfig, Int?> & Sendable, ClosedRange<Int>)
    /// An integer number of milliseconds.
    case milliseconds(WritableKeyPath<RuntimeConfig, Int> & Sendable, ClosedRange<Int>)
    case logLevel(WritableKeyPath<RuntimeConfig, LogLevel> & Sendable)
    /// Comma-separated text, or a YAML sequence.
    case list(WritableKeyPath<RuntimeConfig, [String]> & Sendable)
    /// The librdkafka properties: a YAML mapping of names to scalars, which no environment
    /// variable or option can set.
    case kafkaProperties(WritableKeyPath<RuntimeConfig, [String: String]> & Sendable)
    /// A YAML mapping of projection stems to mappings of scalars, also YAML only.
    case projectionSettings(WritableKeyPath<RuntimeConfig, [String: [String: SettingValue]]> & Sendable)

    var typeDescription: String {
        switch self {
        case .string(_, let allowsEmpty): allowsEmpty ? "string, may be empty" : "string"
        case .address: "IPv4 or IPv6 address"
        case .integer(_, let range), .optionalInteger(_, let range): "integer \(Self.describe(range))"
        case .milliseconds(_, let range): "milliseconds, integer \(Self.describe(range))"
        case .logLevel: "one of debug, info, warn, error"
        case .list: "comma-separated list or YAML sequence"
        case .kafkaProperties: "YAML mapping of names to scalars"
        case .projectionSettings: "YAML mapping of projection file stems to mappings of scalars"
        }
    }

    /// The accepted values, phrased to follow "expected" in errors.
    var expectation: String {
        switch self {
        case .string: "a non-empty string"
        case .address: "a numeric IPv4 or IPv6 address such as 0.0.0.0 or ::"
        case .integer(_, let range), .optionalInteger(_, let range):
            "an integer \(Self.describe(range))"
        case .milliseconds(_, let range): "an integer number of milliseconds \(Self.describe(range))"
        case .logLevel: "one of debug, info, warn, error"
        case .list: "a comma-separated list of non-empty entries"
        case .kafkaProperties, .projectionSettings:
            "a YAML mapping (this setting is read from the config file only)"
        }
    }

    /// Parses `text` and stores the value in `config`.
    func apply(text: String, to config: inout RuntimeConfig) throws(SettingValueError) {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        switch self {
        case .string(let keyPath, let allowsEmpty):
            guard allowsEmpty || !trimmed.isEmpty else { throw SettingValueError(expected: expectation) }
            config[keyPath: keyPath] = text
        case .address(let keyPath):
            guard Self.isNumericAddress(trimmed) else { throw SettingValueError(expected: expectation) }
            config[keyPath: keyPath] = trimmed
        case .integer(let keyPath, let range):
            config[keyPath: keyPath] = try integer(trimmed, in: range)
        case .optionalInteger(let keyPath, let range):
            config[keyPath: keyPath] = try integer(trimmed, in: range)
        case .milliseconds(let keyPath, let range):
            config[keyPath: keyPath] = try integer(trimmed, in: range)
        case .logLevel(let keyPath):
            config[keyPath: keyPath] = try Self.logLevel(trimmed)
        case .list(let keyPath):
            config[keyPath: keyPath] = try Self.splitList(text)
        case .kafkaProperties, .projectionSettings:
            throw SettingValueError(expected: expectation)
        }
    }

    /// Formats the current value in the text form that `apply(text:to:)` accepts.
    func formattedValue(in config: RuntimeConfig) -> String {
        switch self {
        case .string(let keyPath, _), .address(let keyPath): config[keyPath: keyPath]
        case .integer(let keyPath, _), .milliseconds(let keyPath, _): String(config[keyPath: keyPath])
        case .optionalInteger(let keyPath, _): config[keyPath: keyPath].map(String.init) ?? ""
        case .logLevel(let keyPath): config[keyPath: keyPath].rawValue
        case .list(let keyPath): config[keyPath: keyPath].joined(separator: ",")
        case .kafkaProperties(let keyPath): "\(config[keyPath: keyPath].count) entries"
        case .projectionSettings(let keyPath): "\(config[keyPath: keyPath].count) projections"
        }
    }

    private func integer(_ text: String, in range: ClosedRange<Int>) throws(SettingValueError) -> Int {
        guard let value = Int(text), range.contains(value) else {
            throw SettingValueError(expected: expectation)
        }
        return value
    }

    private static func describe(_ range: ClosedRange<Int>) -> String {
        range.upperBound == Int.max ? ">= \(range.lowerBound)" : "\(range.lowerBound)-\(range.upperBound)"
    }

    private static func logLevel(_ text: String) throws(SettingValueError) -> LogLevel {
        let name = text.lowercased()
        if let level = LogLevel(rawValue: name == "warning" ? "warn" : name) {
            return level
        }
        throw SettingValueError(expected: "one of debug, info, warn, error")
    }

    /// Splits comma-separated entries and trims their spaces. An empty entry is an error.
    static func splitList(_ text: String) throws(SettingValueError) -> [String] {
        let entries = text.split(separator: ",", omittingEmptySubsequences: false)
            .map { $0.trimmingCharacters(in: .whitespaces) }
        guard !entries.contains(where: \.isEmpty) else {
            throw SettingValueError(expected: "a comma-separated list of non-empty entries")
        }
        return entries
    }

    private static func isNumericAddress(_ text: String) -> Bool {
        var buffer = in6_addr()
        return inet_pton(AF_INET, text, &buffer) == 1 || inet_pton(AF_INET6, text, &buffer) == 1
    }

    /// True for a librdkafka property whose value is a credential and must not be logged.
    static func isSecretProperty(_ name: String) -> Bool {
        let lowered = name.lowercased()
        return lowered.contains("password") || lowered.contains("secret")
            || lowered == "ssl.key.pem" || lowered == "sasl.oauthbearer.config"
    }
}
