import Foundation
import HostAPI

/// The consume loop: poll a batch, run it through the projections, write the effects, commit.
///
/// One worker thread owns everything here: the Kafka consumer, the Redis connection, the
/// ClickHouse client and buffer, the projection runner with its Lua states, and the keyed
/// state. Nothing in it is shared; other threads see the worker only through `RuntimeControl`,
/// `ProjectionRegistry` and the metrics.
///
/// Order of writes for each batch: Redis (one MULTI/EXEC with the batch's commands), then
/// ClickHouse rows when the buffer is due, then the Kafka commit of the offsets whose Redis
/// effects and rows are both acknowledged. Offsets never get ahead of the effects they cover.
final class PipelineWorker {
    let config: RuntimeConfig
    let registry: ProjectionRegistry
    let control: RuntimeControl
    let metrics: RuntimeMetrics

    private let consumer: KafkaConsumer
    private let redis: RedisConnection
    private let clickhouse: ClickHouseClient
    private var buffer: ClickHouseBuffer
    private var runner: ProjectionRunner
    private let store = InMemoryStateStore()
    private var subscribedTopics: [String] = []
    /// Offsets whose Redis effects are applied, waiting for the ClickHouse rows before them.
    private var pendingCommit: [TopicPartition: Int64] = [:]
    private var lastLagUpdate = 0.0
    /// Set when a batch's Redis effects were given up on at shutdown: no later offset may be
    /// committed, since it would cover the effects that were not written.
    private var commitBlocked = false

    init(config: RuntimeConfig, registry: ProjectionRegistry, control: RuntimeControl,
         metrics: RuntimeMetrics) throws {
        self.config = config
        self.registry = registry
        self.control = control
        self.metrics = metrics
        self.redis = RedisConnection(settings: config.redisSettings)
        self.clickhouse = try ClickHouseClient(settings: config.clickhouseSettings)
        self.buffer = ClickHouseBuffer(settings: config.clickhouseSettings)
        self.runner = ProjectionRunner(set: registry.current, settings: config.hostSettings)
        self.consumer = try KafkaConsumer(settings: config.kafkaConsumerSettings)
    }

    /// Runs until `control.stop()`, then flushes, commits and leaves the group.
    func run() {
        consumer.onRebalance = { [unowned self] event in self.rebalanced(event) }
        subscribeIfChanged()
        connectRedis()

        while !control.isStopping {
            swapIfReloaded()
            let records = consumer.poll(maxMessages: config.kafka.pollBatch, timeoutMs: config.kafka.pollTimeoutMs)
            control.update { $0.consumerJoined = consumer.isJoined }
            if !records.isEmpty {
                process(records)
            }
            if buffer.isDue(nowMs: nowMs()) || (buffer.isEmpty && !pendingCommit.isEmpty) {
                flushAndCommit(deadline: nil)
            }
            updateLagEvery(seconds: 5)
        }
        shutDown()
    }

    // MARK: - Batches

    private func process(_ records: [EventMessage]) {
        var batch = EffectBatch()
        for message in records {
            handle(message, into: &batch)
        }
        guard applyRedis(batch, deadline: nil) else {
            commitBlocked = true
            return
        }
        for (partition, offset) in batch.nextOffsets {
            pendingCommit[partition] = offset
        }
        registry.recordApplied(batch.progress, nowMs: nowMs())
    }

    private func handle(_ message: EventMessage, into batch: inout EffectBatch) {
        let now = nowMs()
        for result in runner.handle(message, store: store, nowMs: now) {
            let origin = EffectBatch.Origin(projection: result.projection, topic: message.topic,
                                            partition: message.partition, offset: message.offset)
            switch result.outcome {
            case .handled(let effects):
                metrics.recordEvent(projection: result.projection, result: "ok")
                for effect in effects {
                    route(effect, origin: origin, into: &batch)
                }
                batch.record(projection: result.projection, message: message, failure: nil)
            case .failed(let failure):
                metrics.recordEvent(projection: result.projection,
                                    result: failure.phase == .decode ? "invalid_payload" : "error")
                logFailure(failure, origin: origin)
                batch.record(projection: result.projection, message: message, failure: failure)
            }
        }
        batch.markHandled(message)
    }

    /// Sends one effect where it goes: Redis commands to the batch, rows to the buffer, logs
    /// and counters straight out.
    private func route(_ effect: Effect, origin: EffectBatch.Origin, into batch: inout EffectBatch) {
        switch effect {
        case .redis(let arguments):
            batch.addRedis(.arguments(arguments), origin: origin)
        case .redisScript(let name, let sha1, let keys, let arguments):
            let source = runner.set.projection(named: origin.projection)?.scripts
                .first(where: { $0.name == name })?.source ?? []
            batch.addRedis(.script(sha1: sha1, source: source, keys: keys, arguments: arguments), origin: origin)
        case .insert(let table, let row):
            buffer.append(table: table, row: row, nowMs: nowMs())
        case .state, .clickhouseStatement:
            break
        case .log(let level, let message, let fields):
            Log.shared.write(level, message, [
                "projection": .string(origin.projection), "kafka.topic": .string(origin.topic),
                "kafka.partition": .int(origin.partition), "kafka.offset": .integer(origin.offset),
                "fields": .json(fields),
            ])
        case .count(let name, let by, let labels):
            metrics.recordProjectionCounter(projection: origin.projection, name: name, by: by,
                                            labels: String(decoding: labels, as: UTF8.self))
        }
    }

    /// Per-event failures go to debug with a counter; a warning per message would flood logs.
    private func logFailure(_ failure: ProjectionFailure, origin: EffectBatch.Origin) {
        Log.shared.warn("projection failed on an event; the event is skipped for this projection", [
            "projection": .string(origin.projection), "kafka.topic": .string(origin.topic),
            "kafka.partition": .int(origin.partition), "kafka.offset": .integer(origin.offset),
            "phase": .string(failure.phase.rawValue), "source": .string(failure.line.map { "\(failure.file):\($0)" } ?? failure.file),
            "error": .string(failure.message),
        ])
    }

    // MARK: - Writing

    /// Applies the batch's Redis commands in one transaction (which loads missing scripts
    /// first), retrying with backoff while Redis is unreachable. Reply errors of single commands are projection mistakes (a wrong type,
    /// say): they are logged and counted, and the rest of the batch still applies.
    private func applyRedis(_ batch: EffectBatch, deadline: Double?) -> Bool {
        guard !batch.redisCommands.isEmpty else { return true }
        var backoff = Backoff()
        while true {
            let started = DispatchTime.now().uptimeNanoseconds
            do {
                let replies = try redis.transaction(batch.redisCommands)
                metrics.recordRedisFlush(seconds: elapsed(since: started), failed: false)
                control.update { $0.redisReachable = true; $0.redisError = nil }
                reportReplyErrors(replies, batch: batch)
                return true
            } catch {
                metrics.recordRedisFlush(seconds: elapsed(since: started), failed: true)
                control.update { $0.redisReachable = false; $0.redisError = "\(error)" }
                Log.shared.warn("Redis write failed; retrying", [
                    "error": .string("\(error)"), "retry_in_ms": .int(backoff.nextDelayMs),
                    "commands": .int(batch.redisCommands.count),
                ])
                if shouldGiveUp(deadline) { return false }
                backoff.sleep()
                // NOTE: while Redis is down the worker does not poll Kafka, so an outage longer
                // than max.poll.interval.ms (default 300 s) makes the broker revoke the
                // partitions; the uncommitted batch is then consumed again (at least once).
            }
        }
    }

    private func reportReplyErrors(_ replies: [RedisReply], batch: EffectBatch) {
        for (index, reply) in replies.enumerated() {
            guard case .error(let message) = reply, index < batch.redisOrigins.count else { continue }
            let origin = batch.redisOrigins[index]
            metrics.recordRedisCommandError(projection: origin.projection)
            Log.shared.error("Redis rejected a projection's command", [
                "projection": .string(origin.projection), "kafka.topic": .string(origin.topic),
                "kafka.partition": .int(origin.partition), "kafka.offset": .integer(origin.offset),
                "command": .string(batch.redisCommands[index].summary), "error": .string(message),
            ])
        }
    }

    /// Writes the buffered rows, then commits the offsets they and Redis cover.
    private func flushAndCommit(deadline: Double?) {
        var allInserted = true
        for (table, rows) in buffer.drain() where !insertRows(table: table, rows: rows, deadline: deadline) {
            // Keep the rows for the next flush; the offsets stay uncommitted until then.
            for row in rows {
                buffer.append(table: table, row: row, nowMs: nowMs())
            }
            allInserted = false
        }
        if allInserted {
            commitPending()
        }
    }

    private func insertRows(table: String, rows: [[UInt8]], deadline: Double?) -> Bool {
        var backoff = Backoff()
        while true {
            let started = DispatchTime.now().uptimeNanoseconds
            do {
                try clickhouse.insert(table: table, rows: rows)
                metrics.recordClickHouseFlush(table: table, rows: rows.count, seconds: elapsed(since: started), failed: false)
                control.update { $0.clickhouseReachable = true; $0.clickhouseError = nil }
                return true
            } catch {
                metrics.recordClickHouseFlush(table: table, rows: 0, seconds: elapsed(since: started), failed: true)
                control.update { $0.clickhouseReachable = false; $0.clickhouseError = "\(error)" }
                Log.shared.warn("ClickHouse insert failed; retrying", [
                    "table": .string(table), "rows": .int(rows.count), "error": .string("\(error)"),
                    "retry_in_ms": .int(backoff.nextDelayMs),
                ])
                // NOTE: a rejected insert (bad rows) is retried like an outage, which stalls the
                // partition until the table or the projection is fixed; nothing is dropped.
                if shouldGiveUp(deadline) { return false }
                backoff.sleep()
            }
        }
    }

    private func commitPending() {
        guard !pendingCommit.isEmpty, !commitBlocked else { return }
        do {
            try consumer.commit(pendingCommit)
            pendingCommit.removeAll()
        } catch {
            // The offsets stay pending and go out with the next commit.
            Log.shared.warn("Kafka offset commit failed; will retry with the next batch", ["error": .string("\(error)")])
        }
    }

    // MARK: - Reload, rebalance, shutdown

    /// Swaps to the newest published projection set between batches.
    private func swapIfReloaded() {
        let current = registry.current
        guard current.generation != runner.set.generation else { return }
        for failure in runner.swap(to: current) {
            Log.shared.error("projection could not be built in the worker", [
                "projection": .string(failure.projection ?? ""), "error": .string(failure.description),
            ])
        }
        Log.shared.info("worker swapped to a new projection set", ["generation": .int(current.generation)])
        subscribeIfChanged()
    }

    private func subscribeIfChanged() {
        let topics = runner.subscribedTopics
        guard topics != subscribedTopics else { return }
        do {
            try consumer.subscribe(topics)
            subscribedTopics = topics
            Log.shared.info("subscribed", ["topics": .string(topics.joined(separator: ","))])
        } catch {
            control.update { $0.kafkaError = "\(error)" }
            Log.shared.error("Kafka subscribe failed", ["error": .string("\(error)")])
        }
    }

    /// Before partitions are released, writes and commits what was handled from them.
    private func rebalanced(_ event: RebalanceEvent) {
        switch event {
        case .revoked(let partitions, _):
            flushAndCommit(deadline: Date().timeIntervalSince1970 + Double(config.shutdownTimeoutMs) / 1000)
            Log.shared.info("partitions revoked", ["partitions": .int(partitions.count)])
        case .assigned(let partitions):
            Log.shared.info("partitions assigned", ["partitions": .int(partitions.count)])
        }
        control.update { $0.assignedPartitions = consumer.assignment().count }
    }

    private func connectRedis() {
        do {
            try redis.ensureConnected(deadline: Date().timeIntervalSince1970 + 1)
            control.update { $0.redisReachable = true }
        } catch {
            control.update { $0.redisReachable = false; $0.redisError = "\(error)" }
            Log.shared.warn("Redis is not reachable yet", ["error": .string("\(error)")])
        }
    }

    private func shutDown() {
        let deadline = Date().timeIntervalSince1970 + Double(config.shutdownTimeoutMs) / 1000
        Log.shared.info("worker stopping: flushing and committing")
        flushAndCommit(deadline: deadline)
        consumer.close()
        control.update { $0.workerStopped = true; $0.consumerJoined = false }
        Log.shared.info("worker stopped")
    }

    private func updateLagEvery(seconds: Double) {
        let now = Date().timeIntervalSince1970
        guard now - lastLagUpdate >= seconds else { return }
        lastLagUpdate = now
        for (partition, lag) in consumer.lag() {
            metrics.recordLag(topic: partition.topic, partition: partition.partition, lag: lag)
        }
        for name in runner.set.projections.map(\.name) {
            if let instance = runner.instance(named: name) {
                metrics.recordLuaMemory(projection: name, bytes: instance.memoryUsed)
            }
        }
    }

    /// During shutdown or a revoke, retries stop at the deadline; the uncommitted offsets are
    /// consumed again by whoever owns the partition next.
    private func shouldGiveUp(_ deadline: Double?) -> Bool {
        if let deadline, Date().timeIntervalSince1970 >= deadline {
            return true
        }
        return deadline == nil && control.isStopping
    }

    private func nowMs() -> Int64 {
        Int64(Date().timeIntervalSince1970 * 1000)
    }

    private func elapsed(since start: UInt64) -> Double {
        Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
    }
}

@available(*, unavailable)
extension PipelineWorker: Sendable {}

/// Capped exponential backoff with jitter: 50 ms doubling to 5 s.
struct Backoff {
    private var delayMs = 50
    private let maxMs = 5_000

    var nextDelayMs: Int { delayMs }

    mutating func sleep() {
        let jittered = delayMs / 2 + Int.random(in: 0...(delayMs / 2))
        usleep(UInt32(jittered) * 1000)
        delayMs = min(delayMs * 2, maxMs)
    }
}
