import Foundation
import Synchronization

/// Flags and health facts shared between the worker, the signal thread and the HTTP threads.
public final class RuntimeControl: Sendable {
    private let stopping = Atomic<Bool>(false)
    /// One entry per worker thread.
    private let health: Mutex<[Health]>

    /// What `/health` and `/ready` report about the services the worker depends on.
    public struct Health: Sendable {
        public var consumerJoined = false
        public var assignedPartitions = 0
        public var redisReachable = false
        public var redisError: String?
        public var clickhouseReachable = true
        public var clickhouseError: String?
        /// The error of the failed subscription, or nil.
        public var kafkaError: String?
        /// The reason no Kafka broker can be reached, or nil while one responds.
        public var brokersDown: String?
        /// The reason consumption is paused (a failing write), or nil while it runs.
        public var pausedReason: String?
        /// Set once the worker has left its loop.
        public var workerStopped = false
    }

    public init(workers: Int = 1) {
        health = Mutex(Array(repeating: Health(), count: max(workers, 1)))
    }

    public var isStopping: Bool { stopping.load(ordering: .acquiring) }

    private let committedForShutdown = Atomic<Int>(0)

    /// Waits until every worker has made its final commit, or until `deadline` (seconds since
    /// 1970). A worker that leaves the group starts a rebalance, during which the broker
    /// rejects the other members' commits, so no worker leaves before all have committed.
    public func finishedCommitting(deadline: Double) {
        let workers = health.withLock { $0.count }
        committedForShutdown.add(1, ordering: .acquiringAndReleasing)
        while committedForShutdown.load(ordering: .acquiring) < workers,
              Date().timeIntervalSince1970 < deadline {
            usleep(5_000)
        }
    }

    /// Asks the worker to stop fetching, flush, commit and leave the group.
    public func stop() {
        stopping.store(true, ordering: .releasing)
    }

    /// The workers' health combined: joined, reachable and running only when every worker
    /// is; the first error of any worker.
    public var snapshot: Health {
        health.withLock { workers in
            var combined = Health()
            combined.consumerJoined = workers.allSatisfy(\.consumerJoined)
            combined.assignedPartitions = workers.reduce(0) { $0 + $1.assignedPartitions }
            combined.redisReachable = workers.allSatisfy(\.redisReachable)
            combined.redisError = workers.lazy.compactMap(\.redisError).first
            combined.clickhouseReachable = workers.allSatisfy(\.clickhouseReachable)
            combined.clickhouseError = workers.lazy.compactMap(\.clickhouseError).first
            combined.kafkaError = workers.lazy.compactMap(\.kafkaError).first
            combined.brokersDown = workers.lazy.compactMap(\.brokersDown).first
            combined.pausedReason = workers.lazy.compactMap(\.pausedReason).first
            combined.workerStopped = workers.contains(where: \.workerStopped)
            return combined
        }
    }

    /// Returns the health entry of worker `worker`.
    public func health(worker: Int) -> Health {
        health.withLock { $0.indices.contains(worker) ? $0[worker] : Health() }
    }

    /// Changes the health entry of worker `worker`.
    public func update(worker: Int, _ body: (inout Health) -> Void) {
        health.withLock { workers in
            if workers.indices.contains(worker) {
                body(&workers[worker])
            }
        }
    }
}
