import Synchronization

/// Flags and health facts shared between the worker, the signal thread and the HTTP threads.
public final class RuntimeControl: Sendable {
    private let stopping = Atomic<Bool>(false)
    private let health = Mutex(Health())

    /// What `/health` and `/ready` report about the services the worker depends on.
    public struct Health: Sendable {
        public var consumerJoined = false
        public var assignedPartitions = 0
        public var redisReachable = false
        public var redisError: String?
        public var clickhouseReachable = true
        public var clickhouseError: String?
        public var kafkaError: String?
        /// Why consumption is paused (a failing write), or nil while it runs.
        public var pausedReason: String?
        /// Set once the worker has left its loop.
        public var workerStopped = false
    }

    public init() {}

    public var isStopping: Bool { stopping.load(ordering: .acquiring) }

    /// Asks the worker to stop fetching, flush, commit and leave the group.
    public func stop() {
        stopping.store(true, ordering: .releasing)
    }

    public var snapshot: Health { health.withLock { $0 } }

    public func update(_ body: (inout Health) -> Void) {
        health.withLock { body(&$0) }
    }
}
