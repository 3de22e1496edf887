import Synchronization

/// The runtime's metrics, named by Prometheus conventions (base units, `_total` for counters).
/// Label children are cached by the families, so the worker's per-event calls do no string work
/// after the first event of each projection.
public final class RuntimeMetrics: Sendable {
    let registry = MetricsRegistry()

    private let events: CounterFamily
    private let projectionCounters: CounterFamily
    private let redisFlushSeconds: HistogramFamily
    private let redisFlushErrors: CounterFamily
    private let redisCommandErrors: CounterFamily
    private let clickhouseFlushSeconds: HistogramFamily
    private let clickhouseFlushErrors: CounterFamily
    private let rowsInserted: CounterFamily
    private let consumerLag: GaugeFamily
    private let reloads: CounterFamily
    private let luaMemory: GaugeFamily
    private let queries: CounterFamily
    private let skipped: CounterFamily
    private let abandoned: CounterFamily
    private let querySeconds: HistogramFamily

    public init() {
        events = registry.counter(
            name: "projection_events_total",
            help: "Events handed to a projection, by result: ok, error (the handler raised or hit a limit) or invalid_payload.",
            labelNames: ["projection", "result"])
        projectionCounters = registry.counter(
            name: "projection_counter_total",
            help: "Counters that projections increment with ctx.count.",
            labelNames: ["projection", "name", "labels"])
        redisFlushSeconds = registry.histogram(
            name: "projection_redis_flush_duration_seconds",
            help: "Time to apply one batch's Redis transaction.")
        redisFlushErrors = registry.counter(
            name: "projection_redis_flush_errors_total",
            help: "Redis transactions that failed and were retried.")
        redisCommandErrors = registry.counter(
            name: "projection_redis_command_errors_total",
            help: "Single commands Redis rejected inside an applied transaction (a projection mistake, such as WRONGTYPE).",
            labelNames: ["projection"])
        clickhouseFlushSeconds = registry.histogram(
            name: "projection_clickhouse_flush_duration_seconds",
            help: "Time to insert one table's buffered rows.",
            labelNames: ["table"])
        clickhouseFlushErrors = registry.counter(
            name: "projection_clickhouse_flush_errors_total",
            help: "ClickHouse inserts that failed and were retried.",
            labelNames: ["table"])
        rowsInserted = registry.counter(
            name: "projection_clickhouse_rows_inserted_total",
            help: "Rows ClickHouse acknowledged, by table.",
            labelNames: ["table"])
        consumerLag = registry.gauge(
            name: "projection_kafka_consumer_lag_messages",
            help: "Messages between the consumer's position and the partition's high watermark.",
            labelNames: ["topic", "partition"])
        reloads = registry.counter(
            name: "projection_reloads_total",
            help: "Projection reloads, by result: ok, partial (some file failed and kept its previous version) or error.",
            labelNames: ["result"])
        luaMemory = registry.gauge(
            name: "projection_lua_memory_bytes",
            help: "Memory held by the worker's Lua state of each projection.",
            labelNames: ["projection"])
        queries = registry.counter(
            name: "projection_queries_total",
            help: "Internal API queries, by HTTP status.",
            labelNames: ["projection", "query", "status"])
        querySeconds = registry.histogram(
            name: "projection_query_duration_seconds",
            help: "Time to respond to one internal API query.",
            labelNames: ["projection"])
        skipped = registry.counter(
            name: "projection_events_skipped_total",
            help: "Events not handled again because Redis already contains their effects (replays after a restart or rebalance).",
            labelNames: ["reason"])
        abandoned = registry.counter(
            name: "projection_batches_abandoned_total",
            help: "Batches dropped before they were written, to be consumed again: fenced (another process owns the partition), deadline, partitions lost.",
            labelNames: ["reason"])
        registry.register(ProcessMetrics())
    }

    public func render() -> String {
        registry.render()
    }

    /// Adds `count` events of one projection and result, for a worker that counts a batch's
    /// events itself. A zero count adds nothing and creates no series.
    func recordEvents(projection: String, result: String, count: Int) {
        guard count > 0 else { return }
        events.labels(projection, result).inc(by: Double(count))
    }

    func recordProjectionCounter(projection: String, name: String, by: Double, labels: String) {
        guard by.isFinite, by >= 0 else { return }
        projectionCounters.labels(projection, name, labels).inc(by: by)
    }

    func recordRedisFlush(seconds: Double, failed: Bool) {
        if failed {
            redisFlushErrors.labels().inc()
        } else {
            redisFlushSeconds.labels().observe(seconds)
        }
    }

    func recordRedisCommandError(projection: String) {
        redisCommandErrors.labels(projection).inc()
    }

    func recordClickHouseFlush(table: String, rows: Int, seconds: Double, failed: Bool) {
        if failed {
            clickhouseFlushErrors.labels(table).inc()
        } else {
            clickhouseFlushSeconds.labels(table).observe(seconds)
            rowsInserted.labels(table).inc(by: Double(rows))
        }
    }

    func recordLag(topic: String, partition: Int32, lag: Int64) {
        consumerLag.labels(topic, String(partition)).set(Double(lag))
    }

    func recordReload(result: String) {
        reloads.labels(result).inc()
    }

    func recordLuaMemory(projection: String, bytes: Int) {
        luaMemory.labels(projection).set(Double(bytes))
    }

    func recordSkipped(reason: String, count: Int = 1) {
        guard count > 0 else { return }
        skipped.labels(reason).inc(by: Double(count))
    }

    func recordAbandonedBatch(reason: String) {
        abandoned.labels(reason).inc()
    }

    func recordQuery(projection: String, query: String, status: Int, seconds: Double) {
        queries.labels(projection, query, String(status)).inc()
        querySeconds.labels(projection).observe(seconds)
    }
}
