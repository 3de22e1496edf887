import Foundation
import HostAPI
import Runtime
import XCTest

final class ConfigTests: XCTestCase {
    // MARK: - Helpers

    /// Writes `text` to a temporary YAML file that is removed after the test.
    private func writeConfig(_ text: String) throws -> String {
        let path = NSTemporaryDirectory() + "runtime-config-\(UUID().uuidString).yaml"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: path) }
        return path
    }

    private func load(environment: [String: String] = [:], file: String? = nil,
                      flags: [String: String] = [:]) throws -> RuntimeConfig {
        try RuntimeConfig.load(environment: environment, configFile: file, flags: flags)
    }

    /// Returns the error message of a load that is expected to fail, or nil when it succeeded.
    private func loadError(environment: [String: String] = [:], file: String? = nil,
                           flags: [String: String] = [:]) -> String? {
        do {
            _ = try RuntimeConfig.load(environment: environment, configFile: file, flags: flags)
            return nil
        } catch {
            return error.message
        }
    }

    // MARK: - Defaults and sources

    func testDefaults() throws {
        let config = try load()

        XCTAssertEqual(config.deploymentEnvironment, "dev")
        XCTAssertEqual(config.logLevel, .info)
        XCTAssertEqual(config.kafka.bootstrapServers, ["127.0.0.1:9092"])
        XCTAssertEqual(config.kafka.groupID, "projection-service")
        XCTAssertEqual(config.kafka.aggregatedTopic, "aggregation.bars.v1")
        XCTAssertEqual(config.kafka.invalidationTopic, "projection.invalidation.v1")
        XCTAssertEqual(config.kafka.deadLetterTopic, "{topic}.dlq")
        XCTAssertEqual(config.kafka.pollBatch, 500)
        XCTAssertEqual(config.kafka.pollTimeoutMs, 100)
        XCTAssertEqual(config.kafka.properties, [:])
        XCTAssertEqual(config.clickhouse.host, "127.0.0.1")
        XCTAssertEqual(config.clickhouse.httpPort, 8123)
        XCTAssertNil(config.clickhouse.nativePort)
        XCTAssertEqual(config.clickhouse.database, "default")
        XCTAssertEqual(config.clickhouse.user, "default")
        XCTAssertEqual(config.clickhouse.password, "")
        XCTAssertEqual(config.clickhouse.flushRows, 10_000)
        XCTAssertEqual(config.clickhouse.flushBytes, 8 << 20)
        XCTAssertEqual(config.clickhouse.flushIntervalMs, 1000)
        XCTAssertEqual(config.clickhouse.timeoutMs, 10_000)
        XCTAssertEqual(config.redis.host, "127.0.0.1")
        XCTAssertEqual(config.redis.port, 6379)
        XCTAssertEqual(config.redis.db, 0)
        XCTAssertEqual(config.redis.password, "")
        XCTAssertEqual(config.redis.connectTimeoutMs, 2000)
        XCTAssertEqual(config.redis.commandTimeoutMs, 5000)
        XCTAssertEqual(config.http.bindAddress, "0.0.0.0")
        XCTAssertEqual(config.http.healthPort, 8084)
        XCTAssertEqual(config.http.apiPort, 8085)
        XCTAssertEqual(config.projections.directory, "projections")
        XCTAssertEqual(config.projections.settings, [:])
        XCTAssertEqual(config.limits.luaMemoryMiB, 64)
        XCTAssertEqual(config.limits.luaInstructionsPerCall, 10_000_000)
        XCTAssertEqual(config.limits.jsonMaxBytes, 1_048_576)
        XCTAssertEqual(config.limits.jsonMaxDepth, 64)
        XCTAssertEqual(config.shutdownTimeoutMs, 20_000)
        XCTAssertNil(config.clickhousePortNotice)
        XCTAssertEqual(config.sources["redis.port"], .defaultValue)
        XCTAssertEqual(config.unrecognizedEnvironmentVariables, [])
    }

    func testEveryEnvironmentVariable() throws {
        let environment = [
            "DATA_PROC_ENV": "prod",
            "DATA_PROC_LOG_LEVEL": "debug",
            "DATA_PROC_KAFKA_BOOTSTRAP": "kafka-0:9092, kafka-1:9092",
            "DATA_PROC_KAFKA_GROUP_ID": "projections-blue",
            "DATA_PROC_PROJECTION_AGGREGATED_TOPIC": "bars.v2",
            "DATA_PROC_PROJECTION_INVALIDATION_TOPIC": "invalidation.v2",
            "DATA_PROC_DEAD_LETTER_TOPIC": "dead.{topic}",
            "DATA_PROC_KAFKA_POLL_BATCH": "250",
            "DATA_PROC_KAFKA_POLL_TIMEOUT_MS": "50",
            "DATA_PROC_CLICKHOUSE_HOST": "clickhouse.internal",
            "DATA_PROC_CLICKHOUSE_HTTP_PORT": "18123",
            "DATA_PROC_CLICKHOUSE_PORT": "9000",
            "DATA_PROC_CLICKHOUSE_DATABASE": "market",
            "DATA_PROC_CLICKHOUSE_USER": "writer",
            "DATA_PROC_CLICKHOUSE_PASSWORD": "ch-secret",
            "DATA_PROC_CLICKHOUSE_FLUSH_ROWS": "500",
            "DATA_PROC_CLICKHOUSE_FLUSH_BYTES": "65536",
            "DATA_PROC_CLICKHOUSE_FLUSH_INTERVAL_MS": "250",
            "DATA_PROC_CLICKHOUSE_TIMEOUT_MS": "3000",
            "DATA_PROC_REDIS_HOST": "redis.internal",
            "DATA_PROC_REDIS_PORT": "6380",
            "DATA_PROC_REDIS_DB": "3",
            "DATA_PROC_REDIS_PASSWORD": "redis-secret",
            "DATA_PROC_REDIS_CONNECT_TIMEOUT_MS": "1500",
            "DATA_PROC_REDIS_COMMAND_TIMEOUT_MS": "2500",
            "DATA_PROC_HTTP_BIND": "::",
            "DATA_PROC_PROJECTION_PORT": "9084",
            "DATA_PROC_INTERNAL_API_PORT": "9085",
            "DATA_PROC_PROJECTIONS_DIR": "/srv/projections",
            "DATA_PROC_LUA_MEMORY_LIMIT_MB": "128",
            "DATA_PROC_LUA_INSTRUCTION_LIMIT": "0",
            "DATA_PROC_JSON_MAX_BYTES": "2048",
            "DATA_PROC_JSON_MAX_DEPTH": "16",
            "DATA_PROC_SHUTDOWN_TIMEOUT_MS": "30000",
            "DATA_PROC_WORKERS": "3",
        ]
        let declared = Set(RuntimeConfig.settings.compactMap(\.environmentVariable))
        XCTAssertEqual(Set(environment.keys), declared, "the test must set every declared variable")

        let config = try load(environment: environment)

        XCTAssertEqual(config.deploymentEnvironment, "prod")
        XCTAssertEqual(config.logLevel, .debug)
        XCTAssertEqual(config.kafka.bootstrapServers, ["kafka-0:9092", "kafka-1:9092"])
        XCTAssertEqual(config.kafka.groupID, "projections-blue")
        XCTAssertEqual(config.kafka.aggregatedTopic, "bars.v2")
        XCTAssertEqual(config.kafka.invalidationTopic, "invalidation.v2")
        XCTAssertEqual(config.kafka.deadLetterTopic, "dead.{topic}")
        XCTAssertEqual(config.kafka.pollBatch, 250)
        XCTAssertEqual(config.workers, 3)
        XCTAssertEqual(config.kafka.pollTimeoutMs, 50)
        XCTAssertEqual(config.clickhouse.host, "clickhouse.internal")
        XCTAssertEqual(config.clickhouse.httpPort, 18123)
        XCTAssertEqual(config.clickhouse.nativePort, 9000)
        XCTAssertEqual(config.clickhouse.database, "market")
        XCTAssertEqual(config.clickhouse.user, "writer")
        XCTAssertEqual(config.clickhouse.password, "ch-secret")
        XCTAssertEqual(config.clickhouse.flushRows, 500)
        XCTAssertEqual(config.clickhouse.flushBytes, 65536)
        XCTAssertEqual(config.clickhouse.flushIntervalMs, 250)
        XCTAssertEqual(config.clickhouse.timeoutMs, 3000)
        XCTAssertEqual(config.redis.host, "redis.internal")
        XCTAssertEqual(config.redis.port, 6380)
        XCTAssertEqual(config.redis.db, 3)
        XCTAssertEqual(config.redis.password, "redis-secret")
        XCTAssertEqual(config.redis.connectTimeoutMs, 1500)
        XCTAssertEqual(config.redis.commandTimeoutMs, 2500)
        XCTAssertEqual(config.http.bindAddress, "::")
        XCTAssertEqual(config.http.healthPort, 9084)
        XCTAssertEqual(config.http.apiPort, 9085)
        XCTAssertEqual(config.projections.directory, "/srv/projections")
        XCTAssertEqual(config.limits.luaMemoryMiB, 128)
        XCTAssertEqual(config.limits.luaInstructionsPerCall, 0)
        XCTAssertEqual(config.limits.jsonMaxBytes, 2048)
        XCTAssertEqual(config.limits.jsonMaxDepth, 16)
        XCTAssertEqual(config.shutdownTimeoutMs, 30_000)

        for spec in RuntimeConfig.settings {
            guard let name = spec.environmentVariable else { continue }
            XCTAssertEqual(config.sources[spec.key], .environment(name), spec.key)
        }
    }

    func testFileThenEnvironmentThenFlags() throws {
        let file = try writeConfig("""
            logLevel: warn
            http:
              healthPort: 7001
              apiPort: 7101
            redis:
              port: 7201
            """)
        let environment = ["DATA_PROC_PROJECTION_PORT": "7002", "DATA_PROC_LOG_LEVEL": "error"]
        let flags = ["--health-port": "7003"]

        let fileOnly = try load(file: file)
        XCTAssertEqual(fileOnly.http.healthPort, 7001)
        XCTAssertEqual(fileOnly.logLevel, .warn)
        XCTAssertEqual(fileOnly.sources["http.healthPort"], .configFile(path: file, line: 3, column: 15))

        let fileAndEnvironment = try load(environment: environment, file: file)
        XCTAssertEqual(fileAndEnvironment.http.healthPort, 7002)
        XCTAssertEqual(fileAndEnvironment.logLevel, .error)

        let all = try load(environment: environment, file: file, flags: flags)
        XCTAssertEqual(all.http.healthPort, 7003)
        XCTAssertEqual(all.sources["http.healthPort"], .flag("--health-port"))
        XCTAssertEqual(all.logLevel, .error, "a setting without a flag keeps the environment value")
        XCTAssertEqual(all.http.apiPort, 7101, "a setting set only in the file keeps the file value")
        XCTAssertEqual(all.redis.port, 7201)
    }

    func testEveryFlag() throws {
        let flags = [
            "--projections": "/opt/projections",
            "--health-port": "1084",
            "--api-port": "1085",
            "--kafka-bootstrap": "a:1,b:2",
            "--log-level": "WARNING",
        ]
        XCTAssertEqual(Set(flags.keys), Set(RuntimeConfig.flagNames))

        let config = try load(flags: flags)

        XCTAssertEqual(config.projections.directory, "/opt/projections")
        XCTAssertEqual(config.http.healthPort, 1084)
        XCTAssertEqual(config.http.apiPort, 1085)
        XCTAssertEqual(config.kafka.bootstrapServers, ["a:1", "b:2"])
        XCTAssertEqual(config.logLevel, .warn)
    }

    func testLogLevelSpellings() throws {
        let cases: [(String, LogLevel)] = [
            ("debug", .debug), ("INFO", .info), ("Warn", .warn), ("warning", .warn), ("WARNING", .warn),
            ("error", .error), (" error ", .error),
        ]
        for (text, level) in cases {
            XCTAssertEqual(try load(environment: ["DATA_PROC_LOG_LEVEL": text]).logLevel, level, text)
        }
    }

    // MARK: - The config file

    func testFileSetsEveryKind() throws {
        let file = try writeConfig("""
            # A comment line.
            environment: staging
            kafka:
              bootstrap:
                - kafka-0:9092
                - kafka-1:9092
              pollTimeoutMs: 20
            clickhouse:
              password: "quoted secret"
            http:
              bind: 127.0.0.1
            shutdownTimeoutMs: 5000
            """)

        let config = try load(file: file)

        XCTAssertEqual(config.deploymentEnvironment, "staging")
        XCTAssertEqual(config.kafka.bootstrapServers, ["kafka-0:9092", "kafka-1:9092"])
        XCTAssertEqual(config.kafka.pollTimeoutMs, 20)
        XCTAssertEqual(config.clickhouse.password, "quoted secret")
        XCTAssertEqual(config.http.bindAddress, "127.0.0.1")
        XCTAssertEqual(config.shutdownTimeoutMs, 5000)
    }

    func testEmptyFileKeepsDefaults() throws {
        for text in ["", "# only a comment\n", "---\n", "redis:\n"] {
            let config = try load(file: try writeConfig(text))
            XCTAssertEqual(config.redis.port, 6379, "file text: \(text.debugDescription)")
        }
    }

    func testUnknownKeyNamesKeyAndLine() throws {
        let file = try writeConfig("""
            redis:
              host: redis.internal
              prot: 6380
            """)

        let message = try XCTUnwrap(loadError(file: file))

        XCTAssertTrue(message.contains("unknown key 'redis.prot'"), message)
        XCTAssertTrue(message.contains("\(file):3:3"), message)
        XCTAssertTrue(message.contains("known keys under redis: commandTimeoutMs, connectTimeoutMs, db, "
            + "host, password, port"), message)
    }

    func testUnknownTopLevelKey() throws {
        let file = try writeConfig("redis: {}\nmetrics:\n  port: 1\n")

        let message = try XCTUnwrap(loadError(file: file))

        XCTAssertTrue(message.hasPrefix("unknown key 'metrics' at \(file):2:1"), message)
        XCTAssertTrue(message.contains("at the top level"), message)
    }

    func testInvalidFileValues() throws {
        let cases: [(yaml: String, expected: String)] = [
            ("redis:\n  port: abc\n",
             "invalid value 'abc' for redis.port at FILE:2:9: expected an integer 1-65535"),
            ("redis:\n  port:\n    number: 1\n",
             "invalid value for redis.port at FILE:3:5: expected an integer 1-65535, found a mapping"),
            ("redis:\n  host:\n",
             "invalid value for redis.host at FILE:2:8: expected a non-empty string, found null "
                + "(remove the key to use the default)"),
            ("redis: 5\n",
             "invalid value for redis at FILE:1:8: expected a mapping of settings, found a scalar"),
            ("kafka:\n  bootstrap: [a:1, '']\n",
             "invalid value for kafka.bootstrap at FILE:2:14: expected a comma-separated list of "
                + "non-empty entries"),
            ("http:\n  bind: localhost\n",
             "invalid value 'localhost' for http.bind at FILE:2:9: expected a numeric IPv4 or IPv6 "
                + "address such as 0.0.0.0 or ::"),
            ("kafka:\n  properties: plain\n",
             "invalid value 'plain' for kafka.properties at FILE:2:15: expected a YAML mapping "
                + "(this setting is read from the config file only)"),
            ("- a\n- b\n", "FILE:1:1: the config file must be a mapping of settings, found a sequence"),
        ]
        for (yaml, expected) in cases {
            let file = try writeConfig(yaml)
            XCTAssertEqual(loadError(file: file), expected.replacingOccurrences(of: "FILE", with: file))
        }
    }

    func testSyntaxErrorHasPosition() throws {
        let file = try writeConfig("redis:\n  host: a\n port: 1\n")

        let message = try XCTUnwrap(loadError(file: file))

        XCTAssertTrue(message.hasPrefix("invalid YAML at \(file):3:"), message)
    }

    func testAnchorsAliasesAndTagsRejected() throws {
        let anchor = try writeConfig("redis: &shared\n  port: 1\nclickhouse: *shared\n")
        XCTAssertEqual(loadError(file: anchor),
                       "\(anchor):1:8: anchors (&shared) are not supported. Write the value out instead.")

        let tag = try writeConfig("redis:\n  port: !!str 6379\n")
        XCTAssertEqual(loadError(file: tag),
                       "\(tag):2:9: tags (tag:yaml.org,2002:str) are not supported. "
                        + "Quote a value to make it a string.")
    }

    func testDuplicateKeyRejected() throws {
        let file = try writeConfig("redis:\n  port: 1\n  port: 2\n")

        XCTAssertEqual(loadError(file: file), "\(file):3:3: duplicate key 'port' (first set at line 2)")
    }

    func testSecondDocumentRejected() throws {
        let file = try writeConfig("redis:\n  port: 1\n---\nredis:\n  port: 2\n")

        let message = try XCTUnwrap(loadError(file: file))

        XCTAssertTrue(message.contains("second YAML document"), message)
    }

    func testMissingFileNamed() {
        let message = loadError(file: "/nonexistent/runtime.yaml")

        XCTAssertEqual(message, "cannot open config file /nonexistent/runtime.yaml: No such file or directory")
    }

    // MARK: - Invalid values from the environment and options

    func testInvalidEnvironmentValues() {
        let cases: [(name: String, value: String, expected: String)] = [
            ("DATA_PROC_REDIS_PORT", "abc",
             "invalid value 'abc' for DATA_PROC_REDIS_PORT (redis.port): expected an integer 1-65535"),
            ("DATA_PROC_REDIS_PORT", "70000",
             "invalid value '70000' for DATA_PROC_REDIS_PORT (redis.port): expected an integer 1-65535"),
            ("DATA_PROC_REDIS_PORT", "",
             "invalid value '' for DATA_PROC_REDIS_PORT (redis.port): expected an integer 1-65535"),
            ("DATA_PROC_REDIS_DB", "-1",
             "invalid value '-1' for DATA_PROC_REDIS_DB (redis.db): expected an integer 0-2147483647"),
            ("DATA_PROC_KAFKA_POLL_BATCH", "0",
             "invalid value '0' for DATA_PROC_KAFKA_POLL_BATCH (kafka.pollBatch): expected an integer >= 1"),
            ("DATA_PROC_REDIS_CONNECT_TIMEOUT_MS", "2s",
             "invalid value '2s' for DATA_PROC_REDIS_CONNECT_TIMEOUT_MS (redis.connectTimeoutMs): "
                + "expected an integer number of milliseconds >= 1"),
            ("DATA_PROC_LOG_LEVEL", "verbose",
             "invalid value 'verbose' for DATA_PROC_LOG_LEVEL (logLevel): expected one of debug, info, warn, "
                + "error"),
            ("DATA_PROC_KAFKA_BOOTSTRAP", "a:1,,b:2",
             "invalid value 'a:1,,b:2' for DATA_PROC_KAFKA_BOOTSTRAP (kafka.bootstrap): expected a "
                + "comma-separated list of non-empty entries"),
            ("DATA_PROC_REDIS_HOST", " ",
             "invalid value ' ' for DATA_PROC_REDIS_HOST (redis.host): expected a non-empty string"),
            ("DATA_PROC_CLICKHOUSE_PORT", "native",
             "invalid value 'native' for DATA_PROC_CLICKHOUSE_PORT (clickhouse.nativePort): expected an "
                + "integer 1-65535"),
        ]
        for (name, value, expected) in cases {
            XCTAssertEqual(loadError(environment: [name: value]), expected)
        }
    }

    func testInvalidAndUnknownFlags() {
        XCTAssertEqual(loadError(flags: ["--api-port": "http"]),
                       "invalid value 'http' for --api-port (http.apiPort): expected an integer 1-65535")

        let unknown = loadError(flags: ["--redis-port": "1"])
        XCTAssertEqual(unknown, "unknown option --redis-port (options that set a value: --config, "
            + "--log-level, --kafka-bootstrap, --health-port, --api-port, --projections)")
    }

    func testSamePortForBothServersRejected() throws {
        let message = loadError(environment: ["DATA_PROC_INTERNAL_API_PORT": "8084"])

        XCTAssertEqual(message, "http.healthPort and http.apiPort are both 8084 (from default and "
            + "DATA_PROC_INTERNAL_API_PORT), but the two HTTP servers need different ports")
    }

    func testUnrecognizedEnvironmentVariablesReported() throws {
        let config = try load(environment: [
            "DATA_PROC_REDIS_POST": "6380", "DATA_PROC_REDIS_PORT": "6381", "HOME": "/root",
        ])

        XCTAssertEqual(config.unrecognizedEnvironmentVariables, ["DATA_PROC_REDIS_POST"])
        XCTAssertEqual(config.redis.port, 6381)
    }

    // MARK: - Secrets and notices

    func testSecretsRedacted() throws {
        let file = try writeConfig("""
            kafka:
              properties:
                security.protocol: SASL_SSL
                sasl.mechanism: SCRAM-SHA-512
                sasl.username: projections
                sasl.password: kafka-secret-1
                ssl.key.password: kafka-secret-2
                sasl.oauthbearer.client.secret: kafka-secret-3
            """)
        let config = try load(environment: [
            "DATA_PROC_REDIS_PASSWORD": "redis-secret",
            "DATA_PROC_CLICKHOUSE_PASSWORD": "clickhouse-secret",
        ], file: file)

        let description = config.redactedDescription()
        let values = Dictionary(description.map { ($0.key, $0.value) }, uniquingKeysWith: { first, _ in first })

        XCTAssertEqual(values["redis.password"], "***")
        XCTAssertEqual(values["clickhouse.password"], "***")
        XCTAssertEqual(values["kafka.properties.sasl.password"], "***")
        XCTAssertEqual(values["kafka.properties.ssl.key.password"], "***")
        XCTAssertEqual(values["kafka.properties.sasl.oauthbearer.client.secret"], "***")
        XCTAssertEqual(values["kafka.properties.sasl.username"], "projections")
        XCTAssertEqual(values["kafka.properties.security.protocol"], "SASL_SSL")
        XCTAssertEqual(values["redis.port"], "6379")
        XCTAssertEqual(values["redis.connectTimeoutMs"], "2000")
        for (key, value) in description {
            XCTAssertFalse(value.contains("secret"), "\(key) shows a secret")
        }
        XCTAssertEqual(description.count, Set(description.map(\.key)).count, "keys are unique")
    }

    func testEmptySecretShownEmpty() throws {
        let values = Dictionary(try load().redactedDescription().map { ($0.key, $0.value) },
                                uniquingKeysWith: { first, _ in first })

        XCTAssertEqual(values["redis.password"], "")
    }

    func testSecretNotQuotedInErrors() throws {
        let file = try writeConfig("redis:\n  password: [hunter2]\n")

        let message = try XCTUnwrap(loadError(file: file))

        XCTAssertFalse(message.contains("hunter2"), message)
        XCTAssertTrue(message.contains("redis.password"), message)
    }

    func testClickHouseNativePortNotice() throws {
        let config = try load(environment: ["DATA_PROC_CLICKHOUSE_PORT": "9000"])

        XCTAssertEqual(config.clickhouse.nativePort, 9000)
        XCTAssertEqual(config.clickhouse.httpPort, 8123, "the native port never replaces the HTTP port")
        XCTAssertEqual(config.clickhousePortNotice,
                       "DATA_PROC_CLICKHOUSE_PORT=9000 is ClickHouse's native protocol port; this runtime "
                        + "uses the HTTP interface on DATA_PROC_CLICKHOUSE_HTTP_PORT=8123")
    }

    func testClickHouseNoticeForOtherPortAndFile() throws {
        let fromEnvironment = try load(environment: [
            "DATA_PROC_CLICKHOUSE_PORT": "8123", "DATA_PROC_CLICKHOUSE_HTTP_PORT": "8124",
        ])
        XCTAssertEqual(fromEnvironment.clickhousePortNotice,
                       "DATA_PROC_CLICKHOUSE_PORT=8123 is read as ClickHouse's native protocol port, which "
                        + "this runtime does not use. It uses the HTTP interface on "
                        + "DATA_PROC_CLICKHOUSE_HTTP_PORT=8124")

        let fromFile = try load(file: try writeConfig("clickhouse:\n  nativePort: 9000\n"))
        XCTAssertEqual(fromFile.clickhousePortNotice,
                       "clickhouse.nativePort=9000 is ClickHouse's native protocol port; this runtime "
                        + "uses the HTTP interface on DATA_PROC_CLICKHOUSE_HTTP_PORT=8123")
    }

    // MARK: - Maps from the file

    func testKafkaPropertiesPassedVerbatim() throws {
        let file = try writeConfig("""
            kafka:
              properties:
                security.protocol: SASL_SSL
                session.timeout.ms: 45000
                enable.partition.eof: false
                client.id: "projection-runtime"
            """)

        let config = try load(file: file)

        XCTAssertEqual(config.kafka.properties, [
            "security.protocol": "SASL_SSL",
            "session.timeout.ms": "45000",
            "enable.partition.eof": "false",
            "client.id": "projection-runtime",
        ])
    }

    func testKafkaPropertiesRejectOwnSettingsAndNesting() throws {
        let bootstrap = try writeConfig("kafka:\n  properties:\n    bootstrap.servers: a:1\n")
        XCTAssertEqual(loadError(file: bootstrap),
                       "invalid value 'bootstrap.servers' for kafka.properties at \(bootstrap):3:5: expected "
                        + "no 'bootstrap.servers' property (set kafka.bootstrap instead)")

        let nested = try writeConfig("kafka:\n  properties:\n    security:\n      protocol: SSL\n")
        let message = try XCTUnwrap(loadError(file: nested))
        XCTAssertTrue(message.hasPrefix("invalid value for kafka.properties at \(nested):4:7: expected a "
            + "scalar for property 'security', found a mapping"), message)
    }

    func testProjectionSettingsTyped() throws {
        let file = try writeConfig("""
            projections:
              settings:
                latest_price:
                  last_closes_count: 5
                  negative: -3
                  hex: 0x1F
                  octal: 0o17
                  ratio: 0.25
                  exponent: 1e3
                  enabled: true
                  disabled: False
                  quoted_number: "5"
                  quoted_bool: 'true'
                  label: closes
                bar_rollups:
                  window: 60
            """)

        let settings = try load(file: file).projections.settings

        let latest = try XCTUnwrap(settings["latest_price"])
        XCTAssertEqual(latest["last_closes_count"], .integer(5))
        XCTAssertEqual(latest["negative"], .integer(-3))
        XCTAssertEqual(latest["hex"], .integer(31))
        XCTAssertEqual(latest["octal"], .integer(15))
        XCTAssertEqual(latest["ratio"], .number(0.25))
        XCTAssertEqual(latest["exponent"], .number(1000))
        XCTAssertEqual(latest["enabled"], .boolean(true))
        XCTAssertEqual(latest["disabled"], .boolean(false))
        XCTAssertEqual(latest["quoted_number"], .string("5"))
        XCTAssertEqual(latest["quoted_bool"], .string("true"))
        XCTAssertEqual(latest["label"], .string("closes"))
        XCTAssertEqual(settings["bar_rollups"], ["window": .integer(60)])
    }

    func testProjectionSettingsRejectNonScalars() throws {
        let infinity = try writeConfig("projections:\n  settings:\n    p:\n      limit: .inf\n")
        let infinityMessage = try XCTUnwrap(loadError(file: infinity))
        XCTAssertTrue(infinityMessage.hasPrefix("invalid value '.inf' for projections.settings at "
            + "\(infinity):4:14: expected a finite number for 'p.limit'"), infinityMessage)

        let tooLarge = try writeConfig("projections:\n  settings:\n    p:\n      limit: 9223372036854775808\n")
        XCTAssertNotNil(loadError(file: tooLarge))

        let list = try writeConfig("projections:\n  settings:\n    p:\n      symbols: [a, b]\n")
        let listMessage = try XCTUnwrap(loadError(file: list))
        XCTAssertTrue(listMessage.contains("expected a string, integer, float or boolean for 'p.symbols', "
            + "found a sequence"), listMessage)

        let empty = try writeConfig("projections:\n  settings:\n    p:\n      symbols:\n")
        XCTAssertNotNil(loadError(file: empty))
    }

    // MARK: - Derived values

    func testHostSettingsFromConfig() throws {
        let file = try writeConfig("projections:\n  settings:\n    latest_price:\n      keep: 2\n")
        let config = try load(environment: [
            "DATA_PROC_PROJECTION_AGGREGATED_TOPIC": "bars.v9",
            "DATA_PROC_PROJECTION_INVALIDATION_TOPIC": "invalidation.v9",
            "DATA_PROC_LUA_MEMORY_LIMIT_MB": "32",
            "DATA_PROC_LUA_INSTRUCTION_LIMIT": "5000",
            "DATA_PROC_JSON_MAX_BYTES": "4096",
            "DATA_PROC_JSON_MAX_DEPTH": "8",
        ], file: file)

        let host = config.hostSettings

        XCTAssertEqual(host.aggregatedTopic, "bars.v9")
        XCTAssertEqual(host.invalidationTopic, "invalidation.v9")
        XCTAssertEqual(host.projectionSettings, ["latest_price": ["keep": .integer(2)]])
        XCTAssertEqual(host.limits.memoryBytes, 32 << 20)
        XCTAssertEqual(host.limits.instructionsPerCall, 5000)
        XCTAssertEqual(host.limits.instructionsPerLoad, LuaLimits().instructionsPerLoad)
        XCTAssertEqual(host.jsonLimits, JSONLimits(maxDepth: 8, maxBytes: 4096))
    }

    func testDefaultHostSettingsMatchHostAPIDefaults() throws {
        XCTAssertEqual(try load().hostSettings, HostSettings())
    }

    // MARK: - Example and documentation

    /// The repository root, three levels above this file.
    private var repositoryRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
    }

    func testExampleConfigLoadsAsDefaults() throws {
        let path = repositoryRoot.appendingPathComponent("examples/config.yaml").path

        var example = try load(file: path)
        let defaults = try load()

        XCTAssertEqual(example.projections.settings, ["last_closes": ["last_closes_count": .integer(3)]])
        example.projections.settings = [:]
        XCTAssertEqual(example.redactedDescription().map(\.key), defaults.redactedDescription().map(\.key))
        XCTAssertEqual(example.redactedDescription().map(\.value), defaults.redactedDescription().map(\.value))
        for spec in RuntimeConfig.settings where spec.key != "clickhouse.nativePort" {
            guard case .configFile = example.sources[spec.key] else {
                XCTFail("examples/config.yaml does not set \(spec.key)")
                continue
            }
        }
    }

    func testDocumentationNamesEverySetting() throws {
        let path = repositoryRoot.appendingPathComponent("docs/configuration.md").path
        let text = try String(contentsOfFile: path, encoding: .utf8)

        for spec in RuntimeConfig.settings {
            XCTAssertTrue(text.contains("| `\(spec.key)` |"), "docs/configuration.md lacks \(spec.key)")
            if let name = spec.environmentVariable {
                XCTAssertTrue(text.contains("`\(name)`"), "docs/configuration.md lacks \(name)")
            }
            if let flag = spec.flag {
                XCTAssertTrue(text.contains("`\(flag.name) \(flag.valueName)`"), "docs lack \(flag.name)")
            }
        }
    }

    func testHelpTextListsEverySetting() {
        let help = RuntimeConfig.helpText()

        XCTAssertTrue(help.contains("--config FILE"), help)
        for spec in RuntimeConfig.settings {
            XCTAssertTrue(help.contains("  \(spec.key) ("), "help lacks \(spec.key)")
            if let name = spec.environmentVariable {
                XCTAssertTrue(help.contains(name), "help lacks \(name)")
            }
            if let flag = spec.flag {
                XCTAssertTrue(help.contains("\(flag.name) \(flag.valueName)"), "help lacks \(flag.name)")
            }
        }
        XCTAssertTrue(help.contains("Default: 6379."), help)
        for line in help.split(separator: "\n") {
            XCTAssertLessThanOrEqual(line.count, 100, String(line))
        }
    }
}
