import HostAPI

/// The effects of the batches handled since the last commit, written together: dead letters
/// first, then the ClickHouse rows, then one Redis transaction with the projections' commands,
/// the keyed-state changes and the next offsets, then the Kafka commit.
///
/// A unit grows over several polled batches while it has ClickHouse rows that are not yet due,
/// so rows are inserted in blocks; a unit without rows is written after each batch.
struct CommitUnit {
    /// A Redis command and where it came from, for error messages.
    struct Origin {
        var projection: String
        var topic: String
        var partition: Int32
        var offset: Int64
    }

    var redisCommands: [RedisCommand] = []
    var redisOrigins: [Origin] = []
    /// The offset after the last handled event of each partition.
    var nextOffsets: [TopicPartition: Int64] = [:]
    /// The first handled offset of each partition, where the consumer must go back to if the
    /// unit is abandoned while the partition stays assigned.
    var firstOffsets: [TopicPartition: Int64] = [:]
    var progress: [String: AppliedProgress] = [:]
    var events = 0
    var deadLetters = 0
    /// Monotonic milliseconds when the first event entered the unit.
    var startedAtMs: Int64?
    /// Tables whose rows of this unit ClickHouse already acknowledged, so a retry after a
    /// Redis failure does not insert them again.
    var insertedTables: Set<String> = []
    var rows: [ClickHouseBuffer.TableRows] = []
    /// The keyed-state writes, taken from the store at the first Redis attempt so that a
    /// retry sends the same ones.
    var stateCommands: [RedisCommand]?

    var isEmpty: Bool { events == 0 }

    var partitions: [TopicPartition] { Array(nextOffsets.keys) }

    mutating func addRedis(_ command: RedisCommand, origin: Origin) {
        redisCommands.append(command)
        redisOrigins.append(origin)
    }

    /// Records that `message` went through every subscribed projection.
    mutating func markHandled(_ message: EventMessage, nowMs: Int64) {
        let partition = TopicPartition(message.topic, message.partition)
        if firstOffsets[partition] == nil {
            firstOffsets[partition] = message.offset
        }
        nextOffsets[partition] = message.offset + 1
        events += 1
        startedAtMs = startedAtMs ?? nowMs
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
