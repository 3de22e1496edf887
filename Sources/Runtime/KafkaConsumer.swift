import CRdKafka
import HostAPI

/// A partition of a topic.
public struct TopicPartition: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var topic: String
    public var partition: Int32

    public init(_ topic: String, _ partition: Int32) {
        self.topic = topic
        self.partition = partition
    }

    public static func < (left: TopicPartition, right: TopicPartition) -> Bool {
        (left.topic, left.partition) < (right.topic, right.partition)
    }

    public var description: String { "\(topic)/\(partition)" }
}

/// A consumed message, copied out of librdkafka's buffers. A tombstone (null value) has an
/// empty payload.
public typealias KafkaRecord = EventMessage

/// A change of a consumer's partition assignment, passed to `KafkaConsumer.onRebalance`.
public enum RebalanceEvent: Sendable, Equatable {
    /// Partitions added to the assignment. Under the eager protocol this is the whole new
    /// assignment, because every rebalance first revokes everything.
    case assigned([TopicPartition])
    /// Partitions about to leave the assignment. Offsets of handled messages can still be
    /// committed for them while `onRebalance` runs, unless `lost` is true: then the group has
    /// already moved them to another member (session timeout, fencing) and a commit fails.
    case revoked([TopicPartition], lost: Bool)
}

/// Connection and group settings of a `KafkaConsumer`.
public struct KafkaConsumerSettings: Sendable {
    /// `bootstrap.servers`: a comma-separated list of host:port.
    public var bootstrap: String
    /// `group.id`: the consumer group.
    public var groupId: String
    /// librdkafka configuration properties (names as in librdkafka's CONFIGURATION.md), set
    /// verbatim after `defaultProperties`, so they override them.
    public var properties: [String: String]
    /// The maximum number of records `poll()` returns when called without `maxMessages`.
    public var batchSize: Int
    /// How long `poll()` waits for the first record, in milliseconds, when called without
    /// `timeoutMs`.
    public var pollTimeoutMs: Int

    /// Properties set before `properties`. Offsets are stored and committed only by
    /// `KafkaConsumer.commit(_:)`, so a message counts as consumed only once it was handled.
    ///
    /// The assignment strategy is eager ("range,roundrobin"), so every rebalance revokes all
    /// partitions. `cooperative-sticky` works with the rebalance callback and the mock cluster,
    /// but librdkafka 2.0.2 (Debian 12's version) aborts the process with an assertion in
    /// `rd_kafka_sticky_assignor_state_destroy` when a cooperative-sticky consumer is closed
    /// after its first JoinGroup response and before its first assignment. librdkafka 2.3.0
    /// fixes that. `init` logs a warning when `properties` selects cooperative-sticky on an
    /// older librdkafka.
    ///
    /// `queued.max.messages.kbytes` bounds the messages fetched ahead of the handlers, per
    /// consumer (one per worker). With librdkafka's 64 MiB default, the fetch queue made up
    /// most of the resident memory of a consumer catching up on a backlog. 8 MiB is still about
    /// 40,000 bars of 200 bytes, about a second of work, and consumed as fast in the benchmark.
    ///
    /// NOTE: overriding `enable.auto.commit` or `enable.auto.offset.store` with `true` makes
    /// librdkafka commit offsets of messages that were only fetched, not handled.
    public static let defaultProperties: [(name: String, value: String)] = [
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("partition.assignment.strategy", "range,roundrobin"),
        ("queued.max.messages.kbytes", "8192"),
    ]

    public init(bootstrap: String, groupId: String, properties: [String: String] = [:],
                batchSize: Int = 500, pollTimeoutMs: Int = 100) {
        self.bootstrap = bootstrap
        self.groupId = groupId
        self.properties = properties
        self.batchSize = batchSize
        self.pollTimeoutMs = pollTimeoutMs
    }

    /// Every property in the order it is set: bootstrap and group, defaults, then `properties`
    /// sorted by name.
    var orderedProperties: [(name: String, value: String)] {
        var ordered: [(name: String, value: String)] = [
            ("bootstrap.servers", bootstrap), ("group.id", groupId),
        ]
        ordered += Self.defaultProperties
        ordered += properties.sorted { $0.key < $1.key }.map { (name: $0.key, value: $0.value) }
        return ordered
    }
}

/// A high-level Kafka group consumer (librdkafka's `rd_kafka_consumer_poll` API) that commits
/// only the offsets it is given.
///
/// Not Sendable: one thread owns it and makes every call. librdkafka runs the rebalance and
/// error callbacks inside `poll` and `close` on that thread, so `onRebalance` runs there too.
public final class KafkaConsumer {
    public let settings: KafkaConsumerSettings
    /// The topics of the last `subscribe(_:)`.
    public private(set) var subscription: [String] = []

    /// The rd_kafka_t, or nil once closed.
    private var handle: OpaquePointer?
    private let state: ConsumerCallbackState

    /// Creates the consumer. After `subscribe(_:)`, librdkafka joins the group in the
    /// background and `poll` applies the assignment it receives.
    ///
    /// `onRebalance` runs on the owner thread inside `poll` and `close`. It may call `commit`,
    /// `assignment`, `pause` and `resume`, but not `poll` or `close`. Capture the consumer
    /// weakly in it, or the consumer is never deinitialized.
    public init(settings: KafkaConsumerSettings,
                onRebalance: ((RebalanceEvent) -> Void)? = nil) throws(KafkaError) {
        try Self.validate(settings)
        self.settings = settings
        self.state = ConsumerCallbackState(groupId: settings.groupId)
        state.onRebalance = onRebalance

        let configuration = try makeKafkaConfiguration(settings.orderedProperties)
        rd_kafka_conf_set_log_cb(configuration, kafkaLogCallback)
        rd_kafka_conf_set_rebalance_cb(configuration, consumerRebalanceCallback)
        rd_kafka_conf_set_error_cb(configuration, consumerErrorCallback)
        rd_kafka_conf_set_offset_commit_cb(configuration, consumerOffsetCommitCallback)
        // librdkafka stores this pointer without retaining `state`. That is safe because `self`
        // keeps `state` alive until `close()` has destroyed the handle, and no callback runs
        // after that.
        rd_kafka_conf_set_opaque(configuration, Unmanaged.passUnretained(state).toOpaque())
        let handle = try makeKafkaHandle(RD_KAFKA_CONSUMER, configuration)

        // Route the main queue (error callbacks) into the consumer queue, so that
        // `rd_kafka_consumer_poll` serves every callback on the owner thread.
        rd_kafka_poll_set_consumer(handle)
        self.handle = handle
        Log.shared.info("Kafka consumer created", [
            "group": .string(settings.groupId), "bootstrap": .string(settings.bootstrap),
        ])
        warnIfCooperativeStickyIsUnsafe()
    }

    deinit {
        close()
    }

    /// The callback for assignment changes; see `init(settings:onRebalance:)`.
    public var onRebalance: ((RebalanceEvent) -> Void)? {
        get { state.onRebalance }
        set { state.onRebalance = newValue }
    }

    /// Whether an assignment arrived since the last `subscribe(_:)`, even an empty one (more
    /// members than partitions). It stays true through later rebalances of the same
    /// subscription, so it means the group was joined once, not that the member is in sync now.
    public var isJoined: Bool { state.hasAssignment }

    /// The reason of librdkafka's "all brokers down" error, or nil while at least one broker
    /// responds. `poll` checks again every second while it is set.
    public var brokersDown: String? { state.brokersDown }

    /// The number of consumer errors so far, not counting partition EOF events.
    public var errorCount: Int { state.errorCount }

    /// The latest consumer error, for health reports.
    public var lastError: KafkaError? { state.lastError }

    /// Distinct unavailable-topic errors logged since the last subscribe.
    var reportedTopicErrorCount: Int { state.reportedTopicErrors.count }

    /// Handles an error message as `poll` does. Tests call it with messages they build.
    func recordMessageError(_ message: UnsafeMutablePointer<rd_kafka_message_t>) {
        state.recordMessageError(message)
    }

    // MARK: Subscription

    /// Subscribes to `topics` in place of the previous subscription. An empty list
    /// unsubscribes. The group rebalances on a later `poll`.
    public func subscribe(_ topics: [String]) throws(KafkaError) {
        let handle = try openHandle("rd_kafka_subscribe")
        if topics == subscription { return }

        if topics.isEmpty {
            try check(rd_kafka_unsubscribe(handle), "rd_kafka_unsubscribe",
                      "unsubscribe of group '\(settings.groupId)' failed")
        } else {
            let list = rd_kafka_topic_partition_list_new(Int32(topics.count))!
            defer { rd_kafka_topic_partition_list_destroy(list) }
            for topic in topics {
                // -1 is RD_KAFKA_PARTITION_UA, which lets the group assign the partitions.
                rd_kafka_topic_partition_list_add(list, topic, -1)
            }
            // rd_kafka_subscribe copies the list, so the list stays ours to destroy.
            try check(rd_kafka_subscribe(handle, list), "rd_kafka_subscribe",
                      "subscribe to \(topics) failed")
        }

        subscription = topics
        state.hasAssignment = false
        state.reportedTopicErrors.removeAll()
        Log.shared.info("Kafka consumer subscribed", [
            "group": .string(settings.groupId), "topics": .string(topics.joined(separator: ",")),
        ])
    }

    // MARK: Polling

    /// Returns up to `maxMessages` records, waiting at most `timeoutMs` for the first one and
    /// then taking only what is already fetched. Rebalance and error callbacks run inside.
    ///
    /// Consumer errors are not returned: partition EOF is ignored, an unavailable topic is
    /// logged once per subscription, others are logged (rate-limited) and counted in
    /// `errorCount`. After `close()` this returns an empty array.
    public func poll(maxMessages: Int? = nil, timeoutMs: Int? = nil) -> [KafkaRecord] {
        guard let handle else { return [] }
        precondition(!state.isInsideCallback, "KafkaConsumer.poll called from onRebalance")

        let limit = max(maxMessages ?? settings.batchSize, 1)
        if state.brokersDown != nil {
            probeBrokers(handle)
        }
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: .milliseconds(timeoutMs ?? settings.pollTimeoutMs))
        var records: [KafkaRecord] = []

        while records.count < limit {
            let remaining = milliseconds(clock.now.duration(to: deadline))
            let wait = records.isEmpty ? remaining : 0
            guard let message = rd_kafka_consumer_poll(handle, Int32(clamping: wait)) else {
                if !records.isEmpty || remaining == 0 { break }
                continue
            }
            // The message is ours until rd_kafka_message_destroy, so copy everything out first.
            defer { rd_kafka_message_destroy(message) }

            if message.pointee.err == RD_KAFKA_RESP_ERR_NO_ERROR {
                state.brokersDown = nil
                records.append(makeRecord(message))
            } else {
                state.recordMessageError(message)
            }
        }
        return records
    }

    /// Asks for broker metadata, at most once a second, to learn whether a broker responds
    /// again, because librdkafka reports "all brokers down" but has no event for the way back.
    private func probeBrokers(_ handle: OpaquePointer) {
        let now = ContinuousClock.now
        if let last = state.lastBrokerProbe, last.duration(to: now) < .seconds(1) { return }
        state.lastBrokerProbe = now
        var metadata: UnsafePointer<rd_kafka_metadata>?
        // No topics: the reply lists the brokers only. 200 ms bounds the stall of the loop.
        let code = rd_kafka_metadata(handle, 0, nil, &metadata, 200)
        metadata.map { rd_kafka_metadata_destroy($0) }
        if code == RD_KAFKA_RESP_ERR_NO_ERROR {
            Log.shared.info("a Kafka broker responds again", ["group": .string(settings.groupId)])
            state.brokersDown = nil
        }
    }

    // MARK: Offsets

    /// Sends a commit of `offsets` and returns without waiting for the broker, so a broker that
    /// is down cannot stall the caller. A failed commit shows up later in `takeFailedCommits()`
    /// and the log.
    public func commitAsync(_ offsets: [TopicPartition: Int64]) throws(KafkaError) {
        try commit(offsets, waiting: false)
    }

    /// Returns the partitions whose commit failed since the last call, asynchronous or not, and
    /// clears the list. The failures arrive inside `poll`.
    public func takeFailedCommits() -> Set<TopicPartition> {
        defer { state.failedCommits.removeAll() }
        return state.failedCommits
    }

    /// Commits `offsets` synchronously. Each value is the next offset to consume: the offset
    /// of the last handled message + 1.
    ///
    /// An empty dictionary commits nothing, because `rd_kafka_commit` with no list would commit
    /// the stored offsets of the whole assignment.
    public func commit(_ offsets: [TopicPartition: Int64]) throws(KafkaError) {
        try commit(offsets, waiting: true)
    }

    private func commit(_ offsets: [TopicPartition: Int64], waiting: Bool) throws(KafkaError) {
        let handle = try openHandle("rd_kafka_commit")
        guard !offsets.isEmpty else { return }

        let entries = offsets.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        try withPartitionList(entries) { list throws(KafkaError) in
            // With 0 as the last argument the call waits and sets each partition's error in
            // the list. With 1 it returns at once, and librdkafka keeps a copy of the list.
            try check(rd_kafka_commit(handle, list, waiting ? 0 : 1), "rd_kafka_commit",
                      "commit of \(offsets.count) offsets for group '\(settings.groupId)' failed")
            if waiting {
                try checkEach(readPartitionList(list), "rd_kafka_commit", "commit of offset")
            }
        }
    }

    /// Reads the group's committed offsets of `partitions` from the broker. Partitions without
    /// a committed offset are left out.
    public func committed(_ partitions: [TopicPartition],
                          timeoutMs: Int = 5000) throws(KafkaError) -> [TopicPartition: Int64] {
        let handle = try openHandle("rd_kafka_committed")
        let entries = partitions.map { ($0, Int64(RD_KAFKA_OFFSET_INVALID)) }
        return try withPartitionList(entries) { list throws(KafkaError) in
            try check(rd_kafka_committed(handle, list, Int32(clamping: timeoutMs)),
                      "rd_kafka_committed", "reading committed offsets of group '\(settings.groupId)' failed")
            let read = readPartitionList(list)
            try checkEach(read, "rd_kafka_committed", "reading committed offset")
            var offsets: [TopicPartition: Int64] = [:]
            for entry in read where entry.offset >= 0 {
                offsets[entry.partition] = entry.offset
            }
            return offsets
        }
    }

    // MARK: Flow control and assignment

    /// Stops fetching from `partitions` until `resume(_:)`. Messages already fetched for them
    /// are dropped and fetched again after the resume.
    public func pause(_ partitions: [TopicPartition]) throws(KafkaError) {
        try setFlow(partitions, rd_kafka_pause_partitions, function: "rd_kafka_pause_partitions", action: "pause")
    }

    /// Restarts fetching from `partitions` at the position where it stopped.
    public func resume(_ partitions: [TopicPartition]) throws(KafkaError) {
        try setFlow(partitions, rd_kafka_resume_partitions, function: "rd_kafka_resume_partitions", action: "resume")
    }

    /// Calls librdkafka's pause or resume `call` with `partitions` and checks each one's result.
    private func setFlow(
        _ partitions: [TopicPartition],
        _ call: (OpaquePointer?, UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?) -> rd_kafka_resp_err_t,
        function: String, action: String
    ) throws(KafkaError) {
        let handle = try openHandle(function)
        try withPartitionList(partitions.map { ($0, Int64(RD_KAFKA_OFFSET_INVALID)) }) {
            list throws(KafkaError) in
            try check(call(handle, list), function, "\(action) of \(partitions) failed")
            try checkEach(readPartitionList(list), function, "\(action) of")
        }
    }

    /// Moves the fetch position of assigned partitions, so that the next `poll` returns their
    /// messages from `offsets` on. Used to hand a batch that was abandoned back to the consumer.
    public func seek(_ offsets: [TopicPartition: Int64], timeoutMs: Int = 5_000) throws(KafkaError) {
        guard !offsets.isEmpty else { return }
        let handle = try openHandle("rd_kafka_seek_partitions")
        try withPartitionList(offsets.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }) {
            list throws(KafkaError) in
            if let error = rd_kafka_seek_partitions(handle, list, Int32(timeoutMs)) {
                // The error object is ours to destroy once its text is copied.
                let message = String(cString: rd_kafka_error_string(error))
                rd_kafka_error_destroy(error)
                throw KafkaError(function: "rd_kafka_seek_partitions", message: "seek of \(offsets.keys.sorted()) failed: \(message)")
            }
            try checkEach(readPartitionList(list), "rd_kafka_seek_partitions", "seek of")
        }
    }

    /// Returns the partitions currently assigned, sorted. It returns an empty array when the
    /// consumer is closed or librdkafka fails, which is logged.
    public func assignment() -> [TopicPartition] {
        guard let handle else { return [] }
        return currentAssignment(handle, groupId: settings.groupId)
    }

    /// Returns how many messages each assigned partition is behind its end: the high watermark
    /// minus the consumer's position (offset of the last returned message + 1).
    ///
    /// Reads only local state: the position and librdkafka's cached watermarks, which each
    /// fetch response updates. It sends no request to the broker.
    /// NOTE: partitions without a known position (no message returned since the assignment)
    /// or without a cached high watermark are left out.
    public func lag() -> [TopicPartition: Int64] {
        guard let handle else { return [:] }
        let partitions = currentAssignment(handle, groupId: settings.groupId)
        let positions = withPartitionList(partitions.map { ($0, Int64(RD_KAFKA_OFFSET_INVALID)) }) {
            list in
            _ = rd_kafka_position(handle, list)
            return readPartitionList(list)
        }

        var lags: [TopicPartition: Int64] = [:]
        for entry in positions where entry.offset >= 0 {
            var low: Int64 = 0
            var high: Int64 = 0
            let code = rd_kafka_get_watermark_offsets(handle, entry.partition.topic,
                                                      entry.partition.partition, &low, &high)
            guard code == RD_KAFKA_RESP_ERR_NO_ERROR, high >= 0 else { continue }
            lags[entry.partition] = max(0, high - entry.offset)
        }
        return lags
    }

    // MARK: Closing

    /// Leaves the group and destroys the handle. The final revoke runs `onRebalance`, which
    /// may still commit, but closing commits nothing by itself. Calling it again does nothing.
    public func close() {
        guard let handle else { return }
        precondition(!state.isInsideCallback, "KafkaConsumer.close called from onRebalance")

        let code = rd_kafka_consumer_close(handle)
        if code != RD_KAFKA_RESP_ERR_NO_ERROR {
            Log.shared.warn("Kafka consumer close failed", [
                "group": .string(settings.groupId), "error": .string(errorText(code)),
            ])
        }
        rd_kafka_destroy(handle)
        self.handle = nil
        Log.shared.info("Kafka consumer closed", ["group": .string(settings.groupId)])
    }

    // MARK: Helpers

    private static func validate(_ settings: KafkaConsumerSettings) throws(KafkaError) {
        if settings.bootstrap.isEmpty {
            throw KafkaError(function: "rd_kafka_new", message: "missing Kafka bootstrap servers")
        }
        if settings.groupId.isEmpty {
            throw KafkaError(function: "rd_kafka_new", message: "missing Kafka consumer group id")
        }
        if settings.batchSize < 1 {
            throw KafkaError(function: "rd_kafka_new",
                             message: "invalid batch size \(settings.batchSize): expected 1 or more")
        }
        if settings.pollTimeoutMs < 0 {
            throw KafkaError(function: "rd_kafka_new",
                             message: "invalid poll timeout \(settings.pollTimeoutMs) ms: expected 0 or more")
        }
    }

    /// See `KafkaConsumerSettings.defaultProperties` for the abort this warns about.
    private func warnIfCooperativeStickyIsUnsafe() {
        let strategy = settings.properties["partition.assignment.strategy"] ?? ""
        let firstFixedVersion: Int32 = 0x0203_00ff
        guard strategy.contains("cooperative-sticky"), rd_kafka_version() < firstFixedVersion else { return }
        Log.shared.warn("cooperative-sticky can abort the process on close before the first assignment", [
            "group": .string(settings.groupId),
            "librdkafka": .string(String(cString: rd_kafka_version_str())),
            "fixed_in": "2.3.0",
        ])
    }

    private func openHandle(_ function: String) throws(KafkaError) -> OpaquePointer {
        guard let handle else {
            throw KafkaError(function: function,
                             message: "Kafka consumer of group '\(settings.groupId)' is closed")
        }
        return handle
    }
}

// MARK: - Records

/// Copies key, payload, headers and metadata of a consumed message into Swift values.
private func makeRecord(_ message: UnsafeMutablePointer<rd_kafka_message_t>) -> KafkaRecord {
    let fields = message.pointee
    let topic = fields.rkt.map { String(cString: rd_kafka_topic_name($0)) } ?? ""
    let payload = fields.payload.map { copyBytes($0, fields.len) } ?? []
    let key = fields.key.map { copyBytes($0, fields.key_len) }

    var timestampType = RD_KAFKA_TIMESTAMP_NOT_AVAILABLE
    let timestamp = rd_kafka_message_timestamp(message, &timestampType)

    return KafkaRecord(topic: topic, partition: fields.partition, offset: fields.offset, key: key,
                       timestampMs: timestamp >= 0 ? timestamp : nil,
                       headers: copyHeaders(message), payload: payload)
}

private func copyBytes(_ pointer: UnsafeRawPointer, _ count: Int) -> [UInt8] {
    Array(UnsafeRawBufferPointer(start: pointer, count: count))
}

/// Copies the headers in wire order. A header with a null value gets a nil value.
private func copyHeaders(_ message: UnsafeMutablePointer<rd_kafka_message_t>)
    -> [(name: String, value: [UInt8]?)]
{
    // The header list belongs to the message and is freed with it.
    var headers: OpaquePointer?
    guard rd_kafka_message_headers(message, &headers) == RD_KAFKA_RESP_ERR_NO_ERROR,
          let headers else { return [] }

    var copies: [(name: String, value: [UInt8]?)] = []
    var index = 0
    var name: UnsafePointer<CChar>?
    var value: UnsafeRawPointer?
    var size = 0
    while rd_kafka_header_get_all(headers, index, &name, &value, &size) == RD_KAFKA_RESP_ERR_NO_ERROR {
        copies.append((name.map { String(cString: $0) } ?? "", value.map { copyBytes($0, size) }))
        index += 1
    }
    return copies
}

// MARK: - Callbacks

/// Consumer state that librdkafka's callbacks reach through the configuration's opaque pointer.
///
/// Only the owner thread touches it, because librdkafka runs the rebalance and error callbacks
/// inside `rd_kafka_consumer_poll` and `rd_kafka_consumer_close`, which only the owner calls.
private final class ConsumerCallbackState {
    let groupId: String
    var onRebalance: ((RebalanceEvent) -> Void)?
    var hasAssignment = false
    var isInsideCallback = false
    var errorCount = 0
    var lastError: KafkaError?
    var brokersDown: String?
    var lastBrokerProbe: ContinuousClock.Instant?
    var failedCommits: Set<TopicPartition> = []
    /// "topic/code" pairs already logged since the last subscribe.
    var reportedTopicErrors: Set<String> = []

    init(groupId: String) {
        self.groupId = groupId
    }

    func report(_ event: RebalanceEvent) {
        guard let onRebalance else { return }
        isInsideCallback = true
        defer { isInsideCallback = false }
        onRebalance(event)
    }

    /// Logs and counts an error returned in place of a message by `rd_kafka_consumer_poll`.
    func recordMessageError(_ message: UnsafeMutablePointer<rd_kafka_message_t>) {
        let code = message.pointee.err
        if code == RD_KAFKA_RESP_ERR__PARTITION_EOF { return }
        if code == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN {
            // Client errors reach the application either through the error callback or, from
            // rd_kafka_consumer_poll, as an error message: treat both alike.
            recordClientError(nil, code: code, reason: String(cString: rd_kafka_message_errstr(message)))
            return
        }

        let topic = message.pointee.rkt.map { String(cString: rd_kafka_topic_name($0)) } ?? ""
        let detail = String(cString: rd_kafka_message_errstr(message))
        let error = KafkaError(function: "rd_kafka_consumer_poll", code: code.rawValue,
                               message: "consume from '\(topic)' failed: \(detail)")
        errorCount += 1
        lastError = error

        if isTopicError(code) {
            // The same error can return on every metadata refresh, so log one line per topic.
            guard reportedTopicErrors.insert("\(topic)/\(code.rawValue)").inserted else { return }
            Log.shared.warn("Kafka topic not available", [
                "group": .string(groupId), "kafka.topic": .string(topic),
                "error": .string(detail), "kafka.error_code": .string(errorName(code)),
            ])
            return
        }
        Log.shared.warn("Kafka consume error", [
            "group": .string(groupId), "kafka.topic": .string(topic),
            "kafka.partition": .int(message.pointee.partition),
            "error": .string(detail), "kafka.error_code": .string(errorName(code)),
        ])
    }

    /// Logs and counts an error that librdkafka reports through the error callback.
    func recordClientError(_ handle: OpaquePointer?, code: rd_kafka_resp_err_t, reason: String) {
        var detail = reason
        var level = LogLevel.warn
        if code == RD_KAFKA_RESP_ERR__FATAL, let handle {
            var buffer = [CChar](repeating: 0, count: 512)
            let underlying = rd_kafka_fatal_error(handle, &buffer, buffer.count)
            detail = "fatal \(errorName(underlying)): \(text(ofBuffer: buffer))"
            level = .error
        }
        errorCount += 1
        lastError = KafkaError(function: "rd_kafka_consumer_poll", code: code.rawValue,
                               message: "Kafka consumer error: \(detail)")
        if code == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN {
            brokersDown = detail
            lastBrokerProbe = ContinuousClock.now
        }
        Log.shared.write(level, "Kafka client error", [
            "group": .string(groupId), "error": .string(detail),
            "kafka.error_code": .string(errorName(code)),
        ])
    }

    private func isTopicError(_ code: rd_kafka_resp_err_t) -> Bool {
        code == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART || code == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC
            || code == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION
            || code == RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED
    }
}

/// librdkafka's rebalance callback. It applies the change with the call that matches the
/// group's protocol (EAGER: `rd_kafka_assign`; COOPERATIVE: `rd_kafka_incremental_assign`
/// and `_unassign`) and reports it to `onRebalance`: after assigning, and before revoking so
/// that the owner can still commit for the revoked partitions.
private func consumerRebalanceCallback(
    handle: OpaquePointer?, code: rd_kafka_resp_err_t,
    partitions: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?,
    opaque: UnsafeMutableRawPointer?
) {
    guard let handle, let opaque else { return }
    let state = Unmanaged<ConsumerCallbackState>.fromOpaque(opaque).takeUnretainedValue()
    let protocolName = rd_kafka_rebalance_protocol(handle).map { String(cString: $0) } ?? "NONE"
    let cooperative = protocolName == "COOPERATIVE"
    let changed = partitions.map { readPartitionList($0).map(\.partition) } ?? []
    let fields: KeyValuePairs<String, LogValue> = [
        "group": .string(state.groupId), "kafka.partitions": .string(describe(changed)),
        "kafka.rebalance_protocol": .string(protocolName),
    ]

    switch code {
    case RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS:
        applyAssignment(handle, partitions, cooperative: cooperative, groupId: state.groupId)
        state.hasAssignment = true
        Log.shared.info("Kafka partitions assigned", fields)
        state.report(.assigned(changed))

    case RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS:
        let lost = rd_kafka_assignment_lost(handle) != 0
        Log.shared.info(lost ? "Kafka partitions lost" : "Kafka partitions revoked", fields)
        state.report(.revoked(changed, lost: lost))
        applyRevocation(handle, partitions, cooperative: cooperative, groupId: state.groupId)

    default:
        // librdkafka requires the application to drop the whole assignment to resynchronise.
        let current = currentAssignment(handle, groupId: state.groupId)
        Log.shared.warn("Kafka rebalance failed", [
            "group": .string(state.groupId), "error": .string(errorText(code)),
            "kafka.partitions": .string(describe(current)),
        ])
        state.report(.revoked(current, lost: true))
        _ = rd_kafka_assign(handle, nil)
    }
}

private func applyAssignment(_ handle: OpaquePointer,
                             _ partitions: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?,
                             cooperative: Bool, groupId: String) {
    if cooperative {
        logAssignmentError(rd_kafka_incremental_assign(handle, partitions), groupId: groupId)
    } else {
        logAssignmentError(rd_kafka_assign(handle, partitions), groupId: groupId)
    }
}

private func applyRevocation(_ handle: OpaquePointer,
                             _ partitions: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?,
                             cooperative: Bool, groupId: String) {
    if cooperative {
        logAssignmentError(rd_kafka_incremental_unassign(handle, partitions), groupId: groupId)
    } else {
        logAssignmentError(rd_kafka_assign(handle, nil), groupId: groupId)
    }
}

/// Logs a failed incremental (un)assign and destroys the error object, which the caller owns.
private func logAssignmentError(_ error: OpaquePointer?, groupId: String) {
    guard let error else { return }
    defer { rd_kafka_error_destroy(error) }
    Log.shared.error("Kafka assignment change failed", [
        "group": .string(groupId), "error": .string(String(cString: rd_kafka_error_string(error))),
    ])
}

private func logAssignmentError(_ code: rd_kafka_resp_err_t, groupId: String) {
    guard code != RD_KAFKA_RESP_ERR_NO_ERROR else { return }
    Log.shared.error("Kafka assignment change failed", [
        "group": .string(groupId), "error": .string(errorText(code)),
    ])
}

/// librdkafka's error callback for client-level errors such as all brokers down. librdkafka
/// retries these by itself. Only `RD_KAFKA_RESP_ERR__FATAL` ends the consumer.
private func consumerErrorCallback(handle: OpaquePointer?, code: Int32,
                                   reason: UnsafePointer<CChar>?, opaque: UnsafeMutableRawPointer?) {
    guard let opaque else { return }
    let state = Unmanaged<ConsumerCallbackState>.fromOpaque(opaque).takeUnretainedValue()
    state.recordClientError(handle, code: rd_kafka_resp_err_t(rawValue: code),
                            reason: reason.map { String(cString: $0) } ?? "")
}

/// librdkafka's offset commit callback, served inside `rd_kafka_consumer_poll` on the owner
/// thread. It records and logs failed commits. A commit with nothing to commit is no failure.
private func consumerOffsetCommitCallback(
    handle: OpaquePointer?, code: rd_kafka_resp_err_t,
    offsets: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?, opaque: UnsafeMutableRawPointer?
) {
    guard let opaque, code != RD_KAFKA_RESP_ERR__NO_OFFSET else { return }
    let state = Unmanaged<ConsumerCallbackState>.fromOpaque(opaque).takeUnretainedValue()
    let entries = offsets.map(readPartitionList) ?? []
    let failed = entries.filter { code != RD_KAFKA_RESP_ERR_NO_ERROR || $0.error != RD_KAFKA_RESP_ERR_NO_ERROR }
    guard !failed.isEmpty else { return }
    state.failedCommits.formUnion(failed.map(\.partition))
    let reason = code != RD_KAFKA_RESP_ERR_NO_ERROR ? code : failed[0].error
    Log.shared.warn("Kafka offset commit failed; it is sent again with the next commit", [
        "group": .string(state.groupId), "kafka.partitions": .string(describe(failed.map(\.partition))),
        "error": .string(errorText(reason)),
    ])
}

private func currentAssignment(_ handle: OpaquePointer, groupId: String) -> [TopicPartition] {
    var list: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?
    let code = rd_kafka_assignment(handle, &list)
    // On success the list is ours to destroy.
    defer { list.map { rd_kafka_topic_partition_list_destroy($0) } }
    guard code == RD_KAFKA_RESP_ERR_NO_ERROR, let list else {
        Log.shared.warn("Kafka assignment read failed", [
            "group": .string(groupId), "error": .string(errorText(code)),
        ])
        return []
    }
    return readPartitionList(list).map(\.partition).sorted()
}

private func describe(_ partitions: [TopicPartition]) -> String {
    partitions.map(\.description).joined(separator: ",")
}

private func milliseconds(_ duration: Duration) -> Int {
    let (seconds, attoseconds) = duration.components
    return max(0, Int(seconds) * 1000 + Int(attoseconds / 1_000_000_000_000_000))
}

// MARK: - librdkafka helpers shared by the consumer, the producer and the dev broker

/// A failed librdkafka call or an invalid Kafka setting.
public struct KafkaError: Error, Sendable, CustomStringConvertible {
    /// The librdkafka function that failed or that the invalid value was meant for.
    public var function: String
    /// The `rd_kafka_resp_err_t` value, when librdkafka returned one.
    public var code: Int32?
    /// The failure, the value involved and librdkafka's explanation.
    public var message: String

    public init(function: String, code: Int32? = nil, message: String) {
        self.function = function
        self.code = code
        self.message = message
    }

    public var description: String { message }
}

/// Throws unless `code` is `RD_KAFKA_RESP_ERR_NO_ERROR`, with librdkafka's text in the message.
func check(_ code: rd_kafka_resp_err_t, _ function: String, _ context: String) throws(KafkaError) {
    guard code != RD_KAFKA_RESP_ERR_NO_ERROR else { return }
    throw KafkaError(function: function, code: code.rawValue, message: "\(context): \(errorText(code))")
}

/// Throws the first per-partition error of a list that librdkafka filled in.
func checkEach(_ entries: [PartitionListEntry], _ function: String,
               _ context: String) throws(KafkaError) {
    guard let failed = entries.first(where: { $0.error != RD_KAFKA_RESP_ERR_NO_ERROR }) else { return }
    throw KafkaError(function: function, code: failed.error.rawValue,
                     message: "\(context) \(failed.partition) failed: \(errorText(failed.error))")
}

/// librdkafka's name and text of an error code, e.g. "UNKNOWN_TOPIC_OR_PART (Broker: Unknown
/// topic or partition)".
func errorText(_ code: rd_kafka_resp_err_t) -> String {
    "\(errorName(code)) (\(String(cString: rd_kafka_err2str(code))))"
}

func errorName(_ code: rd_kafka_resp_err_t) -> String {
    String(cString: rd_kafka_err2name(code))
}

/// Decodes the NUL-terminated text in a buffer that librdkafka filled in.
func text(ofBuffer buffer: [CChar]) -> String {
    let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
    return String(decoding: bytes, as: UTF8.self)
}

/// Creates an `rd_kafka_conf_t` with `properties` set in order. The caller owns the result
/// until `makeKafkaHandle` takes it. On a throw nothing is left to free.
func makeKafkaConfiguration(_ properties: [(name: String, value: String)]) throws(KafkaError) -> OpaquePointer {
    let configuration = rd_kafka_conf_new()!
    var errorBuffer = [CChar](repeating: 0, count: 512)
    for (name, value) in properties {
        let result = rd_kafka_conf_set(configuration, name, value, &errorBuffer, errorBuffer.count)
        guard result == RD_KAFKA_CONF_OK else {
            rd_kafka_conf_destroy(configuration)
            let shown = isSecretProperty(name) ? "<redacted>" : value
            throw KafkaError(function: "rd_kafka_conf_set", code: nil, message:
                "invalid librdkafka property '\(name)'='\(shown)': \(text(ofBuffer: errorBuffer))")
        }
    }
    return configuration
}

/// Whether a property value must stay out of errors and logs (passwords, keys, tokens).
private func isSecretProperty(_ name: String) -> Bool {
    let lowered = name.lowercased()
    return lowered.contains("password") || lowered.contains("secret")
        || lowered.hasPrefix("ssl.key") || lowered == "sasl.oauthbearer.config"
}

/// Creates a client. librdkafka owns `configuration` once this returns. When it throws, this
/// function has destroyed `configuration`, because `rd_kafka_new` leaves it to the caller on
/// failure.
func makeKafkaHandle(_ type: rd_kafka_type_t, _ configuration: OpaquePointer) throws(KafkaError) -> OpaquePointer {
    var errorBuffer = [CChar](repeating: 0, count: 512)
    guard let handle = rd_kafka_new(type, configuration, &errorBuffer, errorBuffer.count) else {
        rd_kafka_conf_destroy(configuration)
        throw KafkaError(function: "rd_kafka_new",
                         message: "Kafka client creation failed: \(text(ofBuffer: errorBuffer))")
    }
    return handle
}

/// One element of an `rd_kafka_topic_partition_list_t`, copied out.
struct PartitionListEntry {
    var partition: TopicPartition
    var offset: Int64
    var error: rd_kafka_resp_err_t
}

/// Calls `body` with a new list of `entries` (partition, offset), then destroys the list.
/// The librdkafka functions that take a list copy what they keep.
func withPartitionList<Result, Failure: Error>(
    _ entries: [(TopicPartition, Int64)],
    _ body: (UnsafeMutablePointer<rd_kafka_topic_partition_list_t>) throws(Failure) -> Result
) throws(Failure) -> Result {
    let list = rd_kafka_topic_partition_list_new(Int32(entries.count))!
    defer { rd_kafka_topic_partition_list_destroy(list) }
    for (partition, offset) in entries {
        let element = rd_kafka_topic_partition_list_add(list, partition.topic, partition.partition)!
        element.pointee.offset = offset
    }
    return try body(list)
}

func readPartitionList(_ list: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>) -> [PartitionListEntry] {
    let count = Int(list.pointee.cnt)
    guard count > 0, let elements = list.pointee.elems else { return [] }
    return (0..<count).map { index in
        let element = elements[index]
        return PartitionListEntry(partition: TopicPartition(String(cString: element.topic),
                                                            element.partition),
                                  offset: element.offset, error: element.err)
    }
}

/// Sends librdkafka's log lines to `Log.shared`, which is thread-safe. librdkafka calls it from
/// its own threads, so it must not call back into librdkafka.
func kafkaLogCallback(handle: OpaquePointer?, level: Int32, facility: UnsafePointer<CChar>?,
                      text: UnsafePointer<CChar>?) {
    // librdkafka uses syslog levels: 0-2 critical, 3 errors, 4 warnings, 5-6 notices and
    // info, 7 debug. It logs failed connections, which it retries by itself, at level 3, so
    // they become warnings here. Fatal errors reach the consumer's error callback.
    let logLevel: LogLevel = switch level {
    case ...2: .error
    case 3...4: .warn
    case 5...6: .info
    default: .debug
    }
    let facilityName = facility.map { String(cString: $0) } ?? ""
    // The facility is part of the message so that the rate limit counts each kind apart.
    Log.shared.write(logLevel, "librdkafka \(facilityName)", [
        "detail": .string(text.map { String(cString: $0) } ?? ""),
    ])
}
