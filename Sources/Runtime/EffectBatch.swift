import HostAPI

/// The effects of one polled batch, gathered before anything is written: Redis commands in the
/// order the handlers made them, the next offsets per partition, and per-projection progress.
/// ClickHouse rows go straight into the worker's buffer, which flushes across batches.
struct EffectBatch {
    /// A Redis command and where it came from, for error messages.
    struct Origin {
        var projection: String
        var topic: String
        var partition: Int32
        var offset: Int64
    }

    var redisCommands: [RedisCommand] = []
    var redisOrigins: [Origin] = []
    /// The offset after the last event of each partition in the batch.
    var nextOffsets: [TopicPartition: Int64] = [:]
    var progress: [String: AppliedProgress] = [:]

    var isEmpty: Bool { redisCommands.isEmpty && nextOffsets.isEmpty }

    mutating func addRedis(_ command: RedisCommand, origin: Origin) {
        redisCommands.append(command)
        redisOrigins.append(origin)
    }

    /// Records that `message` went through every subscribed projection.
    mutating func markHandled(_ message: EventMessage) {
        let partition = TopicPartition(message.topic, message.partition)
        nextOffsets[partition] = message.offset + 1
    }

    mutating func record(projection: String, message: EventMessage, failure: ProjectionFailure?) {
        var entry = progress[projection] ?? AppliedProgress()
        if let failure {
            entry.failed += 1
            entry.lastFailure = failure
        } else {
            entry.handled += 1
        }
        entry.nextOffsets["\(message.topic)/\(message.partition)"] = message.offset + 1
        if let timestamp = message.timestampMs {
            entry.lastEventTimestampMs = max(entry.lastEventTimestampMs ?? timestamp, timestamp)
        }
        progress[projection] = entry
    }
}
