import Foundation
import HostAPI

/// Writing a commit unit, outages, rebalances and shutdown.
extension PipelineWorker {
    /// One failed step of a commit, with the sink to name in `/ready` and logs.
    struct CommitFailure: Error {
        var sink: String
        var error: any Error
    }

    // MARK: - Commit

    /// Writes the unit: dead letters, rows, then the Redis transaction. On failure the unit
    /// stays as it is and the worker enters an outage; with a `deadline` (revoke, shutdown) it
    /// retries until then instead. Returns whether the unit was written.
    @discardableResult
    func commitUnit(deadline: Double?, revoked: Set<TopicPartition> = []) -> Bool {
        while true {
            do {
                try writeUnit()
                leaveOutage()
                return true
            } catch let failure as FencedError {
                Log.shared.warn("partitions were claimed by another process; dropping this batch",
                                ["error": .string(failure.description)])
                abandonUnit(reason: "fenced", leaving: revoked)
                return false
            } catch {
                let failure = error as? CommitFailure ?? CommitFailure(sink: "Redis", error: error)
                guard let deadline else {
                    enterOutage(sink: failure.sink, error: "\(failure.error)")
                    return false
                }
                Log.shared.warn("write failed; retrying until the deadline", [
                    "sink": .string(failure.sink), "error": .string("\(failure.error)"),
                ])
                if Date().timeIntervalSince1970 >= deadline {
                    abandonUnit(reason: "deadline", leaving: revoked)
                    return false
                }
                usleep(200_000)
            }
        }
    }

    private func writeUnit() throws {
        if deadLetters.pendingCount > 0 {
            do {
                try deadLetters.flush(timeoutMs: 10_000)
            } catch {
                throw CommitFailure(sink: "dead-letter topic", error: error)
            }
        }
        guard !unit.isEmpty else { return }

        try insertRows()
        try applyRedis()

        let nextOffsets = unit.nextOffsets
        for (partition, offset) in nextOffsets {
            pendingKafkaCommit[partition] = offset
            appliedOffsets[partition] = offset
        }
        ownership.advance(nextOffsets)
        registry.recordApplied(unit.progress, nowMs: nowMs())
        unit.reset()
    }

    /// Inserts the unit's rows table by table; a retry skips tables already acknowledged.
    private func insertRows() throws {
        if unit.rows.isEmpty && !buffer.isEmpty {
            unit.rows = buffer.drainTables()
        }
        for tableRows in unit.rows where !unit.insertedTables.contains(tableRows.table) {
            let table = tableRows.table
            let rows = tableRows.rows
            let started = DispatchTime.now().uptimeNanoseconds
            do {
                try clickhouse.insert(table: table, rows: rows, sources: tableRows.sources)
            } catch {
                metrics.recordClickHouseFlush(table: table, rows: 0, seconds: elapsed(since: started), failed: true)
                control.update(worker: index) { $0.clickhouseReachable = false; $0.clickhouseError = "\(error)" }
                throw CommitFailure(sink: "ClickHouse", error: error)
            }
            metrics.recordClickHouseFlush(table: table, rows: rows.count, seconds: elapsed(since: started), failed: false)
            control.update(worker: index) { $0.clickhouseReachable = true; $0.clickhouseError = nil }
            unit.insertedTables.insert(table)
        }
    }

    /// Applies one MULTI/EXEC: the projections' commands, the keyed-state changes and the
    /// offsets, under the ownership fence. After a failure whose outcome is unknown (the connection
    /// broke after EXEC was sent), the stored offsets tell whether it was applied.
    private func applyRedis() throws {
        let started = DispatchTime.now().uptimeNanoseconds
        let nextOffsets = unit.nextOffsets
        do {
            try redis.ensureConnected(deadline: Date().timeIntervalSince1970 + 1)
            if unit.stateCommands == nil {
                unit.stateCommands = state.takePendingCommands()
            } else if try ownership.alreadyApplied(nextOffsets) {
                Log.shared.info("the previous attempt of this batch was applied; not sending it again")
                metrics.recordRedisFlush(seconds: elapsed(since: started), failed: false)
                return
            }
            var commands = unit.redisCommands + (unit.stateCommands ?? [])
            if !nextOffsets.isEmpty {
                commands.append(ownership.offsetsCommand(nextOffsets))
            }
            let replies = try ownership.fencedTransaction(commands, partitions: unit.partitions)
            metrics.recordRedisFlush(seconds: elapsed(since: started), failed: false)
            control.update(worker: index) { $0.redisReachable = true; $0.redisError = nil }
            reportReplyErrors(replies)
        } catch let fenced as FencedError {
            throw fenced
        } catch {
            metrics.recordRedisFlush(seconds: elapsed(since: started), failed: true)
            control.update(worker: index) { $0.redisReachable = false; $0.redisError = "\(error)" }
            throw CommitFailure(sink: "Redis", error: error)
        }
    }

    /// Reply errors of single commands are projection mistakes (a wrong type, say): they are
    /// logged and counted, and the rest of the transaction still applied.
    private func reportReplyErrors(_ replies: [RedisReply]) {
        for (index, reply) in replies.enumerated() {
            guard case .error(let message) = reply else { continue }
            guard index < unit.redisOrigins.count else {
                Log.shared.error("Redis rejected a state or offset write", ["error": .string(message)])
                continue
            }
            let origin = unit.redisOrigins[index]
            metrics.recordRedisCommandError(projection: origin.projection)
            Log.shared.error("Redis rejected a projection's command", [
                "projection": .string(origin.projection), "kafka.topic": .string(origin.topic),
                "kafka.partition": .int(origin.partition), "kafka.offset": .integer(origin.offset),
                "command": .string(unit.redisCommands[index].summary), "error": .string(message),
            ])
        }
    }

    /// Drops the unit without writing it. Its events are consumed again: by this process for
    /// partitions it still owns (the consumer goes back to the unit's first offsets), or by the
    /// next owner. Cached state of those partitions is reloaded from Redis.
    func abandonUnit(reason: String, leaving revoked: Set<TopicPartition> = []) {
        let partitions = unit.partitions
        let firstOffsets = unit.firstOffsets
        state.forget(partitions)
        deadLetters.discardPending()
        _ = buffer.drainTables()
        unit.reset()
        metrics.recordAbandonedBatch(reason: reason)
        Log.shared.warn("dropped a batch without writing it; its events are consumed again", [
            "reason": .string(reason), "partitions": .string(partitions.map(\.description).joined(separator: ",")),
        ])
        // Records of these partitions polled after the unit's (kept during an outage) go too.
        // The rewind fetches them again after the unit's own events. Handled now, they would
        // run ahead of those events, whose offsets they would then mark as applied.
        let dropped = Set(partitions)
        backlog.removeAll { dropped.contains(TopicPartition($0.topic, $0.partition)) }

        let assigned = Set(consumer.assignment())
        let rewind = firstOffsets.filter {
            assigned.contains($0.key) && !revoked.contains($0.key) && !ownership.fenced.contains($0.key)
        }
        do {
            try consumer.seek(rewind)
        } catch {
            Log.shared.error("cannot rewind partitions after dropping a batch; releasing them", ["error": .string("\(error)")])
            ownership.release(Array(rewind.keys))
        }
    }

    // MARK: - Outages

    /// Pauses every assigned partition and records the failing sink. The loop keeps polling
    /// meanwhile, so the consumer stays in its group (max.poll.interval.ms cannot pass) and
    /// fetches no new messages.
    func enterOutage(sink: String, error: String) {
        if outage == nil {
            Log.shared.warn("a write failed; pausing consumption and retrying", [
                "sink": .string(sink), "error": .string(error),
            ])
            try? consumer.pause(consumer.assignment())
            outage = Outage(sink: sink, error: error, retryAt: 0)
        }
        outage!.sink = sink
        outage!.error = error
        outage!.retryAt = Date().timeIntervalSince1970 + outage!.backoff.next()
        control.update(worker: index) { $0.pausedReason = "\(sink) is failing: \(error)" }
    }

    func leaveOutage() {
        guard let outage else { return }
        self.outage = nil
        try? consumer.resume(consumer.assignment())
        control.update(worker: index) { $0.pausedReason = nil }
        Log.shared.info("writes succeed again; consumption resumed", ["sink": .string(outage.sink)])
    }

    /// Runs one step of an outage: polls briefly (serving rebalances), then retries when it is
    /// time.
    func waitOutOutage() {
        guard let outage else { return }
        let wait = max(0, outage.retryAt - Date().timeIntervalSince1970)
        let records = consumer.poll(maxMessages: config.kafka.pollBatch, timeoutMs: min(Int(wait * 1000), 100))
        backlog += records
        guard Date().timeIntervalSince1970 >= (self.outage?.retryAt ?? 0) else { return }
        if !unit.isEmpty || deadLetters.pendingCount > 0 {
            commitUnit(deadline: nil)
        } else if !backlog.isEmpty {
            // The failure happened before the batch was handled: try handling it again.
            let records = backlog
            backlog = []
            leaveOutageIfRedisAnswers(then: records)
        } else {
            leaveOutage()
        }
    }

    private func leaveOutageIfRedisAnswers(then records: [EventMessage]) {
        do {
            try redis.ensureConnected(deadline: Date().timeIntervalSince1970 + 1)
        } catch {
            backlog = records
            enterOutage(sink: "Redis", error: "\(error)")
            return
        }
        leaveOutage()
        backlog = records
    }

    // MARK: - Rebalance and shutdown

    /// Before partitions are released, writes what was handled from them; on assignment,
    /// paused consumption stays paused during an outage.
    func rebalanced(_ event: RebalanceEvent) {
        switch event {
        case .revoked(let partitions, let lost):
            if !unit.isEmpty && !lost {
                let deadline = Date().timeIntervalSince1970 + Double(config.shutdownTimeoutMs) / 1000
                commitUnit(deadline: deadline, revoked: Set(partitions))
            } else if !unit.isEmpty {
                abandonUnit(reason: "partitions lost", leaving: Set(partitions))
            }
            commitKafkaIfDue(force: true)
            state.forget(partitions)
            ownership.release(partitions)
            let revoked = Set(partitions)
            backlog.removeAll { revoked.contains(TopicPartition($0.topic, $0.partition)) }
            pendingKafkaCommit = pendingKafkaCommit.filter { !revoked.contains($0.key) }
            appliedOffsets = appliedOffsets.filter { !revoked.contains($0.key) }
            Log.shared.info("partitions revoked", ["partitions": .int(partitions.count), "lost": .boolean(lost)])
            // The consumer still lists them until this callback returns.
            let remaining = consumer.assignment().filter { !revoked.contains($0) }.count
            control.update(worker: index) { $0.assignedPartitions = remaining }
        case .assigned(let partitions):
            if outage != nil {
                try? consumer.pause(partitions)
            }
            Log.shared.info("partitions assigned", ["partitions": .int(partitions.count)])
            control.update(worker: index) { $0.assignedPartitions = consumer.assignment().count }
        }
    }

    func shutDown() {
        let deadline = Date().timeIntervalSince1970 + Double(config.shutdownTimeoutMs) / 1000
        Log.shared.info("worker stopping: writing the last batch and committing")
        if !backlog.isEmpty && outage == nil {
            handleBacklogForShutdown()
        }
        if !unit.isEmpty || deadLetters.pendingCount > 0 {
            commitUnit(deadline: deadline)
        }
        commitKafkaIfDue(force: true)
        control.finishedCommitting(deadline: deadline)
        consumer.close()
        deadLetters.close()
        control.update(worker: index) { $0.workerStopped = true; $0.consumerJoined = false }
        Log.shared.info("worker stopped")
    }

    private func handleBacklogForShutdown() {
        // Records polled but not handled are simply left: their offsets were never stored, so
        // the next owner consumes them.
        backlog.removeAll()
    }

    func elapsed(since start: UInt64) -> Double {
        Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
    }
}
