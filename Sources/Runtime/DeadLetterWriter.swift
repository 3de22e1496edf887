import CRdKafka
import HostAPI

/// Writes events that a projection could not handle to a dead-letter topic and tracks which
/// of them the broker has acknowledged, so that the worker commits a source offset only after
/// its dead letter is stored.
///
/// `add` only queues. `flush` produces what is queued and waits for the delivery reports. A
/// dead letter leaves the queue only when its delivery is acknowledged. A failed one stays
/// queued and is produced again by the next `flush`, so none is dropped before `close`, but a
/// retry can store the same dead letter twice (at-least-once delivery). One case is a delivery
/// that librdkafka reports as timed out after the broker had already stored it.
///
/// Not Sendable: the worker thread owns it, and librdkafka runs the delivery callbacks on that
/// thread inside `flush`.
public final class DeadLetterWriter {
    /// The placeholder in the topic template for the source topic.
    public static let topicPlaceholder = "{topic}"

    /// Header names, in the order they follow the original headers.
    public enum Header {
        public static let projection = "x-dead-letter-projection"
        public static let projectionVersion = "x-dead-letter-projection-version"
        public static let phase = "x-dead-letter-phase"
        public static let error = "x-dead-letter-error"
        public static let source = "x-dead-letter-source"
        public static let topic = "x-dead-letter-topic"
        public static let partition = "x-dead-letter-partition"
        public static let offset = "x-dead-letter-offset"
        public static let timestamp = "x-dead-letter-timestamp-ms"
        /// The size in bytes of the original value, present when the broker rejected the dead
        /// letter as too large and it was written again without its value.
        public static let valueDropped = "x-dead-letter-value-dropped-bytes"
    }

    /// The maximum size of the `x-dead-letter-error` value in bytes. A longer error message is
    /// cut at a character boundary.
    public static let maxErrorBytes = 1024

    /// Properties set before the caller's, which override them. Idempotence implies
    /// `acks=all` and keeps librdkafka's own retries from writing a message twice. The mock
    /// cluster of librdkafka 2.0.2 grants producer ids, so it works in tests too. A small
    /// `linger.ms` keeps the wait in `flush` short.
    public static let defaultProperties: [String: String] = [
        "enable.idempotence": "true",
        "linger.ms": "5",
    ]

    /// The template with `{topic}` for the source topic, such as `{topic}.dlq`.
    public let topicTemplate: String

    private let producer: KafkaProducer
    /// Dead letters to produce on the next `flush`, in the order they were added.
    private var queued: [DeadLetter] = []
    /// Dead letters produced and waiting for their delivery report, by delivery id.
    private var inFlight: [Int: DeadLetter] = [:]
    private var nextSequence = 1

    /// Creates the producer. `properties` are librdkafka properties set verbatim after
    /// `defaultProperties`, such as the security settings of the source cluster. Consumer
    /// properties among them are left out (see `producerProperties(of:)`).
    ///
    /// Throws when the template is empty, is `{topic}` alone (dead letters would go back to the
    /// source topic), or would make topic names with characters that Kafka rejects. A template
    /// without `{topic}` sends every dead letter to one topic, which must not be a topic the
    /// worker consumes.
    public init(bootstrap: String, properties: [String: String],
                topicTemplate: String) throws(KafkaError) {
        try Self.validate(topicTemplate: topicTemplate)
        self.topicTemplate = topicTemplate
        let merged = Self.defaultProperties.merging(Self.producerProperties(of: properties)) { _, caller in caller }
        producer = try KafkaProducer(bootstrap: bootstrap, properties: merged)
    }

    /// `properties` without the ones only a consumer reads. `kafka.properties` serves the
    /// consumer and this producer alike, and librdkafka logs a CONFWARN line for every consumer
    /// property a producer is given.
    static func producerProperties(of properties: [String: String]) -> [String: String] {
        properties.filter { name, _ in
            !consumerOnlyProperties.contains(name) && !consumerOnlyPrefixes.contains { name.hasPrefix($0) }
        }
    }

    /// Consumer properties of librdkafka 2.0 that `consumerOnlyPrefixes` does not cover.
    private static let consumerOnlyProperties: Set<String> = [
        "session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy",
        "coordinator.query.interval.ms", "max.poll.interval.ms", "queued.min.messages",
        "queued.max.messages.kbytes", "max.partition.fetch.bytes", "isolation.level",
        "consume.callback.max.messages", "enable.partition.eof", "check.crcs",
        "offset.store.method", "offset.store.path", "offset.store.sync.interval.ms",
        "consume_cb", "rebalance_cb", "offset_commit_cb",
    ]
    private static let consumerOnlyPrefixes = ["group.", "auto.", "enable.auto.", "fetch."]

    /// The number of dead letters not yet acknowledged by the broker: queued, failed or in
    /// flight.
    public var pendingCount: Int { queued.count + inFlight.count }

    /// Returns the dead-letter topic for events from `sourceTopic`: the template with every
    /// `{topic}` replaced by it.
    public func deadLetterTopic(for sourceTopic: String) -> String {
        topicTemplate.replacing(Self.topicPlaceholder, with: sourceTopic)
    }

    /// Queues a dead letter for `message`. It has the original key, value and headers, then
    /// the `Header` fields. `x-dead-letter-timestamp-ms` is left out when the source message
    /// has no timestamp. A message that already carries dead-letter headers, because it was
    /// replayed from a dead-letter topic, keeps them in front of the new ones, so a reader
    /// takes the last header of each name.
    public func add(_ message: EventMessage, projection: String, version: String,
                    failure: ProjectionFailure) {
        var headers = message.headers
        headers += Self.deadLetterHeaders(message, projection: projection, version: version,
                                          failure: failure)
        let letter = DeadLetter(sequence: nextSequence, topic: deadLetterTopic(for: message.topic),
                                key: message.key, value: message.payload, headers: headers)
        nextSequence += 1
        queued.append(letter)

        Log.shared.debug("dead letter queued", [
            "projection": .string(projection), "phase": .string(failure.phase.rawValue),
            "kafka.topic": .string(message.topic), "kafka.partition": .int(message.partition),
            "kafka.offset": .int(message.offset), "dead_letter.topic": .string(letter.topic),
        ])
    }

    /// Produces every queued dead letter and waits up to `timeoutMs` for all delivery reports.
    ///
    /// Throws when any dead letter is not acknowledged by then. The error gives their count
    /// and the first failure, and they all stay pending. Failed ones are produced again by the
    /// next call, and those still in flight (no report yet, such as while the broker is down)
    /// are waited for without producing them again. Acknowledged ones are never sent again, so
    /// after a partial failure only a failed dead letter that the broker had stored anyway
    /// (a lost response, a timeout) is duplicated.
    ///
    /// A permanent error, such as a missing ACL for the dead-letter topic, fails every call
    /// until it is fixed. The caller should keep retrying, because dropping would lose the
    /// event.
    public func flush(timeoutMs: Int) throws(KafkaError) {
        guard pendingCount > 0 else { return }
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: .milliseconds(max(timeoutMs, 0)))

        let produceError = produceQueued(until: deadline)
        let remaining = clock.now.duration(to: deadline)
        let reports = try producer.waitForDeliveryReports(timeoutMs: Self.milliseconds(remaining))
        let failures = apply(reports)

        guard pendingCount > 0 else {
            Log.shared.debug("dead letters written", ["count": .int(reports.count)])
            return
        }
        throw flushError(timeoutMs: timeoutMs, failedCount: failures.count,
                         firstError: produceError ?? failures.first)
    }

    /// Forgets every pending dead letter, for a batch that the worker drops and consumes
    /// again, which queues them again. Dead letters already handed to librdkafka are not
    /// recalled and may still be stored, so an event can get two dead letters. Their delivery
    /// reports are ignored.
    public func discardPending() {
        guard pendingCount > 0 else { return }
        Log.shared.info("dead letters discarded", [
            "count": .int(pendingCount), "in_flight": .int(inFlight.count),
        ])
        queued.removeAll()
        inFlight.removeAll()
    }

    /// Destroys the producer. Dead letters still pending are dropped and logged, so call
    /// `flush` first, and do not commit the source offsets of dropped ones. Calling it again
    /// does nothing.
    public func close() {
        if pendingCount > 0 {
            Log.shared.warn("dead-letter writer closed with dead letters not acknowledged", [
                "count": .int(pendingCount),
            ])
            queued.removeAll()
            inFlight.removeAll()
        }
        producer.close()
    }

    // MARK: Helpers

    /// Produces the queued dead letters in order and moves each into `inFlight`. Stops at the
    /// first failure, which it returns, and leaves that one and the rest queued.
    private func produceQueued(until deadline: ContinuousClock.Instant) -> KafkaError? {
        let clock = ContinuousClock()
        var producedCount = 0
        defer { queued.removeFirst(producedCount) }

        for letter in queued {
            // Waiting for room in a full local queue must not outlast the caller's timeout.
            producer.queueFullTimeoutMs = Self.milliseconds(clock.now.duration(to: deadline))
            do {
                try producer.produce(topic: letter.topic, key: letter.key, value: letter.value,
                                     headers: letter.headers, deliveryId: letter.sequence)
            } catch where Self.isTooLarge(error) && !letter.valueDropped {
                // Rejected before sending: write it again at once, without the value.
                queued[producedCount] = letter.droppingValue(because: error)
                return error
            } catch {
                return error
            }
            inFlight[letter.sequence] = letter
            producedCount += 1
        }
        return nil
    }

    /// Removes acknowledged dead letters from `inFlight` and puts failed ones back in the
    /// queue in their original order. Returns the failures.
    private func apply(_ reports: [DeliveryReport]) -> [KafkaError] {
        var failures: [KafkaError] = []
        for report in reports {
            guard let letter = inFlight.removeValue(forKey: report.deliveryId) else { continue }
            if let error = report.error {
                failures.append(error)
                // A dead letter too large for the topic would fail forever and stall every
                // partition, so it goes again with the value left out and its size in a header.
                let tooLarge = Self.isTooLarge(error) && !letter.valueDropped
                queued.append(tooLarge ? letter.droppingValue(because: error) : letter)
            }
        }
        if !failures.isEmpty {
            queued.sort { $0.sequence < $1.sequence }
        }
        return failures
    }

    /// Whether the broker or librdkafka rejected a message for its size (librdkafka uses the
    /// broker's code for its own `message.max.bytes` check too).
    static func isTooLarge(_ error: KafkaError) -> Bool {
        error.code == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE.rawValue
    }

    private func flushError(timeoutMs: Int, failedCount: Int, firstError: KafkaError?) -> KafkaError {
        let unsentCount = pendingCount - failedCount - inFlight.count
        let counts = "\(failedCount) failed, \(inFlight.count) without a delivery report, "
            + "\(unsentCount) not produced"
        let cause = firstError.map { "first error: \($0.message)" } ?? "flush timed out"
        return KafkaError(
            function: firstError?.function ?? "rd_kafka_flush",
            code: firstError?.code ?? RD_KAFKA_RESP_ERR__TIMED_OUT.rawValue,
            message: "\(pendingCount) dead letters not acknowledged after \(timeoutMs) ms "
                + "(\(counts)), \(cause). They stay queued for the next flush")
    }

    private static func deadLetterHeaders(_ message: EventMessage, projection: String, version: String,
                                          failure: ProjectionFailure) -> [(name: String, value: [UInt8]?)] {
        let source = failure.line.map { "\(failure.file):\($0)" } ?? failure.file
        var fields: [(String, String)] = [
            (Header.projection, projection),
            (Header.projectionVersion, version),
            (Header.phase, failure.phase.rawValue),
            (Header.error, truncated(failure.message, maxBytes: maxErrorBytes)),
            (Header.source, source),
            (Header.topic, message.topic),
            (Header.partition, String(message.partition)),
            (Header.offset, String(message.offset)),
        ]
        if let timestampMs = message.timestampMs {
            fields.append((Header.timestamp, String(timestampMs)))
        }
        return fields.map { (name: $0.0, value: Array($0.1.utf8)) }
    }

    /// Returns the longest prefix of `text` of at most `maxBytes` UTF-8 bytes that ends on a
    /// character boundary.
    static func truncated(_ text: String, maxBytes: Int) -> String {
        guard text.utf8.count > maxBytes else { return text }
        var byteCount = 0
        var end = text.startIndex
        for index in text.indices {
            let next = text.index(after: index)
            byteCount += text.utf8.distance(from: index, to: next)
            guard byteCount <= maxBytes else { break }
            end = next
        }
        return String(text[..<end])
    }

    /// Checks the template against Kafka's rules for topic names (1 to 249 characters from
    /// A-Z, a-z, 0-9, '.', '_' and '-', and not "." or ".."), with a one-letter source topic.
    static func validate(topicTemplate template: String) throws(KafkaError) {
        let example = "{topic}.dlq"
        func invalid(_ reason: String) -> KafkaError {
            KafkaError(function: "rd_kafka_produceva", message:
                "invalid dead-letter topic template '\(template)': \(reason). Use a topic name in "
                + "which \(topicPlaceholder) is replaced by the source topic, such as '\(example)'")
        }
        if template.isEmpty {
            throw invalid("it is empty")
        }
        if template == topicPlaceholder {
            throw invalid("it names the source topic itself")
        }
        let shortest = template.replacing(topicPlaceholder, with: "t")
        let allowed = shortest.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5a)
                || (byte >= 0x61 && byte <= 0x7a) || byte == 0x2e || byte == 0x5f || byte == 0x2d
        }
        guard allowed else {
            throw invalid("outside \(topicPlaceholder) only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")
        }
        guard shortest != ".", shortest != ".." else {
            throw invalid("'.' and '..' are not valid topic names")
        }
        guard shortest.utf8.count <= 249 else {
            throw invalid("topic names would be longer than Kafka's limit of 249 characters")
        }
    }

    private static func milliseconds(_ duration: Duration) -> Int {
        let (seconds, attoseconds) = duration.components
        return max(0, Int(seconds) * 1000 + Int(attoseconds / 1_000_000_000_000_000))
    }
}

/// One dead letter as it is produced.
private struct DeadLetter {
    /// The order of `add` calls, also the delivery id.
    var sequence: Int
    var topic: String
    var key: [UInt8]?
    var value: [UInt8]
    var headers: [(name: String, value: [UInt8]?)]
    var valueDropped = false

    /// The same dead letter without its value, which the broker rejected as too large.
    func droppingValue(because error: KafkaError) -> DeadLetter {
        var smaller = self
        smaller.value = []
        smaller.valueDropped = true
        smaller.headers.append((DeadLetterWriter.Header.valueDropped, Array(String(value.count).utf8)))
        let offset = headers.last { $0.name == DeadLetterWriter.Header.offset }?.value ?? []
        Log.shared.error("dead letter too large for its topic; writing it without the event value", [
            "topic": .string(topic), "kafka.offset": .string(String(decoding: offset, as: UTF8.self)),
            "value_bytes": .int(value.count), "error": .string(error.message),
        ])
        return smaller
    }
}
