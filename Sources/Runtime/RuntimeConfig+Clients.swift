/// The client settings each component is built from, derived from the loaded configuration.
extension RuntimeConfig {
    var redisSettings: RedisSettings {
        RedisSettings(host: redis.host, port: redis.port, db: redis.db,
                      password: redis.password.isEmpty ? nil : redis.password,
                      connectTimeoutMs: redis.connectTimeoutMs, commandTimeoutMs: redis.commandTimeoutMs)
    }

    var clickhouseSettings: ClickHouseSettings {
        ClickHouseSettings(host: clickhouse.host, httpPort: clickhouse.httpPort, database: clickhouse.database,
                           user: clickhouse.user, password: clickhouse.password.isEmpty ? nil : clickhouse.password,
                           timeoutMs: clickhouse.timeoutMs, flushRows: clickhouse.flushRows,
                           flushBytes: clickhouse.flushBytes, flushIntervalMs: clickhouse.flushIntervalMs)
    }

    var kafkaConsumerSettings: KafkaConsumerSettings {
        KafkaConsumerSettings(bootstrap: kafka.bootstrapServers.joined(separator: ","), groupId: kafka.groupID,
                              properties: kafka.properties, batchSize: kafka.pollBatch,
                              pollTimeoutMs: kafka.pollTimeoutMs)
    }
}
