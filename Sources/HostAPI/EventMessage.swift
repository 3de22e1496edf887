/// One Kafka message as a projection sees it: the payload and where it came from.
public struct EventMessage: Sendable {
    public var topic: String
    public var partition: Int32
    public var offset: Int64
    public var key: [UInt8]?
    /// The message timestamp in epoch milliseconds, when the producer or broker set one.
    public var timestampMs: Int64?
    public var headers: [(name: String, value: [UInt8]?)]
    /// The JSON payload, undecoded.
    public var payload: [UInt8]

    public init(topic: String, partition: Int32 = 0, offset: Int64 = 0, key: [UInt8]? = nil,
                timestampMs: Int64? = nil, headers: [(name: String, value: [UInt8]?)] = [],
                payload: [UInt8]) {
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.timestampMs = timestampMs
        self.headers = headers
        self.payload = payload
    }
}
