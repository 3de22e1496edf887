import CRdKafka
import Foundation
import HostAPI
@testable import Runtime
import XCTest

/// The consumer, producer and dev broker against librdkafka's mock cluster in this process.
/// Every broker listens on 127.0.0.1 and stops with the tests.
///
/// Most tests share one broker, with their own topics and groups, because stopping a broker
/// that served fetches takes about a second. Tests that change broker state start their own.
final class KafkaTests: XCTestCase {
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

    // MARK: Dev broker

    func testDevBrokerBootstrapIsLoopback() throws {
        let broker = try DevBroker(brokers: 3, topics: [.init(name: "events", partitions: 2)])
        defer { broker.stop() }

        let addresses = broker.bootstrap.split(separator: ",")
        XCTAssertEqual(addresses.count, 3, broker.bootstrap)
        for address in addresses {
            XCTAssertTrue(address.hasPrefix("127.0.0.1:"), "\(address) is not on 127.0.0.1")
            XCTAssertNotNil(Int(address.dropFirst("127.0.0.1:".count)), "\(address) has no port")
        }
    }

    func testTopicSpecParsing() throws {
        XCTAssertEqual(try DevBroker.TopicSpec(parsing: "orders:4"), .init(name: "orders", partitions: 4))
        XCTAssertEqual(try DevBroker.TopicSpec(parsing: "md.bars_1m-v1:1").name, "md.bars_1m-v1")
        for invalid in ["orders", "orders:", ":4", "orders:0", "orders:-1", "orders:x", "bad name:1", "..:1"] {
            XCTAssertThrowsError(try DevBroker.TopicSpec(parsing: invalid), invalid)
        }
    }

    func testDevBrokerCommandRejectsInvalidArguments() {
        XCTAssertEqual(DevBroker.runCommand(arguments: ["--topic", "orders"]), 2)
        XCTAssertEqual(DevBroker.runCommand(arguments: ["--topic", "orders:1", "--topic=orders:2"]), 2)
        XCTAssertEqual(DevBroker.runCommand(arguments: ["--brokers", "0"]), 2)
        XCTAssertEqual(DevBroker.runCommand(arguments: ["--topic"]), 2)
        XCTAssertEqual(DevBroker.runCommand(arguments: ["--port", "9092"]), 2)
        XCTAssertEqual(DevBroker.runCommand(arguments: ["--help"]), 0)
    }

    func testDevBrokerCommandOptions() throws {
        let options = try DevBroker.CommandOptions.parse(["--topic", "a:4", "--topic=b:1", "--brokers=2"])
        XCTAssertEqual(options.topics, [.init(name: "a", partitions: 4), .init(name: "b", partitions: 1)])
        XCTAssertEqual(options.brokers, 2)
        XCTAssertFalse(options.help)
    }

    // MARK: Consuming

    func testConsumesAllMessagesInOrder() throws {
        let broker = try broker
        try broker.createTopic(.init(name: "ticks", partitions: 4))
        let producer = try KafkaProducer(bootstrap: broker.bootstrap)
        let baseTimestamp: Int64 = 1_700_000_000_000
        for sequence in 0..<1000 {
            try producer.produce(topic: "ticks", key: Array("key-\(sequence % 16)".utf8),
                                 value: Array(#"{"seq":\#(sequence)}"#.utf8),
                                 headers: [("seq", Array("\(sequence)".utf8)), ("empty", nil)],
                                 timestampMs: baseTimestamp + Int64(sequence))
        }
        try producer.flush(timeoutMs: 10_000)

        let consumer = try KafkaConsumer(settings: settings(broker, group: "order"))
        defer { consumer.close() }
        try consumer.subscribe(["ticks"])
        let records = consume(consumer, count: 1000)

        XCTAssertEqual(records.count, 1000)
        XCTAssertEqual(Set(records.map(\.partition)), [0, 1, 2, 3])
        var lastOffset: [Int32: Int64] = [:]
        var lastSequenceOfKey: [String: Int] = [:]
        var partitionOfKey: [String: Int32] = [:]
        for record in records {
            XCTAssertEqual(record.topic, "ticks")
            if let previous = lastOffset[record.partition] {
                XCTAssertGreaterThan(record.offset, previous, "offsets of partition \(record.partition)")
            }
            lastOffset[record.partition] = record.offset

            let sequenceText = String(decoding: record.headers.first?.value ?? [], as: UTF8.self)
            let sequence = try XCTUnwrap(Int(sequenceText), "seq header of \(record.offset)")
            let key = "key-\(sequence % 16)"
            XCTAssertEqual(record.key, Array(key.utf8))
            XCTAssertEqual(String(decoding: record.payload, as: UTF8.self), #"{"seq":\#(sequence)}"#)
            XCTAssertEqual(record.headers.count, 2)
            XCTAssertEqual(record.headers.last?.name, "empty")
            XCTAssertNil(record.headers.last?.value ?? nil)
            XCTAssertEqual(record.timestampMs, baseTimestamp + Int64(sequence))

            if let previous = lastSequenceOfKey[key] {
                XCTAssertGreaterThan(sequence, previous, "order of key \(key)")
            }
            lastSequenceOfKey[key] = sequence
            if let partition = partitionOfKey[key] {
                XCTAssertEqual(record.partition, partition, "partition of key \(key)")
            }
            partitionOfKey[key] = record.partition
        }
    }

    func testNewConsumerStartsAfterCommittedOffsets() throws {
        let broker = try broker
        try broker.createTopic(.init(name: "bars", partitions: 2))
        try produce(broker, topic: "bars", count: 40, partitions: 2)

        let first = try KafkaConsumer(settings: settings(broker, group: "resume"))
        try first.subscribe(["bars"])
        let handled = consume(first, count: 40)
        XCTAssertEqual(handled.count, 40)

        // Commit as if only the first 5 messages of each partition were handled.
        let committed = [TopicPartition("bars", 0): Int64(5), TopicPartition("bars", 1): Int64(5)]
        try first.commit(committed)
        XCTAssertEqual(try first.committed(Array(committed.keys)), committed)
        first.close()

        let second = try KafkaConsumer(settings: settings(broker, group: "resume"))
        defer { second.close() }
        try second.subscribe(["bars"])
        let replayed = consume(second, count: 30)

        XCTAssertEqual(replayed.count, 30)
        for partition: Int32 in [0, 1] {
            let offsets = replayed.filter { $0.partition == partition }.map(\.offset)
            XCTAssertEqual(offsets, Array(5..<20), "partition \(partition)")
        }
    }

    func testResubscribeToTopicUnion() throws {
        let broker = try broker
        try broker.createTopic(.init(name: "first", partitions: 1))
        try broker.createTopic(.init(name: "second", partitions: 2))
        try produce(broker, topic: "first", count: 10, partitions: 1)
        try produce(broker, topic: "second", count: 10, partitions: 2)

        let consumer = try KafkaConsumer(settings: settings(broker, group: "union"))
        defer { consumer.close() }
        try consumer.subscribe(["first"])
        let fromFirst = consume(consumer, count: 10)
        XCTAssertEqual(Set(fromFirst.map(\.topic)), ["first"])
        try consumer.commit(nextOffsets(fromFirst))

        try consumer.subscribe(["first", "second"])
        XCTAssertFalse(consumer.isJoined)
        let fromUnion = consume(consumer, count: 10)

        XCTAssertEqual(fromUnion.count, 10)
        XCTAssertEqual(Set(fromUnion.map(\.topic)), ["second"])
        XCTAssertTrue(consumer.isJoined)
        XCTAssertEqual(consumer.subscription, ["first", "second"])
        XCTAssertEqual(consumer.assignment(), [TopicPartition("first", 0), TopicPartition("second", 0),
                                               TopicPartition("second", 1)])
    }

    func testPauseHoldsPartitionUntilResume() throws {
        let broker = try broker
        try broker.createTopic(.init(name: "trades", partitions: 2))
        let consumer = try KafkaConsumer(settings: settings(broker, group: "pause"))
        defer { consumer.close() }
        try consumer.subscribe(["trades"])
        XCTAssertTrue(pollUntil([consumer]) { consumer.assignment().count == 2 }, "no assignment")

        let paused = TopicPartition("trades", 0)
        try consumer.pause([paused])
        try produce(broker, topic: "trades", count: 40, partitions: 2)
        let whilePaused = consume(consumer, count: 20) + consumer.poll(timeoutMs: 1000)

        XCTAssertEqual(whilePaused.count, 20)
        XCTAssertEqual(Set(whilePaused.map(\.partition)), [1])

        try consumer.resume([paused])
        let afterResume = consume(consumer, count: 20)
        XCTAssertEqual(afterResume.count, 20)
        XCTAssertEqual(Set(afterResume.map(\.partition)), [0])
        XCTAssertEqual(afterResume.map(\.offset), Array(0..<20))
    }

    func testLagReachesZeroAfterConsuming() throws {
        let broker = try broker
        try broker.createTopic(.init(name: "depth", partitions: 1))
        try produce(broker, topic: "depth", count: 50, partitions: 1)
        let consumer = try KafkaConsumer(settings: settings(broker, group: "lag"))
        defer { consumer.close() }
        try consumer.subscribe(["depth"])

        let firstTen = consume(consumer, count: 10, batch: 10)
        XCTAssertEqual(firstTen.count, 10)
        XCTAssertEqual(consumer.lag(), [TopicPartition("depth", 0): 40])

        XCTAssertEqual(consume(consumer, count: 40).count, 40)
        XCTAssertEqual(consumer.lag(), [TopicPartition("depth", 0): 0])
    }

    // MARK: Groups and rebalancing

    func testEagerGroupSplitsAndTakesOver() throws {
        try checkSplitAndTakeOver(strategy: "range,roundrobin", protocolName: "EAGER")
    }

    func testCooperativeGroupSplitsAndTakesOver() throws {
        try checkSplitAndTakeOver(strategy: "cooperative-sticky", protocolName: "COOPERATIVE")
    }

    /// Checks that two members of one group share a 4-partition topic and that the remaining
    /// member gets all partitions when the other closes.
    private func checkSplitAndTakeOver(strategy: String, protocolName: String) throws {
        let broker = try broker
        let topic = "split-\(protocolName.lowercased())"
        try broker.createTopic(.init(name: topic, partitions: 4))
        var properties = fastGroupProperties
        properties["partition.assignment.strategy"] = strategy
        let groupSettings = settings(broker, group: topic, properties: properties)
        var firstEvents: [RebalanceEvent] = []
        var secondEvents: [RebalanceEvent] = []
        let first = try KafkaConsumer(settings: groupSettings) { firstEvents.append($0) }
        let second = try KafkaConsumer(settings: groupSettings) { secondEvents.append($0) }
        defer { second.close() }
        try first.subscribe([topic])
        try second.subscribe([topic])

        let split = pollUntil([first, second], timeoutSeconds: 20) {
            first.assignment().count == 2 && second.assignment().count == 2
        }
        XCTAssertTrue(split, "assignments \(first.assignment()) and \(second.assignment())")
        XCTAssertTrue(Set(first.assignment()).isDisjoint(with: second.assignment()))
        XCTAssertTrue(first.isJoined)
        XCTAssertTrue(second.isJoined)

        let firstPartitions = first.assignment()
        first.close()
        XCTAssertEqual(firstEvents.last, .revoked(firstPartitions, lost: false), "\(firstEvents)")

        let takenOver = pollUntil([second], timeoutSeconds: 20) { second.assignment().count == 4 }
        XCTAssertTrue(takenOver, "assignment after close: \(second.assignment())")
        let assigned = secondEvents.flatMap { event -> [TopicPartition] in
            if case .assigned(let partitions) = event { return partitions }
            return []
        }
        XCTAssertTrue(Set(assigned).isSuperset(of: firstPartitions), "\(secondEvents)")
    }

    func testMemberWithoutPartitionsIsJoined() throws {
        let broker = try broker
        try broker.createTopic(.init(name: "single", partitions: 1))
        let first = try KafkaConsumer(settings: settings(broker, group: "single"))
        let second = try KafkaConsumer(settings: settings(broker, group: "single"))
        defer {
            first.close()
            second.close()
        }
        try first.subscribe(["single"])
        try second.subscribe(["single"])

        let joined = pollUntil([first, second], timeoutSeconds: 20) { first.isJoined && second.isJoined }

        XCTAssertTrue(joined)
        XCTAssertEqual(first.assignment().count + second.assignment().count, 1)
    }

    // MARK: Outside clients

    func testKcatProducesToDevBroker() throws {
        let kcat = URL(fileURLWithPath: "/usr/bin/kcat")
        guard FileManager.default.isExecutableFile(atPath: kcat.path) else {
            throw XCTSkip("kcat is not installed at /usr/bin/kcat")
        }
        let broker = try broker
        try broker.createTopic(.init(name: "external", partitions: 1))

        let process = Process()
        process.executableURL = kcat
        process.arguments = ["-b", broker.bootstrap, "-t", "external", "-P", "-K:"]
        let input = Pipe()
        process.standardInput = input
        try process.run()
        input.fileHandleForWriting.write(Data("alpha:{\"n\":1}\nbeta:{\"n\":2}\n".utf8))
        try input.fileHandleForWriting.close()
        XCTAssertTrue(waitForExit(process, timeoutSeconds: 15), "kcat did not exit")
        XCTAssertEqual(process.terminationStatus, 0)

        let consumer = try KafkaConsumer(settings: settings(broker, group: "kcat"))
        defer { consumer.close() }
        try consumer.subscribe(["external"])
        let records = consume(consumer, count: 2)

        XCTAssertEqual(records.map { String(decoding: $0.key ?? [], as: UTF8.self) }, ["alpha", "beta"])
        XCTAssertEqual(records.map { String(decoding: $0.payload, as: UTF8.self) }, [#"{"n":1}"#, #"{"n":2}"#])
    }

    // MARK: Errors

    func testInvalidPropertyErrorNamesProperty() {
        var invalid = KafkaConsumerSettings(bootstrap: "127.0.0.1:1", groupId: "invalid")
        invalid.properties = ["session.timeout.ms": "abc"]

        XCTAssertThrowsError(try KafkaConsumer(settings: invalid)) { error in
            let message = (error as? KafkaError)?.message ?? "\(error)"
            XCTAssertTrue(message.hasPrefix("invalid librdkafka property 'session.timeout.ms'='abc': "), message)
        }
    }

    func testUnknownPropertyErrorNamesProperty() {
        var invalid = KafkaConsumerSettings(bootstrap: "127.0.0.1:1", groupId: "invalid")
        invalid.properties = ["no.such.property": "1"]

        XCTAssertThrowsError(try KafkaConsumer(settings: invalid)) { error in
            let message = (error as? KafkaError)?.message ?? "\(error)"
            XCTAssertTrue(message.contains("'no.such.property'"), message)
        }
    }

    func testSecretPropertyValueIsRedacted() {
        var invalid = KafkaConsumerSettings(bootstrap: "127.0.0.1:1", groupId: "invalid")
        invalid.properties = ["ssl.key.password.nonexistent": "hunter2"]

        XCTAssertThrowsError(try KafkaConsumer(settings: invalid)) { error in
            let message = (error as? KafkaError)?.message ?? "\(error)"
            XCTAssertFalse(message.contains("hunter2"), message)
        }
    }

    func testMissingTopicIsReported() throws {
        let broker = try broker
        let consumer = try KafkaConsumer(settings: settings(broker, group: "missing"))
        defer { consumer.close() }
        // The mock cluster creates unknown topics on first use unless their metadata is set
        // to fail.
        try broker.setTopicError("absent", error: RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
        try consumer.subscribe(["absent"])

        _ = pollUntil([consumer], timeoutSeconds: 1) { consumer.errorCount > 0 }

        XCTAssertEqual(consumer.reportedTopicErrorCount, 1)
        let message = consumer.lastError?.message ?? "no error"
        XCTAssertTrue(message.contains("absent"), message)
    }

    func testRepeatedTopicErrorIsLoggedOnce() throws {
        let consumer = try KafkaConsumer(settings: settings(try broker, group: "repeats"))
        defer { consumer.close() }
        var message = rd_kafka_message_t()
        message.err = RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART

        for _ in 0..<3 {
            withUnsafeMutablePointer(to: &message) { consumer.recordMessageError($0) }
        }

        XCTAssertEqual(consumer.errorCount, 3)
        XCTAssertEqual(consumer.reportedTopicErrorCount, 1)
    }

    func testBrokerDownThenUpResumesConsuming() throws {
        let broker = try DevBroker(topics: [.init(name: "outage", partitions: 1)])
        defer { broker.stop() }
        try produce(broker, topic: "outage", count: 10, partitions: 1)
        var properties = fastGroupProperties
        properties["reconnect.backoff.max.ms"] = "200"
        let consumer = try KafkaConsumer(settings: settings(broker, group: "outage", properties: properties))
        defer { consumer.close() }

        try broker.setBrokerDown(1, down: true)
        try consumer.subscribe(["outage"])
        XCTAssertEqual(consumer.poll(timeoutMs: 1500).count, 0)
        XCTAssertGreaterThan(consumer.errorCount, 0)

        try broker.setBrokerDown(1, down: false)
        XCTAssertEqual(consume(consumer, count: 10).count, 10)
    }

    func testCommitErrorsAndEmptyCommit() throws {
        let broker = try DevBroker(topics: [.init(name: "commits", partitions: 1)])
        defer { broker.stop() }
        try produce(broker, topic: "commits", count: 3, partitions: 1)
        let consumer = try KafkaConsumer(settings: settings(broker, group: "commits"))
        defer { consumer.close() }
        try consumer.subscribe(["commits"])
        XCTAssertEqual(consume(consumer, count: 3).count, 3)

        try consumer.commit([:])
        XCTAssertEqual(try consumer.committed([TopicPartition("commits", 0)]), [:])

        // OffsetCommit is Kafka API key 8. A non-retriable error reaches the caller.
        try broker.pushRequestErrors(apiKey: 8, errors: [RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED])
        XCTAssertThrowsError(try consumer.commit([TopicPartition("commits", 0): 3])) { error in
            XCTAssertEqual((error as? KafkaError)?.function, "rd_kafka_commit")
        }
        try consumer.commit([TopicPartition("commits", 0): 3])
        XCTAssertEqual(try consumer.committed([TopicPartition("commits", 0)]), [TopicPartition("commits", 0): 3])
    }

    func testClosedConsumerRejectsCalls() throws {
        let consumer = try KafkaConsumer(settings: settings(try broker, group: "closed"))
        consumer.close()
        consumer.close()

        XCTAssertEqual(consumer.poll(timeoutMs: 10).count, 0)
        XCTAssertThrowsError(try consumer.subscribe(["any"]))
        XCTAssertThrowsError(try consumer.commit([TopicPartition("any", 0): 1]))
        XCTAssertEqual(consumer.assignment(), [])
    }

    // MARK: Helpers

    /// A short session timeout, because the mock coordinator waits the session timeout minus
    /// 1 s for members to rejoin during a rebalance. It must stay above the 3 s that the mock
    /// waits on a group's first join, or members time out before they join (both measured
    /// with librdkafka 2.0.2).
    private let fastGroupProperties = [
        "session.timeout.ms": "4000",
        "heartbeat.interval.ms": "300",
    ]

    private func settings(_ broker: DevBroker, group: String,
                          properties: [String: String]? = nil) -> KafkaConsumerSettings {
        KafkaConsumerSettings(bootstrap: broker.bootstrap, groupId: group,
                              properties: properties ?? fastGroupProperties)
    }

    /// Produces `count` messages spread round-robin over `partitions`, keyed "k<i>".
    private func produce(_ broker: DevBroker, topic: String, count: Int, partitions: Int32) throws {
        let producer = try KafkaProducer(bootstrap: broker.bootstrap)
        for index in 0..<count {
            try producer.produce(topic: topic, partition: Int32(index) % partitions,
                                 key: Array("k\(index)".utf8), value: Array("{\"i\":\(index)}".utf8))
        }
        try producer.flush(timeoutMs: 10_000)
    }

    /// Polls until `count` records arrived or 20 s passed.
    private func consume(_ consumer: KafkaConsumer, count: Int, batch: Int = 100) -> [KafkaRecord] {
        var records: [KafkaRecord] = []
        let deadline = Date().addingTimeInterval(20)
        while records.count < count, Date() < deadline {
            records += consumer.poll(maxMessages: min(batch, count - records.count), timeoutMs: 100)
        }
        return records
    }

    /// Polls every consumer in turn until `condition` holds, dropping the records.
    private func pollUntil(_ consumers: [KafkaConsumer], timeoutSeconds: Double = 10,
                           _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while Date() < deadline {
            for consumer in consumers { _ = consumer.poll(timeoutMs: 50) }
            if condition() { return true }
        }
        return condition()
    }

    private func nextOffsets(_ records: [KafkaRecord]) -> [TopicPartition: Int64] {
        var offsets: [TopicPartition: Int64] = [:]
        for record in records {
            let partition = TopicPartition(record.topic, record.partition)
            offsets[partition] = max(offsets[partition] ?? 0, record.offset + 1)
        }
        return offsets
    }

    private func waitForExit(_ process: Process, timeoutSeconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while process.isRunning, Date() < deadline { usleep(20_000) }
        if process.isRunning {
            process.terminate()
            return false
        }
        return true
    }
}
