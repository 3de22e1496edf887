import HostAPI

/// The effects of the batches handled since the last commit, written together: dead letters
/// first, then the ClickHouse rows, then one Redis transaction with the projections' commands,
/// the keyed-state changes and the next offsets, then the Kafka commit.
///
/// A unit grows over several polled batches while it has ClickHouse rows that are not yet due,
/// so rows are inserted in blocks; a unit without rows is written after each batch.
///
/// The per-event calls (`slot(for:)`, `record`, `markHandled`) update arrays indexed by a
/// partition slot, and hash a partition only when the events switch to another one. The
/// offsets keyed by partition and the progress keyed by projection are built when the unit is
/// written or abandoned.
struct CommitUnit {
    /// A Redis command and where it came from, for error messages.
    struct Origin {
        var projection: String
        var topic: String
        var partition: Int32
        var offset: Int64
    }

    /// The offsets of one partition in the unit.
    struct PartitionOffsets {
        var partition: TopicPartition
        /// The first handled offset, where the consumer must go back to if the unit is
        /// abandoned while the partition stays assigned.
        var first: Int64
        /// The offset after the last handled event.
        var next: Int64
    }

    /// The outcomes of one projection in the unit, reported to the registry once it applied.
    struct ProjectionProgress {
        var name: String
        var handled: Int64 = 0
        var failed: Int64 = 0
        var lastEventTimestampMs: Int64?
        var lastFailure: ProjectionFailure?
        /// The offset after the last event this projection saw, per partition slot, or -1
        /// when it saw no event of that partition.
        var nextOffsets: [Int64] = []
    }

    var redisCommands: [RedisCommand] = []
    var redisOrigins: [Origin] = []
    /// The partitions of the unit, in the order of their first event.
    private(set) var partitionOffsets: [PartitionOffsets] = []
    private var slotByPartition: [TopicPartition: Int] = [:]
    /// The slot of the last event, checked first because a polled batch usually contains runs
    /// of events of one partition.
    private var lastSlot: Int?
    private(set) var projectionProgress: [ProjectionProgress] = []
    /// The index at which the search for the next projection starts. Results come in the same
    /// projection order for every event, so this is usually the one after the last match.
    private var nextProjectionHint = 0
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

    var partitions: [TopicPartition] { partitionOffsets.map(\.partition) }

    /// The offset after the last handled event of each partition.
    var nextOffsets: [TopicPartition: Int64] {
        Dictionary(uniqueKeysWithValues: partitionOffsets.map { ($0.partition, $0.next) })
    }

    /// The first handled offset of each partition.
    var firstOffsets: [TopicPartition: Int64] {
        Dictionary(uniqueKeysWithValues: partitionOffsets.map { ($0.partition, $0.first) })
    }

    /// The progress of each projection, with offsets keyed by `<topic>/<partition>`.
    var progress: [String: AppliedProgress] {
        var progress: [String: AppliedProgress] = [:]
        for projection in projectionProgress {
            var entry = progress[projection.name] ?? AppliedProgress()
            entry.handled += projection.handled
            entry.failed += projection.failed
            if let failure = projection.lastFailure {
                entry.lastFailure = failure
            }
            if let timestamp = projection.lastEventTimestampMs {
                entry.lastEventTimestampMs = max(entry.lastEventTimestampMs ?? timestamp, timestamp)
            }
            for (slot, next) in projection.nextOffsets.enumerated() where next >= 0 {
                let partition = partitionOffsets[slot].partition
                entry.nextOffsets["\(partition.topic)/\(partition.partition)"] = next
            }
            progress[projection.name] = entry
        }
        return progress
    }

    /// Empties the unit and keeps the capacity of its arrays for the next one.
    mutating func reset() {
        redisCommands.removeAll(keepingCapacity: true)
        redisOrigins.removeAll(keepingCapacity: true)
        partitionOffsets.removeAll(keepingCapacity: true)
        slotByPartition.removeAll(keepingCapacity: true)
        lastSlot = nil
        projectionProgress.removeAll(keepingCapacity: true)
        nextProjectionHint = 0
        events = 0
        deadLetters = 0
        startedAtMs = nil
        insertedTables.removeAll()
        rows.removeAll()
        stateCommands = nil
    }

    mutating func addRedis(_ command: RedisCommand, origin: Origin) {
        redisCommands.append(command)
        redisOrigins.append(origin)
    }

    /// Returns the slot of the message's partition, adding the partition at the message's
    /// offset when the unit has no event of it yet.
    mutating func slot(for message: EventMessage) -> Int {
        if let lastSlot {
            let last = partitionOffsets[lastSlot].partition
            if last.partition == message.partition && last.topic == message.topic {
                return lastSlot
            }
        }
        let partition = TopicPartition(message.topic, message.partition)
        let slot: Int
        if let existing = slotByPartition[partition] {
            slot = existing
        } else {
            slot = partitionOffsets.count
            partitionOffsets.append(PartitionOffsets(partition: partition, first: message.offset,
                                                     next: message.offset + 1))
            slotByPartition[partition] = slot
        }
        lastSlot = slot
        return slot
    }

    /// Records that the message at `offset` of the partition in `slot` went through every
    /// subscribed projection. `monotonicNowMs` is called only for the unit's first event.
    mutating func markHandled(slot: Int, offset: Int64, monotonicNowMs: () -> Int64) {
        partitionOffsets[slot].next = offset + 1
        events += 1
        if startedAtMs == nil {
            startedAtMs = monotonicNowMs()
        }
    }

    /// Records one projection's outcome for `message`, whose partition is in `slot`.
    mutating func record(projection: String, slot: Int, message: EventMessage, failure: ProjectionFailure?) {
        let index = projectionIndex(named: projection)
        if let failure {
            projectionProgress[index].failed += 1
            projectionProgress[index].lastFailure = failure
        } else {
            projectionProgress[index].handled += 1
        }
        if projectionProgress[index].nextOffsets.count <= slot {
            let missing = slot + 1 - projectionProgress[index].nextOffsets.count
            projectionProgress[index].nextOffsets.append(contentsOf: repeatElement(-1, count: missing))
        }
        projectionProgress[index].nextOffsets[slot] = message.offset + 1
        if let timestamp = message.timestampMs {
            let last = projectionProgress[index].lastEventTimestampMs
            projectionProgress[index].lastEventTimestampMs = max(last ?? timestamp, timestamp)
        }
    }

    private mutating func projectionIndex(named name: String) -> Int {
        let count = projectionProgress.count
        for step in 0..<count {
            let index = (nextProjectionHint + step) % count
            if projectionProgress[index].name == name {
                nextProjectionHint = index + 1 == count ? 0 : index + 1
                return index
            }
        }
        projectionProgress.append(ProjectionProgress(name: name))
        nextProjectionHint = 0
        return count
    }
}
