import CRdKafka
import Glibc

/// A small Kafka producer for tests, the local stack and dead letters.
///
/// Not Sendable: one thread owns it. Delivery reports run inside `produce` and `flush` on that
/// thread, and the next `flush` throws a failed delivery.
public final class KafkaProducer {
    /// The rd_kafka_t, or nil once closed.
    private var handle: OpaquePointer?
    private let deliveries = DeliveryState()

    /// How long `produce` waits for room in a full local queue before it throws, in
    /// milliseconds.
    public var queueFullTimeoutMs = 5000

    /// Creates a producer for `bootstrap` (`bootstrap.servers`). `properties` are librdkafka
    /// properties set verbatim after it.
    public init(bootstrap: String, properties: [String: String] = [:]) throws(KafkaError) {
        var ordered: [(name: String, value: String)] = [("bootstrap.servers", bootstrap)]
        ordered += properties.sorted { $0.key < $1.key }.map { (name: $0.key, value: $0.value) }

        let configuration = try makeKafkaConfiguration(ordered)
        rd_kafka_conf_set_log_cb(configuration, kafkaLogCallback)
        rd_kafka_conf_set_dr_msg_cb(configuration, producerDeliveryCallback)
        // librdkafka stores this pointer without retaining `deliveries`. That is safe because
        // `self` keeps it alive until `close()` has destroyed the handle.
        rd_kafka_conf_set_opaque(configuration, Unmanaged.passUnretained(deliveries).toOpaque())
        handle = try makeKafkaHandle(RD_KAFKA_PRODUCER, configuration)
    }

    deinit {
        close()
    }

    /// Queues one message. `partition` nil lets the partitioner choose (by key hash when a key
    /// is set). `timestampMs` nil lets librdkafka use the current time.
    ///
    /// With a `deliveryId` (1 or more), the message's delivery report goes to
    /// `waitForDeliveryReports(timeoutMs:)` under that id, and `flush` ignores it.
    ///
    /// librdkafka copies the topic, key, value and headers before `rd_kafka_produceva`
    /// returns, so nothing here outlives the call.
    public func produce(topic: String, partition: Int32? = nil, key: [UInt8]? = nil,
                        value: [UInt8]?, headers: [(name: String, value: [UInt8]?)] = [],
                        timestampMs: Int64? = nil, deliveryId: Int? = nil) throws(KafkaError) {
        guard let handle else {
            throw KafkaError(function: "rd_kafka_produceva", message: "Kafka producer is closed")
        }
        var arguments = CArguments()
        var values: [rd_kafka_vu_t] = [
            argument(RD_KAFKA_VTYPE_TOPIC) { $0.cstr = arguments.string(topic) },
            argument(RD_KAFKA_VTYPE_PARTITION) { $0.i32 = partition ?? -1 },  // -1: RD_KAFKA_PARTITION_UA
            argument(RD_KAFKA_VTYPE_MSGFLAGS) { $0.i = RD_KAFKA_MSG_F_COPY },
        ]
        if let value {
            values.append(argument(RD_KAFKA_VTYPE_VALUE) {
                $0.mem = .init(ptr: arguments.bytes(value), size: value.count)
            })
        }
        if let key {
            values.append(argument(RD_KAFKA_VTYPE_KEY) {
                $0.mem = .init(ptr: arguments.bytes(key), size: key.count)
            })
        }
        if let timestampMs {
            values.append(argument(RD_KAFKA_VTYPE_TIMESTAMP) { $0.i64 = timestampMs })
        }
        if let deliveryId {
            precondition(deliveryId > 0, "delivery id \(deliveryId) is not 1 or more")
            // librdkafka passes this opaque pointer back in the delivery report untouched.
            values.append(argument(RD_KAFKA_VTYPE_OPAQUE) {
                $0.ptr = UnsafeMutableRawPointer(bitPattern: deliveryId)
            })
        }
        for header in headers {
            values.append(argument(RD_KAFKA_VTYPE_HEADER) {
                // A size of -1 with a null value is a header without a value.
                $0.header = .init(name: arguments.string(header.name),
                                  val: header.value.map { UnsafeRawPointer(arguments.bytes($0)) },
                                  size: header.value.map { $0.count } ?? -1)
            })
        }

        try enqueue(handle, values, topic: topic)
        rd_kafka_poll(handle, 0)
    }

    /// Waits until every queued message is delivered or failed, then throws the first delivery
    /// failure since the last flush, if any.
    public func flush(timeoutMs: Int) throws(KafkaError) {
        guard let handle else {
            throw KafkaError(function: "rd_kafka_flush", message: "Kafka producer is closed")
        }
        let code = rd_kafka_flush(handle, Int32(clamping: timeoutMs))
        if code == RD_KAFKA_RESP_ERR__TIMED_OUT {
            throw KafkaError(function: "rd_kafka_flush", code: code.rawValue, message:
                "flush timed out after \(timeoutMs) ms with \(rd_kafka_outq_len(handle)) messages or requests in the queue")
        }
        try check(code, "rd_kafka_flush", "flush failed")
        if let failure = deliveries.takeFailure() {
            throw failure
        }
    }

    /// Waits up to `timeoutMs` until every queued message is delivered or failed, as `flush`
    /// does, and returns the reports of messages produced with a `deliveryId` that arrived since
    /// the last call, in arrival order. Failed deliveries are returned, not thrown. A message
    /// without a report is still in librdkafka's queue, where it is retried until
    /// `message.timeout.ms` has passed and then reported as failed.
    public func waitForDeliveryReports(timeoutMs: Int) throws(KafkaError) -> [DeliveryReport] {
        guard let handle else {
            throw KafkaError(function: "rd_kafka_flush", message: "Kafka producer is closed")
        }
        // rd_kafka_flush returns only NO_ERROR or _TIMED_OUT. Both leave the reports to read.
        _ = rd_kafka_flush(handle, Int32(clamping: timeoutMs))
        return deliveries.takeReports()
    }

    /// Destroys the handle. Messages still queued are dropped, so call `flush` first. Calling
    /// it again does nothing.
    public func close() {
        guard let handle else { return }
        // rd_kafka_outq_len also counts error and other callbacks waiting to be served, which
        // a broker that is down leaves behind, so this is not a count of lost messages.
        let queued = rd_kafka_outq_len(handle)
        if queued > 0 {
            Log.shared.info("Kafka producer closed with messages or callbacks still queued", ["queued": .int(queued)])
        }
        rd_kafka_destroy(handle)
        self.handle = nil
    }

    /// Calls `rd_kafka_produceva`, waiting for room while the local queue is full.
    private func enqueue(_ handle: OpaquePointer, _ values: [rd_kafka_vu_t],
                         topic: String) throws(KafkaError) {
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: .milliseconds(queueFullTimeoutMs))
        while true {
            // The returned error object is ours to destroy.
            guard let error = rd_kafka_produceva(handle, values, values.count) else { return }
            let code = rd_kafka_error_code(error)
            let text = String(cString: rd_kafka_error_string(error))
            rd_kafka_error_destroy(error)

            guard code == RD_KAFKA_RESP_ERR__QUEUE_FULL, clock.now < deadline else {
                throw KafkaError(function: "rd_kafka_produceva", code: code.rawValue,
                                 message: "produce to '\(topic)' failed: \(text)")
            }
            // Serving delivery reports frees room in the queue.
            rd_kafka_poll(handle, 100)
        }
    }
}

private func argument(_ type: rd_kafka_vtype_t,
                      _ set: (inout rd_kafka_vu_t.__Unnamed_union_u) -> Void) -> rd_kafka_vu_t {
    var value = rd_kafka_vu_t()
    value.vtype = type
    set(&value.u)
    return value
}

/// C copies of strings and bytes that live until this value is destroyed.
private struct CArguments: ~Copyable {
    private var allocations: [UnsafeMutableRawPointer] = []

    mutating func string(_ text: String) -> UnsafePointer<CChar> {
        let copy = strdup(text)!
        allocations.append(copy)
        return UnsafePointer(copy)
    }

    mutating func bytes(_ bytes: [UInt8]) -> UnsafeMutableRawPointer {
        let copy = malloc(max(bytes.count, 1))!
        bytes.withUnsafeBytes { source in
            if let base = source.baseAddress { copy.copyMemory(from: base, byteCount: source.count) }
        }
        allocations.append(copy)
        return copy
    }

    deinit {
        for allocation in allocations { free(allocation) }
    }
}

/// The outcome of one message produced with a `deliveryId`.
public struct DeliveryReport: Sendable {
    public var deliveryId: Int
    /// The failure, or nil when the broker acknowledged the message.
    public var error: KafkaError?
    /// The partition and offset of the stored message, valid only when `error` is nil. The
    /// offset is negative when the broker returned none (`acks=0`).
    public var partition: Int32
    public var offset: Int64
}

/// Delivery results that the delivery callback reaches through the configuration's opaque
/// pointer. Only the owner thread touches it, because librdkafka runs the callback inside
/// `rd_kafka_poll` and `rd_kafka_flush`.
private final class DeliveryState {
    var failures = 0
    var firstFailure: KafkaError?
    /// Reports of messages produced with a delivery id, not yet taken.
    var reports: [DeliveryReport] = []

    func takeReports() -> [DeliveryReport] {
        defer { reports = [] }
        return reports
    }

    func takeFailure() -> KafkaError? {
        defer {
            failures = 0
            firstFailure = nil
        }
        guard var failure = firstFailure else { return nil }
        if failures > 1 {
            failure.message += " (and \(failures - 1) more failed deliveries)"
        }
        return failure
    }
}

private func producerDeliveryCallback(handle: OpaquePointer?,
                                      message: UnsafePointer<rd_kafka_message_t>?,
                                      opaque: UnsafeMutableRawPointer?) {
    guard let message, let opaque else { return }
    let state = Unmanaged<DeliveryState>.fromOpaque(opaque).takeUnretainedValue()
    let code = message.pointee.err
    var error: KafkaError?
    var topic = ""
    if code != RD_KAFKA_RESP_ERR_NO_ERROR {
        topic = message.pointee.rkt.map { String(cString: rd_kafka_topic_name($0)) } ?? ""
        error = KafkaError(function: "rd_kafka_flush", code: code.rawValue,
                           message: "delivery to '\(topic)' failed: \(errorText(code))")
    }

    // `_private` is the per-message opaque that `produce` set from the delivery id.
    if let deliveryId = message.pointee._private {
        state.reports.append(DeliveryReport(deliveryId: Int(bitPattern: deliveryId), error: error,
                                            partition: message.pointee.partition,
                                            offset: message.pointee.offset))
    } else if let error {
        state.failures += 1
        if state.firstFailure == nil {
            state.firstFailure = error
        }
    }
    guard error != nil else { return }
    Log.shared.warn("Kafka delivery failed", [
        "kafka.topic": .string(topic), "error": .string(errorText(code)),
    ])
}
