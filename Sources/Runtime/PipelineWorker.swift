import Foundation
import HostAPI

/// The consume loop: poll a batch, run it through the projections, write the effects, commit.
///
/// One worker thread owns everything here: the Kafka consumer, the dead-letter producer, the
/// Redis connection with the keyed state and offsets, the ClickHouse client and buffer, and the
/// projection runner with its Lua states. Other threads see the worker only through
/// `RuntimeControl`, `ProjectionRegistry` and the metrics.
///
/// Each commit unit is written in this order: dead letters (acknowledged), ClickHouse rows,
/// then one Redis MULTI/EXEC with the projections' commands, the keyed-state changes and the
/// next offsets, then (throttled) the Kafka commit. Redis contains the authoritative offsets, so a
/// process killed at any point resumes exactly after the last applied transaction.
final class PipelineWorker {
    let config: RuntimeConfig
    /// This worker's number, from 0, in logs and in `RuntimeControl`.
    let index: Int
    let registry: ProjectionRegistry
    let control: RuntimeControl
    let metrics: RuntimeMetrics

    let consumer: KafkaConsumer
    let deadLetters: DeadLetterWriter
    let redis: RedisConnection
    let state: RedisStateStore
    let ownership: PartitionOwnership
    let clickhouse: ClickHouseClient
    let buffer: ClickHouseBuffer
    var runner: ProjectionRunner
    private var subscribedTopics: [String] = []

    var unit = CommitUnit()
    /// Records taken from the consumer but not handled yet, because a write was failing.
    var backlog: [EventMessage] = []
    /// Set while a sink fails: partitions are paused and the loop only retries and polls.
    var outage: Outage?
    /// Offsets written to Redis but not yet committed to Kafka.
    var pendingKafkaCommit: [TopicPartition: Int64] = [:]
    /// The latest offset written to Redis for each owned partition, which a failed Kafka commit
    /// is retried with, so the committed offset never moves back.
    var appliedOffsets: [TopicPartition: Int64] = [:]
    private var lastKafkaCommit = 0.0
    private var lastLagUpdate = 0.0
    private var lastRedisProbe = 0.0
    /// Events per projection and result in the batch being handled, published to the
    /// metrics once per batch.
    private var batchEventCounts: [ProjectionEventCount] = []
    /// The script of the last script call routed, so that calls of the same script do not
    /// search the projection's scripts again. Cleared when the projection set changes.
    private var lastScript: (projection: String, name: String, source: [UInt8])?

    /// The events one projection handled in a batch, by result.
    struct ProjectionEventCount {
        var projection: String
        var ok = 0
        var error = 0
        var invalidPayload = 0
    }

    /// A failing sink and when to try it again.
    struct Outage {
        var sink: String
        var error: String
        var backoff = Backoff()
        var retryAt: Double
    }

    init(index: Int, config: RuntimeConfig, registry: ProjectionRegistry, control: RuntimeControl,
         metrics: RuntimeMetrics) throws {
        self.index = index
        self.config = config
        self.registry = registry
        self.control = control
        self.metrics = metrics
        let group = config.kafka.groupID
        self.redis = RedisConnection(settings: config.redisSettings)
        let offsets = RedisOffsetStore(connection: redis, namespace: group)
        self.state = RedisStateStore(connection: redis, namespace: group)
        self.ownership = PartitionOwnership(connection: redis, offsets: offsets, namespace: group)
        self.clickhouse = try ClickHouseClient(settings: config.clickhouseSettings)
        self.buffer = ClickHouseBuffer(settings: config.clickhouseSettings)
        self.runner = ProjectionRunner(set: registry.current, settings: config.hostSettings)
        self.consumer = try KafkaConsumer(settings: config.kafkaConsumerSettings)
        self.deadLetters = try DeadLetterWriter(bootstrap: config.kafka.bootstrapServers.joined(separator: ","),
                                                properties: config.kafka.properties,
                                                topicTemplate: config.kafka.deadLetterTopic)
    }

    /// Runs until `control.stop()`, then writes what it holds, commits and leaves the group.
    func run() {
        consumer.onRebalance = { [unowned self] event in self.rebalanced(event) }
        subscribeIfChanged()
        connectRedis()

        while !control.isStopping {
            if outage != nil {
                waitOutOutage()
                continue
            }
            swapIfReloaded()
            let records = takeRecords()
            control.update(worker: index) {
                $0.consumerJoined = consumer.isJoined
                $0.brokersDown = consumer.brokersDown
            }
            if !records.isEmpty {
                handleBatch(records)
            }
            if unitIsDue() {
                commitUnit(deadline: nil)
            }
            commitKafkaIfDue(force: false)
            updateLagEvery(seconds: 5)
            probeRedisIfUnreachable()
        }
        shutDown()
    }

    private func takeRecords() -> [EventMessage] {
        if !backlog.isEmpty {
            defer { backlog.removeAll() }
            return backlog
        }
        return consumer.poll(maxMessages: config.kafka.pollBatch, timeoutMs: config.kafka.pollTimeoutMs)
    }

    /// Returns whether to write the unit now: when its rows are due, or at once when it has no
    /// rows, so that Redis effects become visible after each batch.
    private func unitIsDue() -> Bool {
        guard !unit.isEmpty || deadLetters.pendingCount > 0 else { return false }
        return buffer.isEmpty || buffer.isDue()
    }

    // MARK: - Handling

    /// Claims new partitions, loads their keyed state, skips events already applied, and runs
    /// the rest through the projections. A Redis failure here keeps the records for later.
    private func handleBatch(_ records: [EventMessage]) {
        do {
            try prepare(for: records)
        } catch {
            backlog = records
            enterOutage(sink: "Redis", error: "\(error)")
            return
        }
        let now = nowMs()
        // Fencing and the resume offset are looked up once per run of events of one partition.
        var runPartition: TopicPartition?
        var runIsFenced = false
        var runResumeOffset: Int64?
        var alreadyApplied = 0
        for message in records {
            if runPartition?.partition != message.partition || runPartition?.topic != message.topic {
                let partition = TopicPartition(message.topic, message.partition)
                runPartition = partition
                runIsFenced = ownership.fenced.contains(partition)
                runResumeOffset = ownership.resumeOffset(partition)
            }
            if runIsFenced {
                continue
            }
            if let runResumeOffset, message.offset < runResumeOffset {
                alreadyApplied += 1
                continue
            }
            handle(message, nowMs: now)
        }
        if alreadyApplied > 0 {
            metrics.recordSkipped(reason: "already_applied", count: alreadyApplied)
        }
        publishEventCounts()
    }

    private func publishEventCounts() {
        for count in batchEventCounts {
            metrics.recordEvents(projection: count.projection, result: "ok", count: count.ok)
            metrics.recordEvents(projection: count.projection, result: "error", count: count.error)
            metrics.recordEvents(projection: count.projection, result: "invalid_payload",
                                 count: count.invalidPayload)
        }
        batchEventCounts.removeAll(keepingCapacity: true)
    }

    /// Returns the index of `projection` in `batchEventCounts`, trying `position` (the
    /// projection's place among the event's results) first.
    private func eventCountIndex(projection: String, position: Int) -> Int {
        if position < batchEventCounts.count && batchEventCounts[position].projection == projection {
            return position
        }
        if let index = batchEventCounts.firstIndex(where: { $0.projection == projection }) {
            return index
        }
        batchEventCounts.append(ProjectionEventCount(projection: projection))
        return batchEventCounts.count - 1
    }

    private func prepare(for records: [EventMessage]) throws {
        var partitions = Set<TopicPartition>()
        var previous: EventMessage?
        for message in records {
            if let previous, previous.partition == message.partition && previous.topic == message.topic {
                continue
            }
            partitions.insert(TopicPartition(message.topic, message.partition))
            previous = message
        }
        let unclaimed = partitions.filter { !ownership.isClaimed($0) }.sorted()
        if !unclaimed.isEmpty {
            try redis.ensureConnected(deadline: Date().timeIntervalSince1970 + 1)
            try ownership.claim(unclaimed)
        }
        var scopes = Set<StateScope>()
        for partition in partitions {
            for projection in runner.projections(subscribedTo: partition.topic) {
                scopes.insert(StateScope(projection: projection, topic: partition.topic, partition: partition.partition))
            }
        }
        try state.ensureLoaded(scopes)
    }

    private func handle(_ message: EventMessage, nowMs now: Int64) {
        // Counts rows across projections, so two projections writing one table from the same
        // event get distinct sources.
        var rowIndex = 0
        let slot = unit.slot(for: message)
        for (position, result) in runner.handle(message, store: state, nowMs: now).enumerated() {
            let origin = CommitUnit.Origin(projection: result.projection, topic: message.topic,
                                           partition: message.partition, offset: message.offset)
            let countIndex = eventCountIndex(projection: result.projection, position: position)
            switch result.outcome {
            case .handled(let effects):
                batchEventCounts[countIndex].ok += 1
                for effect in effects {
                    route(effect, origin: origin, rowIndex: &rowIndex)
                }
                unit.record(projection: result.projection, slot: slot, message: message, failure: nil)
            case .failed(let failure):
                if failure.phase == .decode {
                    batchEventCounts[countIndex].invalidPayload += 1
                } else {
                    batchEventCounts[countIndex].error += 1
                }
                logFailure(failure, origin: origin)
                deadLetters.add(message, projection: result.projection, version: result.version, failure: failure)
                unit.deadLetters += 1
                unit.record(projection: result.projection, slot: slot, message: message, failure: failure)
            }
        }
        unit.markHandled(slot: slot, offset: message.offset, monotonicNowMs: ClickHouseBuffer.monotonicMilliseconds)
    }

    /// Sends one effect where it goes: Redis commands to the unit, rows to the buffer, logs and
    /// counters straight out. Keyed-state changes are already in the state store.
    private func route(_ effect: Effect, origin: CommitUnit.Origin, rowIndex: inout Int) {
        switch effect {
        case .redis(let arguments):
            unit.addRedis(.arguments(arguments), origin: origin)
        case .redisScript(let name, let sha1, let keys, let arguments):
            let source = scriptSource(projection: origin.projection, name: name)
            unit.addRedis(.script(sha1: sha1, source: source, keys: keys, arguments: arguments), origin: origin)
        case .insert(let table, let row):
            let source = RowSource(topic: origin.topic, partition: origin.partition, offset: origin.offset,
                                   index: rowIndex)
            buffer.append(table: table, row: row, source: source)
            rowIndex += 1
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

    /// Returns the source of a script that a projection declared, or empty bytes when the
    /// current set has no such script.
    private func scriptSource(projection: String, name: String) -> [UInt8] {
        if let lastScript, lastScript.projection == projection, lastScript.name == name {
            return lastScript.source
        }
        let source = runner.set.projection(named: projection)?.scripts
            .first(where: { $0.name == name })?.source ?? []
        lastScript = (projection, name, source)
        return source
    }

    /// Per-event failures are rate-limited by the logger and counted; the event also goes to
    /// the dead-letter topic.
    private func logFailure(_ failure: ProjectionFailure, origin: CommitUnit.Origin) {
        Log.shared.warn("projection failed on an event; it goes to the dead-letter topic", [
            "projection": .string(origin.projection), "kafka.topic": .string(origin.topic),
            "kafka.partition": .int(origin.partition), "kafka.offset": .integer(origin.offset),
            "phase": .string(failure.phase.rawValue),
            "source": .string(failure.line.map { "\(failure.file):\($0)" } ?? failure.file),
            "error": .string(failure.message),
        ])
    }

    // MARK: - Reload and subscription

    /// Swaps to the newest published projection set between batches.
    private func swapIfReloaded() {
        let current = registry.current
        guard current.generation != runner.set.generation else { return }
        for failure in runner.swap(to: current) {
            Log.shared.error("projection could not be built in the worker", [
                "projection": .string(failure.projection ?? ""), "error": .string(failure.description),
            ])
        }
        clickhouse.forgetSchemas()
        lastScript = nil
        Log.shared.info("worker swapped to a new projection set", ["generation": .int(current.generation)])
        subscribeIfChanged()
    }

    private func subscribeIfChanged() {
        let topics = runner.subscribedTopics
        guard topics != subscribedTopics else { return }
        do {
            try consumer.subscribe(topics)
            subscribedTopics = topics
            control.update(worker: index) { $0.kafkaError = nil }
            Log.shared.info("subscribed", ["topics": .string(topics.joined(separator: ","))])
        } catch {
            control.update(worker: index) { $0.kafkaError = "\(error)" }
            Log.shared.error("Kafka subscribe failed", ["error": .string("\(error)")])
        }
    }

    /// Pings Redis every second while it is unreachable and every 5 s otherwise, so that
    /// `/ready` follows Redis even when no event arrives.
    private func probeRedisIfUnreachable() {
        let now = Date().timeIntervalSince1970
        let interval = control.health(worker: index).redisReachable ? 5.0 : 1.0
        guard now - lastRedisProbe >= interval, outage == nil else { return }
        lastRedisProbe = now
        connectRedis()
    }

    private func connectRedis() {
        do {
            try redis.ensureConnected(deadline: Date().timeIntervalSince1970 + 1)
            _ = try redis.command([Array("PING".utf8)])
            control.update(worker: index) { $0.redisReachable = true; $0.redisError = nil }
        } catch {
            control.update(worker: index) { $0.redisReachable = false; $0.redisError = "\(error)" }
            Log.shared.warn("Redis is not reachable yet", ["error": .string("\(error)")])
        }
    }

    func nowMs() -> Int64 {
        Int64(Date().timeIntervalSince1970 * 1000)
    }

    func updateLagEvery(seconds: Double) {
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

    /// Commits Kafka offsets at most once a second without waiting for the broker, and when
    /// forced (revoke, shutdown) synchronously. They only serve lag tools: the offsets in Redis
    /// decide where consumption resumes, so a broker that is down must not stall the worker.
    func commitKafkaIfDue(force: Bool) {
        for partition in consumer.takeFailedCommits() {
            if let offset = appliedOffsets[partition] {
                pendingKafkaCommit[partition] = offset
            }
        }
        let now = Date().timeIntervalSince1970
        guard !pendingKafkaCommit.isEmpty, force || now - lastKafkaCommit >= 1 else { return }
        lastKafkaCommit = now
        do {
            if !force {
                try consumer.commitAsync(pendingKafkaCommit)
            } else if let down = consumer.brokersDown {
                // rd_kafka_commit would wait for a broker, up to the request timeout.
                Log.shared.warn("no Kafka broker is reachable; the Kafka commit is skipped and Redis keeps the offsets",
                                ["error": .string(down), "partitions": .int(pendingKafkaCommit.count)])
                return
            } else {
                try consumer.commit(pendingKafkaCommit)
            }
            pendingKafkaCommit.removeAll()
        } catch {
            Log.shared.warn("Kafka offset commit failed; will retry", ["error": .string("\(error)")])
        }
    }
}

@available(*, unavailable)
extension PipelineWorker: Sendable {}

/// Capped exponential backoff with jitter: 50 ms doubling to 5 s.
struct Backoff {
    private var delayMs = 50
    private let maxMs = 5_000

    var nextDelayMs: Int { delayMs }

    /// Returns the jittered delay to wait now, in seconds, and doubles the next one.
    mutating func next() -> Double {
        let jittered = delayMs / 2 + Int.random(in: 0...(delayMs / 2))
        delayMs = min(delayMs * 2, maxMs)
        return Double(jittered) / 1000
    }

    mutating func sleep() {
        usleep(UInt32(next() * 1_000_000))
    }
}
