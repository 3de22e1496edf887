import Foundation

/// The record in Redis of the partitions this process owns, where each resumes, and the fence
/// that keeps a process that lost a partition from writing after the new owner started.
///
/// Kafka's group decides ownership; this mirrors it in Redis so that a transaction can check
/// it. On first use of a partition after an assignment, the worker claims it (SET of its token
/// into the partition's owner key, `prt:owner:{<group>}:<topic>/<partition>`) and reads the
/// offset stored with the last applied batch. Every batch transaction then runs under WATCH of
/// the owner keys of its partitions after checking that the tokens are still ours: a new
/// owner's claim makes EXEC fail instead of writing. Claims of other partitions, by sibling
/// workers of the same process, touch other keys and abort nothing.
final class PartitionOwnership {
    private let connection: RedisConnection
    private let offsets: RedisOffsetStore
    /// The prefix of the owner keys, with the group's hash tag so they share a slot with the
    /// offsets and the state.
    private let ownerKeyPrefix: String
    /// Identifies this process's current claims.
    let token: String

    /// Partitions claimed since their assignment, with the offset to resume from (nil when no
    /// batch of them was ever applied: the consumer's own position is right).
    private(set) var resumeOffsets: [TopicPartition: Int64?] = [:]
    /// Partitions another process claimed after us; their events are not handled until the
    /// next assignment.
    private(set) var fenced: Set<TopicPartition> = []
    /// The owner key of each partition in `resumeOffsets`, so that the fence of a batch
    /// formats no strings.
    private var ownerKeys: [TopicPartition: [UInt8]] = [:]

    init(connection: RedisConnection, offsets: RedisOffsetStore, namespace: String) {
        self.connection = connection
        self.offsets = offsets
        // Same hash tag as the offsets and state, so the check and the batch share one slot.
        self.ownerKeyPrefix = "prt:owner:\(RedisStateKeys.hashTag(namespace)):"
        self.token = "\(ProcessInfo.processInfo.hostName)/\(getpid())/\(UInt32.random(in: 0...UInt32.max))"
    }

    func isClaimed(_ partition: TopicPartition) -> Bool {
        resumeOffsets[partition] != nil
    }

    /// Claims `partitions` and reads where each resumes.
    func claim(_ partitions: [TopicPartition]) throws(RedisError) {
        guard !partitions.isEmpty else { return }
        var claim: [[UInt8]] = [Array("MSET".utf8)]
        for partition in partitions {
            claim.append(ownerKey(partition))
            claim.append(Array(token.utf8))
        }
        _ = try connection.command(claim)
        let stored = try offsets.storedOffsets(partitions)
        for partition in partitions {
            resumeOffsets[partition] = .some(stored[partition])
            fenced.remove(partition)
        }
    }

    /// Forgets claims of partitions that were revoked (or of all, when `partitions` is nil).
    func release(_ partitions: [TopicPartition]?) {
        guard let partitions else {
            resumeOffsets.removeAll()
            fenced.removeAll()
            ownerKeys.removeAll()
            return
        }
        for partition in partitions {
            resumeOffsets[partition] = nil
            fenced.remove(partition)
            ownerKeys[partition] = nil
        }
    }

    /// Returns the offset that `partition` resumes from: events below it were applied by an
    /// earlier batch. Nil when the partition is not claimed or has no stored offset.
    func resumeOffset(_ partition: TopicPartition) -> Int64? {
        resumeOffsets[partition] ?? nil
    }

    /// Records the next offset of each partition after its batch was applied.
    func advance(_ nextOffsets: [TopicPartition: Int64]) {
        for (partition, offset) in nextOffsets where resumeOffsets[partition] != nil {
            resumeOffsets[partition] = .some(offset)
        }
    }

    /// Runs `commands` in one MULTI/EXEC if this process still owns every partition in
    /// `partitions`; throws `FencedError` naming the partitions it lost.
    func fencedTransaction(_ commands: [RedisCommand], partitions: [TopicPartition]) throws -> [RedisReply] {
        try reclaimMissing(partitions)
        _ = try connection.command([Array("WATCH".utf8)] + partitions.map(ownerKey))
        let lost = try lostPartitions(partitions)
        if !lost.isEmpty {
            _ = try? connection.command([Array("UNWATCH".utf8)])
            fenced.formUnion(lost)
            throw FencedError(partitions: lost)
        }
        let result: Result<[RedisReply], RedisError> = Result { () throws(RedisError) in
            try connection.transaction(commands)
        }
        switch result {
        case .success(let replies):
            return replies
        case .failure(let error) where error.kind == .transactionAborted:
            // EXEC failed: either an owner key changed after WATCH (someone claimed one of the
            // partitions) or Redis rejected a queued command. Only the first is a fence.
            let lostNow = try lostPartitions(partitions)
            guard lostNow.isEmpty else {
                fenced.formUnion(lostNow)
                throw FencedError(partitions: lostNow)
            }
            // NOTE: ctx.redis checks the arity of each command, so a queuing error should not
            // come from a projection. If one does, it fails every retry and consumption stays
            // paused, with the command in /ready and the logs, until the cause is fixed.
            throw error
        case .failure(let error):
            throw error
        }
    }

    /// Claims again, with SETNX, partitions whose owner key is gone. Only a Redis that lost
    /// its data (a restart without persistence, a flush) loses the key. The stored offsets and
    /// the effects of earlier batches are then gone too.
    private func reclaimMissing(_ partitions: [TopicPartition]) throws(RedisError) {
        let keys = partitions.map(ownerKey)
        let reply = try connection.command([Array("MGET".utf8)] + keys)
        guard case .array(let owners) = reply else {
            throw RedisError(kind: .reply, endpoint: connection.endpoint, command: "MGET owner keys",
                             message: "Redis at \(connection.endpoint) could not read the partition owners: \(reply)")
        }
        for (index, owner) in owners.enumerated() where owner == .null && index < partitions.count {
            _ = try connection.command([Array("SETNX".utf8), keys[index], Array(token.utf8)])
            Log.shared.error("Redis lost this runtime's partition claim and offsets; claiming the partition again", [
                "kafka.partition": .string(partitions[index].description),
                "hint": .string("Redis restarted without persistence or was flushed: effects written before are lost; run Redis with appendonly yes"),
            ])
        }
    }

    /// Returns the partitions whose owner key no longer contains this process's token.
    private func lostPartitions(_ partitions: [TopicPartition]) throws(RedisError) -> [TopicPartition] {
        let reply = try connection.command([Array("MGET".utf8)] + partitions.map(ownerKey))
        guard case .array(let owners) = reply else {
            // An error reply such as LOADING after a restart tells nothing about ownership.
            throw RedisError(kind: .reply, endpoint: connection.endpoint, command: "MGET owner keys",
                             message: "Redis at \(connection.endpoint) could not read the partition owners: \(reply)")
        }
        let mine = RedisReply.string(Array(token.utf8))
        var lost: [TopicPartition] = []
        for index in partitions.indices where index >= owners.count || owners[index] != mine {
            lost.append(partitions[index])
        }
        return lost
    }

    /// Returns the HSET of the next offsets that goes into a batch's transaction.
    func offsetsCommand(_ nextOffsets: [TopicPartition: Int64]) -> RedisCommand {
        offsets.command(for: nextOffsets)
    }

    /// Returns whether Redis already contains the effects up to `nextOffsets`. After a
    /// transaction whose reply was lost, this tells an applied batch from one that never ran.
    func alreadyApplied(_ nextOffsets: [TopicPartition: Int64]) throws(RedisError) -> Bool {
        let stored = try offsets.storedOffsets(Array(nextOffsets.keys))
        return nextOffsets.allSatisfy { partition, next in (stored[partition] ?? -1) >= next }
    }

    private func ownerKey(_ partition: TopicPartition) -> [UInt8] {
        if let key = ownerKeys[partition] {
            return key
        }
        let key = Array((ownerKeyPrefix + Self.field(partition)).utf8)
        if resumeOffsets[partition] != nil {
            ownerKeys[partition] = key
        }
        return key
    }

    static func field(_ partition: TopicPartition) -> String {
        "\(partition.topic)/\(partition.partition)"
    }
}

@available(*, unavailable)
extension PartitionOwnership: Sendable {}

/// Another process claimed partitions this one was about to write.
struct FencedError: Error, CustomStringConvertible {
    var partitions: [TopicPartition]

    var description: String {
        "another process owns \(partitions.map(\.description).joined(separator: ", ")) now; the batch is abandoned"
    }
}
