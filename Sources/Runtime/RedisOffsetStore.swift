import HostAPI

/// The consumed offsets of a consumer group, kept in Redis so that they change in the same
/// MULTI/EXEC as the Redis effects and keyed state of a batch.
///
/// Layout: one hash, `prt:offsets:{<namespace>}`, with field `<topic>/<partition>` and the
/// next offset to consume, in decimal, as value. The namespace is the consumer group id and
/// the same Cluster hash tag that `RedisStateStore` uses, so a group's offsets and state
/// share one slot.
///
/// One worker owns the store and its connection, so it is not `Sendable`.
public final class RedisOffsetStore {
    public let connection: RedisConnection
    public let namespace: String
    /// The name of the offsets hash.
    public let key: String
    private let keyBytes: [UInt8]
    /// The hash field of each partition written so far, so that a batch formats no strings.
    /// It grows by one entry per partition this process ever handled.
    private var fields: [TopicPartition: [UInt8]] = [:]

    /// Creates a store. `namespace` is the consumer group id.
    public init(connection: RedisConnection, namespace: String) {
        self.connection = connection
        self.namespace = namespace
        self.key = "prt:offsets:\(RedisStateKeys.hashTag(namespace))"
        self.keyBytes = Array(key.utf8)
    }

    /// Reads the next offsets to consume of `partitions` with one HMGET. A partition without
    /// a stored offset is absent from the result. Sends nothing when `partitions` is empty.
    ///
    /// Throws `.reply` when a stored value is not a non-negative integer, because resuming
    /// from a guessed offset would skip or repeat messages.
    public func storedOffsets(_ partitions: [TopicPartition]) throws(RedisError) -> [TopicPartition: Int64] {
        guard !partitions.isEmpty else { return [:] }
        let reply = try connection.command([Array("HMGET".utf8), Array(key.utf8)] + partitions.map(Self.field))

        if case .error(let message) = reply {
            throw RedisError(kind: .reply, endpoint: connection.endpoint, command: "HMGET \(key)",
                             message: "Redis at \(connection.endpoint) rejected HMGET \(key): \(redactedServerError(message)). Stored offsets need this key to be a hash; delete or rename the key.")
        }
        guard case .array(let values) = reply, values.count == partitions.count else {
            throw RedisError(kind: .protocol, endpoint: connection.endpoint, command: "HMGET \(key)",
                             message: "Redis at \(connection.endpoint) sent an unexpected reply to HMGET \(key): expected an array of \(partitions.count) values")
        }

        var offsets: [TopicPartition: Int64] = [:]
        for (partition, value) in zip(partitions, values) {
            switch value {
            case .null:
                continue
            case .string(let bytes):
                guard let offset = Int64(String(decoding: bytes, as: UTF8.self)), offset >= 0 else {
                    throw invalidOffset(partition, stored: String(decoding: bytes.prefix(40), as: UTF8.self))
                }
                offsets[partition] = offset
            default:
                throw invalidOffset(partition, stored: "a non-string reply")
            }
        }
        return offsets
    }

    /// Returns one HSET that stores every offset of `nextOffsets`, for the batch transaction.
    /// Each value is the offset of the next message to consume, one past the last handled one.
    ///
    /// `nextOffsets` must not be empty, because HSET without fields is a syntax error, which
    /// would abort the whole transaction.
    public func command(for nextOffsets: [TopicPartition: Int64]) -> RedisCommand {
        precondition(!nextOffsets.isEmpty, "RedisOffsetStore.command(for:) needs at least one offset; skip the HSET for a batch without messages")
        var arguments: [[UInt8]] = [Self.hsetName, keyBytes]
        arguments.reserveCapacity(2 + 2 * nextOffsets.count)
        for (partition, offset) in nextOffsets.sorted(by: { $0.key < $1.key }) {
            arguments.append(field(partition))
            var value: [UInt8] = []
            RESPWriter.appendDecimal(offset, to: &value)
            arguments.append(value)
        }
        return .arguments(arguments)
    }

    private static let hsetName = Array("HSET".utf8)

    private func field(_ partition: TopicPartition) -> [UInt8] {
        if let field = fields[partition] {
            return field
        }
        let field = Self.field(partition)
        fields[partition] = field
        return field
    }

    private static func field(_ partition: TopicPartition) -> [UInt8] {
        Array("\(partition.topic)/\(partition.partition)".utf8)
    }

    private func invalidOffset(_ partition: TopicPartition, stored: String) -> RedisError {
        RedisError(kind: .reply, endpoint: connection.endpoint, command: "HMGET \(key)",
                   message: "Redis at \(connection.endpoint) has an invalid offset for \(partition) in \(key): \(stored), expected a non-negative integer. Correct or delete the field \(partition).")
    }
}

@available(*, unavailable)
extension RedisOffsetStore: Sendable {}
