import CRdKafka
import Foundation
import HostAPI
@testable import Runtime
import XCTest

/// The dead-letter writer against librdkafka's mock cluster in this process, read back with a
/// group consumer. Every broker listens on 127.0.0.1.
///
/// Tests that only produce share one broker, with their own topics. Tests that take a broker
/// down start their own.
final class DeadLetterWriterTests: XCTestCase {
    nonisolated(unsafe) private static var sharedBroker: DevBroker?

    override class func tearDown() {
        sharedBroker?.stop()
        sharedBroker = nil
        super.tearDown()
    }

    private var broker: DevBroker {
        get throws {
            if let broker = Self.sharedBroker { return broker }
            let broker = try DevBroker()
            Self.sharedBroker = broker
            return broker
        }
    }

    // MARK: Content

    func testDeadLetterKeepsPayloadAndAddsHeaders() throws {
        let broker = try broker
        try broker.createTopic(.init(name: "orders.dlq", partitions: 1))
        let writer = try DeadLetterWriter(bootstrap: broker.bootstrap, properties: [:],
                                          topicTemplate: "{topic}.dlq")
        defer { writer.close() }

        let payload = Array(#"{"id":7,"price":"#.utf8)
        let message = EventMessage(topic: "orders", partition: 3, offset: 41,
                                   key: Array("order-7".utf8), timestampMs: 1_700_000_000_123,
                                   headers: [("trace", Array("abc".utf8)), ("empty", nil)],
                                   payload: payload)
        let failure = ProjectionFailure(phase: .decode, projection: "orders", file: "projections/orders.lua",
                                        line: 12, message: "invalid JSON at byte 16")
        writer.add(message, projection: "orders", version: "v-1234", failure: failure)
        XCTAssertEqual(writer.pendingCount, 1)

        try writer.flush(timeoutMs: 10_000)
        XCTAssertEqual(writer.pendingCount, 0)

        let records = try readBack(broker, topics: ["orders.dlq"], count: 1)
        XCTAssertEqual(records.count, 1)
        let record = try XCTUnwrap(records.first)
        XCTAssertEqual(record.topic, "orders.dlq")
        XCTAssertEqual(record.payload, payload)
        XCTAssertEqual(record.key, Array("order-7".utf8))
        XCTAssertEqual(record.headers.map(\.name), [
            "trace", "empty",
            "x-dead-letter-projection", "x-dead-letter-projection-version", "x-dead-letter-phase",
            "x-dead-letter-error", "x-dead-letter-source", "x-dead-letter-topic",
            "x-dead-letter-partition", "x-dead-letter-offset", "x-dead-letter-timestamp-ms",
        ])
        XCTAssertEqual(record.headers[0].value, Array("abc".utf8))
        XCTAssertNil(record.headers[1].value)
        XCTAssertEqual(record.headers.dropFirst(2).map { text($0.value) }, [
            "orders", "v-1234", "decode", "invalid JSON at byte 16", "projections/orders.lua:12",
            "orders", "3", "41", "1700000000123",
        ])
    }

    func testDeadLetterWithoutOptionalFields() throws {
        let broker = try broker
        try broker.createTopic(.init(name: "quotes.dlq", partitions: 1))
        let writer = try DeadLetterWriter(bootstrap: broker.bootstrap, properties: [:],
                                          topicTemplate: "{topic}.dlq")
        defer { writer.close() }

        // 2000 two-byte characters: 4000 bytes, cut to 512 characters.
        let longError = String(repeating: "é", count: 2000)
        let message = EventMessage(topic: "quotes", partition: 0, offset: 5, payload: [])
        let failure = ProjectionFailure(phase: .onEvent, projection: "quotes", file: "projections/quotes.lua",
                                        message: longError)
        writer.add(message, projection: "quotes", version: "v-1", failure: failure)
        try writer.flush(timeoutMs: 10_000)

        let record = try XCTUnwrap(try readBack(broker, topics: ["quotes.dlq"], count: 1).first)
        XCTAssertNil(record.key)
        XCTAssertEqual(record.payload, [])
        XCTAssertNil(header("x-dead-letter-timestamp-ms", of: record))
        XCTAssertEqual(header("x-dead-letter-phase", of: record), "on_event")
        XCTAssertEqual(header("x-dead-letter-source", of: record), "projections/quotes.lua")
        XCTAssertEqual(header("x-dead-letter-error", of: record), String(repeating: "é", count: 512))
    }

    func testErrorTruncatesAtCharacterBoundary() {
        XCTAssertEqual(DeadLetterWriter.truncated("short", maxBytes: 1024), "short")
        XCTAssertEqual(DeadLetterWriter.truncated("abcdef", maxBytes: 4), "abcd")
        // "€" is 3 bytes, so a 4-byte limit keeps one and a 5-byte limit still keeps one.
        XCTAssertEqual(DeadLetterWriter.truncated("€€€", maxBytes: 4), "€")
        XCTAssertEqual(DeadLetterWriter.truncated("€€€", maxBytes: 5), "€")
        XCTAssertEqual(DeadLetterWriter.truncated("€€€", maxBytes: 2), "")
    }

    func testConsumerPropertiesDoNotReachTheProducer() {
        let properties = [
            "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "linger.ms": "5",
            "session.timeout.ms": "6000", "enable.auto.commit": "false", "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": "1", "queued.max.messages.kbytes": "4096", "group.instance.id": "a",
        ]
        XCTAssertEqual(DeadLetterWriter.producerProperties(of: properties),
                       ["security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "linger.ms": "5"])
    }

    // MARK: Topic template

    func testTemplateSubstitutesSourceTopic() throws {
        let broker = try broker
        let writer = try DeadLetterWriter(bootstrap: broker.bootstrap, properties: [:],
                                          topicTemplate: "dead.{topic}.v1")
        defer { writer.close() }
        XCTAssertEqual(writer.deadLetterTopic(for: "bars"), "dead.bars.v1")

        let single = try DeadLetterWriter(bootstrap: broker.bootstrap, properties: [:],
                                          topicTemplate: "all-dead-letters")
        defer { single.close() }
        XCTAssertEqual(single.deadLetterTopic(for: "bars"), "all-dead-letters")

        try broker.createTopic(.init(name: "dead.bars.v1", partitions: 1))
        try broker.createTopic(.init(name: "dead.ticks.v1", partitions: 1))
        let failure = ProjectionFailure(phase: .onEvent, projection: "p", file: "p.lua", message: "boom")
        writer.add(EventMessage(topic: "bars", offset: 1, payload: Array("b".utf8)),
                   projection: "p", version: "1", failure: failure)
        writer.add(EventMessage(topic: "ticks", offset: 2, payload: Array("t".utf8)),
                   projection: "p", version: "1", failure: failure)
        try writer.flush(timeoutMs: 10_000)

        let records = try readBack(broker, topics: ["dead.bars.v1", "dead.ticks.v1"], count: 2)
        let topicByPayload = Dictionary(uniqueKeysWithValues: records.map { (text($0.payload), $0.topic) })
        XCTAssertEqual(topicByPayload, ["b": "dead.bars.v1", "t": "dead.ticks.v1"])
    }

    func testInvalidTemplateIsRejected() throws {
        let bootstrap = try broker.bootstrap
        for template in ["", "{topic}", "{topics}.dlq", "dead letters", "{Topic}.dlq", ".",
                         String(repeating: "x", count: 250)] {
            XCTAssertThrowsError(try DeadLetterWriter(bootstrap: bootstrap, properties: [:],
                                                      topicTemplate: template), "'\(template)'") { error in
                let message = (error as? KafkaError)?.message ?? ""
                XCTAssertTrue(message.contains("invalid dead-letter topic template"), message)
            }
        }
        for template in ["{topic}.dlq", "dlq-{topic}", "dead_letters"] {
            XCTAssertNoThrow(try DeadLetterWriter(bootstrap: bootstrap, properties: [:],
                                                  topicTemplate: template).close(), template)
        }
    }

    // MARK: Acknowledgement and retries

    func testFlushWaitsThroughBrokerRetries() throws {
        let broker = try broker
        try broker.createTopic(.init(name: "retried.dlq", partitions: 1))
        let writer = try DeadLetterWriter(bootstrap: broker.bootstrap, properties: ["retry.backoff.ms": "300"],
                                          topicTemplate: "{topic}.dlq")
        defer { writer.close() }
        addFailures(to: writer, topic: "retried", count: 5)

        // Produce is Kafka API key 0. Two retriable errors make librdkafka send it three times.
        try broker.pushRequestErrors(apiKey: 0, errors: [RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                                                         RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS])
        let start = Date()
        try writer.flush(timeoutMs: 10_000)
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(start), 0.5, "flush returned before the retries")
        XCTAssertEqual(writer.pendingCount, 0)

        let records = try readBack(broker, topics: ["retried.dlq"], count: 5)
        XCTAssertEqual(records.map { header("x-dead-letter-offset", of: $0) }, ["0", "1", "2", "3", "4"])
    }

    func testFailedDeliveriesStayQueuedForNextFlush() throws {
        let broker = try broker
        try broker.createTopic(.init(name: "rejected.dlq", partitions: 1))
        let writer = try DeadLetterWriter(bootstrap: broker.bootstrap, properties: [:],
                                          topicTemplate: "{topic}.dlq")
        defer { writer.close() }
        addFailures(to: writer, topic: "rejected", count: 3)

        // A non-retriable error fails every message of the next Produce request.
        try broker.pushRequestErrors(apiKey: 0, errors: [RD_KAFKA_RESP_ERR_POLICY_VIOLATION])
        XCTAssertThrowsError(try writer.flush(timeoutMs: 10_000)) { error in
            let kafkaError = error as? KafkaError
            XCTAssertEqual(kafkaError?.code, RD_KAFKA_RESP_ERR_POLICY_VIOLATION.rawValue)
            XCTAssertTrue(kafkaError?.message.hasPrefix("3 dead letters not acknowledged") ?? false,
                          kafkaError?.message ?? "")
            XCTAssertTrue(kafkaError?.message.contains("3 failed") ?? false, kafkaError?.message ?? "")
        }
        XCTAssertEqual(writer.pendingCount, 3)

        try writer.flush(timeoutMs: 10_000)
        XCTAssertEqual(writer.pendingCount, 0)
        let records = try readBack(broker, topics: ["rejected.dlq"], count: 3)
        XCTAssertEqual(records.map { header("x-dead-letter-offset", of: $0) }, ["0", "1", "2"])
    }

    func testPartialFailureRetriesOnlyFailedDeadLetters() throws {
        // Two brokers lead one partition each, so the dead letters go out in two Produce
        // requests, and the one error below fails only one of them.
        let broker = try DevBroker(brokers: 2, topics: [.init(name: "split.dlq", partitions: 2)])
        defer { broker.stop() }
        let writer = try DeadLetterWriter(bootstrap: broker.bootstrap, properties: [:],
                                          topicTemplate: "{topic}.dlq")
        defer { writer.close() }
        addFailures(to: writer, topic: "split", count: 1)
        try writer.flush(timeoutMs: 10_000)

        addFailures(to: writer, topic: "split", count: 12, firstOffset: 1)
        try broker.pushRequestErrors(apiKey: 0, errors: [RD_KAFKA_RESP_ERR_POLICY_VIOLATION])
        XCTAssertThrowsError(try writer.flush(timeoutMs: 10_000))
        XCTAssertGreaterThan(writer.pendingCount, 0)
        XCTAssertLessThan(writer.pendingCount, 12)

        try writer.flush(timeoutMs: 10_000)
        XCTAssertEqual(writer.pendingCount, 0)
        let records = try readBack(broker, topics: ["split.dlq"], count: 13)
        let offsets = records.compactMap { header("x-dead-letter-offset", of: $0).flatMap { Int($0) } }
        XCTAssertEqual(offsets.sorted(), Array(0...12))
    }

    func testBrokerDownKeepsDeadLettersUntilAcknowledged() throws {
        let broker = try DevBroker(topics: [.init(name: "outage.dlq", partitions: 1)])
        defer { broker.stop() }
        let writer = try DeadLetterWriter(bootstrap: broker.bootstrap, properties: fastReconnect,
                                          topicTemplate: "{topic}.dlq")
        defer { writer.close() }
        addFailures(to: writer, topic: "outage", count: 1)
        try writer.flush(timeoutMs: 10_000)

        try broker.setBrokerDown(1, down: true)
        addFailures(to: writer, topic: "outage", count: 3, firstOffset: 1)
        let start = Date()
        XCTAssertThrowsError(try writer.flush(timeoutMs: 1000)) { error in
            let message = (error as? KafkaError)?.message ?? ""
            XCTAssertTrue(message.hasPrefix("3 dead letters not acknowledged after 1000 ms"), message)
            XCTAssertTrue(message.contains("3 without a delivery report"), message)
        }
        XCTAssertLessThan(Date().timeIntervalSince(start), 2.5, "flush overran its timeout")
        XCTAssertEqual(writer.pendingCount, 3)

        try broker.setBrokerDown(1, down: false)
        try writer.flush(timeoutMs: 10_000)
        XCTAssertEqual(writer.pendingCount, 0)

        // The dead letters in flight during the outage are sent once, not again by the retry.
        let records = try readBack(broker, topics: ["outage.dlq"], count: 4)
        XCTAssertEqual(records.map { header("x-dead-letter-offset", of: $0) }, ["0", "1", "2", "3"])
    }

    func testTimedOutDeliveriesAreProducedAgain() throws {
        let broker = try DevBroker(topics: [.init(name: "expired.dlq", partitions: 1)])
        defer { broker.stop() }
        var properties = fastReconnect
        properties["message.timeout.ms"] = "500"
        let writer = try DeadLetterWriter(bootstrap: broker.bootstrap, properties: properties,
                                          topicTemplate: "{topic}.dlq")
        defer { writer.close() }

        try broker.setBrokerDown(1, down: true)
        addFailures(to: writer, topic: "expired", count: 2)
        XCTAssertThrowsError(try writer.flush(timeoutMs: 3000)) { error in
            XCTAssertEqual((error as? KafkaError)?.code, RD_KAFKA_RESP_ERR__MSG_TIMED_OUT.rawValue)
        }
        XCTAssertEqual(writer.pendingCount, 2)

        // As the worker does, retry until the broker acknowledges. librdkafka reconnects after
        // a backoff, and a retry before that times out again.
        try broker.setBrokerDown(1, down: false)
        var attempts = 0
        while writer.pendingCount > 0, attempts < 10 {
            attempts += 1
            try? writer.flush(timeoutMs: 1000)
        }
        XCTAssertEqual(writer.pendingCount, 0, "not acknowledged after \(attempts) flushes")

        let records = try readBack(broker, topics: ["expired.dlq"], count: 2)
        XCTAssertEqual(records.map { header("x-dead-letter-offset", of: $0) }, ["0", "1"])
    }

    func testDiscardPendingIgnoresLateReports() throws {
        let broker = try DevBroker(topics: [.init(name: "dropped.dlq", partitions: 1)])
        defer { broker.stop() }
        let writer = try DeadLetterWriter(bootstrap: broker.bootstrap, properties: fastReconnect,
                                          topicTemplate: "{topic}.dlq")
        defer { writer.close() }

        try broker.setBrokerDown(1, down: true)
        addFailures(to: writer, topic: "dropped", count: 2)
        XCTAssertThrowsError(try writer.flush(timeoutMs: 300))
        addFailures(to: writer, topic: "dropped", count: 1, firstOffset: 2)
        XCTAssertEqual(writer.pendingCount, 3)

        writer.discardPending()
        XCTAssertEqual(writer.pendingCount, 0)

        // The two discarded dead letters in flight can still reach the broker. Their reports
        // must not count for the new one.
        try broker.setBrokerDown(1, down: false)
        addFailures(to: writer, topic: "dropped", count: 1, firstOffset: 3)
        XCTAssertEqual(writer.pendingCount, 1)
        try writer.flush(timeoutMs: 10_000)
        XCTAssertEqual(writer.pendingCount, 0)
    }

    func testCloseDropsPendingDeadLetters() throws {
        let writer = try DeadLetterWriter(bootstrap: try broker.bootstrap, properties: [:],
                                          topicTemplate: "{topic}.dlq")
        addFailures(to: writer, topic: "closed", count: 2)
        writer.close()
        XCTAssertEqual(writer.pendingCount, 0)
        writer.close()
    }

    // MARK: Helpers

    /// Reconnects within 200 ms once the broker is back, instead of librdkafka's default
    /// backoff of up to 10 s.
    private let fastReconnect = ["reconnect.backoff.ms": "50", "reconnect.backoff.max.ms": "200"]

    /// Adds `count` dead letters for consecutive offsets of partition 0 of `topic`.
    private func addFailures(to writer: DeadLetterWriter, topic: String, count: Int, firstOffset: Int64 = 0) {
        for index in 0..<Int64(count) {
            let offset = firstOffset + index
            let message = EventMessage(topic: topic, offset: offset, key: Array("k\(offset)".utf8),
                                       payload: Array("{\"n\":\(offset)}".utf8))
            let failure = ProjectionFailure(phase: .onEvent, projection: "p", file: "p.lua", line: 1,
                                            message: "failed at \(offset)")
            writer.add(message, projection: "p", version: "1", failure: failure)
        }
    }

    /// Reads `topics` from the start with a new group until `count` records arrived or 15 s
    /// passed, then polls 300 ms more so that duplicates show up in the count. The records are
    /// sorted by topic, partition and offset.
    private func readBack(_ broker: DevBroker, topics: [String], count: Int) throws -> [KafkaRecord] {
        // The session timeout must stay above the 3 s that the mock waits on a group's first
        // join, or the member times out before it joins.
        let settings = KafkaConsumerSettings(
            bootstrap: broker.bootstrap, groupId: "read-back-\(topics.joined(separator: "+"))",
            properties: ["session.timeout.ms": "4000", "heartbeat.interval.ms": "300"])
        let consumer = try KafkaConsumer(settings: settings)
        defer { consumer.close() }
        try consumer.subscribe(topics)

        var records: [KafkaRecord] = []
        let deadline = Date().addingTimeInterval(15)
        while records.count < count, Date() < deadline {
            records += consumer.poll(timeoutMs: 100)
        }
        records += consumer.poll(timeoutMs: 300)
        return records.sorted { ($0.topic, $0.partition, $0.offset) < ($1.topic, $1.partition, $1.offset) }
    }

    private func header(_ name: String, of record: KafkaRecord) -> String? {
        guard let header = record.headers.last(where: { $0.name == name }) else { return nil }
        return text(header.value)
    }

    private func text(_ bytes: [UInt8]?) -> String {
        String(decoding: bytes ?? [], as: UTF8.self)
    }
}
