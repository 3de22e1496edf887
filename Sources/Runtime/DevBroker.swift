import CRdKafka
import Glibc
import Synchronization

/// An in-process Kafka cluster for development and tests: librdkafka's mock cluster, whose
/// brokers listen on 127.0.0.1 at ports the system picks and speak the Kafka protocol to any
/// client (this runtime, kcat). Nothing is stored on disk.
///
/// Sendable: the mock functions hand each request to the cluster's own thread and wait for it,
/// and a mutex keeps `stop()` from destroying the cluster under a running call.
public final class DevBroker: Sendable {
    /// A topic to create: `NAME:PARTITIONS` on the command line.
    public struct TopicSpec: Sendable, Equatable, CustomStringConvertible {
        public var name: String
        public var partitions: Int

        public init(name: String, partitions: Int) {
            self.name = name
            self.partitions = partitions
        }

        /// Parses `NAME:PARTITIONS`, e.g. `orders:4`.
        public init(parsing spec: String) throws(KafkaError) {
            let invalid = { (reason: String) in
                KafkaError(function: "rd_kafka_mock_topic_create",
                           message: "invalid topic '\(spec)': \(reason). Expected NAME:PARTITIONS, e.g. orders:4")
            }
            guard let colon = spec.lastIndex(of: ":") else { throw invalid("the partition count is missing") }
            let name = String(spec[..<colon])
            guard let partitions = Int32(spec[spec.index(after: colon)...]), partitions > 0 else {
                throw invalid("the partition count must be a whole number from 1 to \(Int32.max)")
            }
            try Self.validate(name: name, spec: spec)
            self.init(name: name, partitions: Int(partitions))
        }

        public var description: String { "\(name):\(partitions)" }

        /// Checks Kafka's rules for topic names: 1 to 249 characters from [A-Za-z0-9._-], and
        /// not "." or "..".
        static func validate(name: String, spec: String) throws(KafkaError) {
            let allowed = name.utf8.allSatisfy { byte in
                (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5a)
                    || (byte >= 0x61 && byte <= 0x7a) || byte == 0x2e || byte == 0x5f || byte == 0x2d
            }
            guard !name.isEmpty, name.utf8.count <= 249, allowed, name != ".", name != ".." else {
                throw KafkaError(function: "rd_kafka_mock_topic_create", message:
                    "invalid topic name '\(name)' in '\(spec)': use 1 to 249 characters from A-Z, a-z, 0-9, '.', '_' and '-'")
            }
        }
    }

    /// The handles, or nil once stopped.
    private struct Handles {
        /// The rd_kafka_mock_cluster_t, destroyed before `client`.
        var cluster: OpaquePointer
        /// The producer rd_kafka_t that librdkafka requires to own the cluster's threads.
        var client: OpaquePointer
    }

    /// `bootstrap.servers` for clients: 127.0.0.1:PORT per broker, comma-separated.
    public let bootstrap: String
    /// Broker ids are 1 to `brokerCount`.
    public let brokerCount: Int
    private let handles: Mutex<Handles?>

    /// Starts `brokers` brokers and creates `topics`.
    public init(brokers: Int = 1, topics: [TopicSpec] = []) throws(KafkaError) {
        guard brokers >= 1, brokers <= Int(Int32.max) else {
            throw KafkaError(function: "rd_kafka_mock_cluster_new",
                             message: "invalid broker count \(brokers): expected 1 or more")
        }
        // Log level 4 (warning) hides the notice that this handle has no bootstrap.servers:
        // it only hosts the cluster and never connects anywhere.
        let configuration = try makeKafkaConfiguration([("client.id", "dev-broker"), ("log_level", "4")])
        rd_kafka_conf_set_log_cb(configuration, kafkaLogCallback)
        let client = try makeKafkaHandle(RD_KAFKA_PRODUCER, configuration)
        guard let cluster = rd_kafka_mock_cluster_new(client, Int32(brokers)) else {
            rd_kafka_destroy(client)
            throw KafkaError(function: "rd_kafka_mock_cluster_new",
                             message: "starting a mock Kafka cluster with \(brokers) brokers failed")
        }

        for topic in topics {
            do {
                try Self.createTopic(topic, in: cluster)
            } catch {
                rd_kafka_mock_cluster_destroy(cluster)
                rd_kafka_destroy(client)
                throw error
            }
        }
        // The cluster owns the bootstrap string, so copy it while the cluster lives.
        bootstrap = String(cString: rd_kafka_mock_cluster_bootstraps(cluster))
        brokerCount = brokers
        handles = Mutex(Handles(cluster: cluster, client: client))
    }

    deinit {
        stop()
    }

    /// Creates a topic. Topics that clients use without creating them here are created on
    /// first use with 4 partitions (the mock's default in librdkafka 2.0.2).
    public func createTopic(_ topic: TopicSpec) throws(KafkaError) {
        try withCluster("rd_kafka_mock_topic_create") { cluster throws(KafkaError) in
            try Self.createTopic(topic, in: cluster)
        }
    }

    /// Disconnects broker `id` (1 to `brokerCount`, or -1 for all) and rejects new connections
    /// while `down` is true. Partition leadership does not move.
    public func setBrokerDown(_ id: Int32, down: Bool) throws(KafkaError) {
        let function = down ? "rd_kafka_mock_broker_set_down" : "rd_kafka_mock_broker_set_up"
        try withCluster(function) { cluster throws(KafkaError) in
            let code = down ? rd_kafka_mock_broker_set_down(cluster, id)
                : rd_kafka_mock_broker_set_up(cluster, id)
            try check(code, function, "setting broker \(id) \(down ? "down" : "up") failed")
        }
        Log.shared.info(down ? "dev broker down" : "dev broker up", ["broker": .int(id)])
    }

    /// Makes the next `errors.count` requests with Kafka API key `apiKey` (e.g. 0 Produce,
    /// 1 Fetch, 8 OffsetCommit) fail with these codes, in order. `RD_KAFKA_RESP_ERR__TRANSPORT`
    /// disconnects the client instead. librdkafka copies the codes.
    public func pushRequestErrors(apiKey: Int16, errors: [rd_kafka_resp_err_t]) throws(KafkaError) {
        try withCluster("rd_kafka_mock_push_request_errors_array") { cluster in
            errors.withUnsafeBufferPointer { codes in
                rd_kafka_mock_push_request_errors_array(cluster, apiKey, codes.count, codes.baseAddress)
            }
        }
    }

    /// Makes metadata requests for `topic` return `error` (e.g.
    /// `RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART`) until it is set back to
    /// `RD_KAFKA_RESP_ERR_NO_ERROR`.
    public func setTopicError(_ topic: String, error: rd_kafka_resp_err_t) throws(KafkaError) {
        try withCluster("rd_kafka_mock_topic_set_error") { cluster in
            rd_kafka_mock_topic_set_error(cluster, topic, error)
        }
    }

    /// Drops the errors still queued by `pushRequestErrors` for `apiKey`.
    public func clearRequestErrors(apiKey: Int16) throws(KafkaError) {
        try withCluster("rd_kafka_mock_clear_request_errors") { cluster in
            rd_kafka_mock_clear_request_errors(cluster, apiKey)
        }
    }

    /// Destroys the cluster, which disconnects every client. Calling it again does nothing.
    public func stop() {
        handles.withLock { handles in
            guard let current = handles else { return }
            rd_kafka_mock_cluster_destroy(current.cluster)
            rd_kafka_destroy(current.client)
            handles = nil
        }
    }

    /// Runs `body` with the cluster under the lock, so that `stop()` waits for it.
    private func withCluster(_ function: String,
                             _ body: (OpaquePointer) throws(KafkaError) -> Void) throws(KafkaError) {
        try handles.withLock { handles throws(KafkaError) in
            guard let current = handles else {
                throw KafkaError(function: function, message: "the dev broker is stopped")
            }
            try body(current.cluster)
        }
    }

    /// Requests replication factor 1. NOTE: librdkafka 2.0.2's mock still lists every broker
    /// as a replica in metadata, so clients see N replicas with `--brokers N`.
    private static func createTopic(_ topic: TopicSpec, in cluster: OpaquePointer) throws(KafkaError) {
        let code = rd_kafka_mock_topic_create(cluster, topic.name, Int32(topic.partitions), 1)
        try check(code, "rd_kafka_mock_topic_create", "creating topic '\(topic.name)' failed")
    }
}

// MARK: - The dev-broker command

extension DevBroker {
    public static let commandHelp = """
        Usage: projection-runtime dev-broker --topic NAME:PARTITIONS [--topic ...] [--brokers N]

        Starts an in-process Kafka cluster for local development (librdkafka's mock cluster)
        that any Kafka client can use, on 127.0.0.1 at a port the system picks. Prints the
        bootstrap address (127.0.0.1:PORT, one per broker, comma-separated) as the first line
        on stdout, then logs JSON lines on stderr, and runs until SIGINT or SIGTERM.

        Messages and committed offsets are kept in memory only and are lost on exit. Each
        partition keeps about 5 MB of messages; beyond that the oldest are dropped and the
        partition's start offset moves forward. A topic that a client uses without creating
        it here is created on first use with 4 partitions.

        Options:
          --topic NAME:PARTITIONS   create topic NAME with PARTITIONS partitions; repeat for
                                    more topics
          --brokers N               the number of brokers, with ids 1 to N (default 1)
          --help                    show this help

        Exits 0 after a signal, 1 when the cluster fails to start, 2 on invalid arguments.
        """

    /// The options of the dev-broker command.
    struct CommandOptions: Equatable {
        var topics: [TopicSpec] = []
        var brokers = 1
        var help = false

        /// Parses the arguments after `dev-broker`.
        static func parse(_ arguments: [String]) throws(KafkaError) -> CommandOptions {
            var options = CommandOptions()
            var remaining = arguments[...]
            while let argument = remaining.popFirst() {
                let (name, inlineValue) = split(argument)
                switch name {
                case "--help", "-h":
                    options.help = true
                case "--topic":
                    let spec = try value(of: name, inlineValue, &remaining)
                    let topic = try TopicSpec(parsing: spec)
                    if options.topics.contains(where: { $0.name == topic.name }) {
                        throw usage("duplicate --topic '\(topic.name)': give each topic once")
                    }
                    options.topics.append(topic)
                case "--brokers":
                    let text = try value(of: name, inlineValue, &remaining)
                    guard let count = Int32(text), count >= 1 else {
                        throw usage("invalid --brokers '\(text)': expected a whole number of 1 or more")
                    }
                    options.brokers = Int(count)
                default:
                    throw usage("unexpected argument '\(argument)'")
                }
            }
            return options
        }

        /// Splits `--name=value` into its parts.
        private static func split(_ argument: String) -> (String, String?) {
            guard argument.hasPrefix("--"), let equals = argument.firstIndex(of: "=") else {
                return (argument, nil)
            }
            return (String(argument[..<equals]), String(argument[argument.index(after: equals)...]))
        }

        private static func value(of name: String, _ inlineValue: String?,
                                  _ remaining: inout ArraySlice<String>) throws(KafkaError) -> String {
            if let inlineValue { return inlineValue }
            guard let next = remaining.popFirst() else { throw usage("\(name) needs a value") }
            return next
        }

        private static func usage(_ message: String) -> KafkaError {
            KafkaError(function: "dev-broker", message: message)
        }
    }

    /// Runs `projection-runtime dev-broker ARGUMENTS` and returns the exit status.
    ///
    /// Call it from the main thread before the process starts other threads: it blocks SIGINT
    /// and SIGTERM so that every thread librdkafka starts inherits the mask and the signals
    /// wait for `sigwait` here. A thread started earlier with the signals unblocked would take
    /// them with the default action and end the process without cleanup.
    public static func runCommand(arguments: [String]) -> Int32 {
        let options: CommandOptions
        do {
            options = try CommandOptions.parse(arguments)
        } catch {
            writeLine("dev-broker: \(error.message)\nRun 'projection-runtime dev-broker --help' for usage.", to: 2)
            return 2
        }
        if options.help {
            print(commandHelp)
            return 0
        }

        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        var previousMask = sigset_t()
        pthread_sigmask(SIG_BLOCK, &signals, &previousMask)
        defer { pthread_sigmask(SIG_SETMASK, &previousMask, nil) }

        let broker: DevBroker
        do {
            broker = try DevBroker(brokers: options.brokers, topics: options.topics)
        } catch {
            Log.shared.error("dev broker start failed", ["error": .string(error.message)])
            writeLine("dev-broker: \(error.message)", to: 2)
            return 1
        }

        // Written unbuffered, so a parent process reading the pipe gets the line at once.
        writeLine(broker.bootstrap, to: 1)
        Log.shared.info("dev broker started", [
            "bootstrap": .string(broker.bootstrap), "brokers": .int(options.brokers),
            "topics": .string(options.topics.map(\.description).joined(separator: ",")),
        ])

        let signal = waitForSignal(signals)
        Log.shared.info("dev broker stopping", ["signal": .string(signal == SIGINT ? "SIGINT" : "SIGTERM")])
        broker.stop()
        Log.shared.info("dev broker stopped")
        return 0
    }

    /// Waits for one of the blocked `signals` and returns its number.
    private static func waitForSignal(_ signals: sigset_t) -> Int32 {
        var signals = signals
        var received: Int32 = 0
        while sigwait(&signals, &received) != 0 {}
        return received
    }

    private static func writeLine(_ text: String, to descriptor: Int32) {
        var line = Array(text.utf8)
        line.append(0x0a)
        line.withUnsafeBytes { _ = write(descriptor, $0.baseAddress, $0.count) }
    }
}
