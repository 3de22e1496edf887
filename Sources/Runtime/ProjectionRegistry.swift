import Foundation
import HostAPI
import Synchronization

/// The published projection set and the runtime's record of each projection: status, last
/// error, counters and how fresh its served data is. The workers, the reload path and the HTTP
/// threads share it, and every access takes the lock briefly and copies out.
public final class ProjectionRegistry: Sendable {
    /// The entry of one projection in `/projections`.
    public struct Status: Sendable {
        public var name: String
        public var file: String
        public var version: String
        public var loadedAtMs: Int64
        public var topics: [String]
        public var queries: [String]
        /// The error of the newest failed reload of this projection's file, while its previous
        /// version keeps serving. It is nil once a reload of the file succeeds.
        public var loadError: ProjectionFailure?
        /// The last error a handler raised on an event, with when it happened.
        public var lastEventError: ProjectionFailure?
        public var lastErrorAtMs: Int64?
        public var eventsHandled: Int64 = 0
        public var eventsFailed: Int64 = 0
        /// Next offset to apply per "topic/partition", after Redis acknowledged the effects.
        public var appliedOffsets: [String: Int64] = [:]
        /// Kafka timestamp of the newest event whose effects were applied.
        public var lastEventTimestampMs: Int64?
        public var lastAppliedAtMs: Int64?
    }

    private struct State {
        var set = ProjectionSet()
        var statuses: [String: Status] = [:]
        /// Files that failed with no earlier version, by file.
        var unloaded: [String: ProjectionFailure] = [:]
        var lastReport: ReloadReport?
    }

    private let state = Mutex(State())
    public let loader: ProjectionLoader

    public init(loader: ProjectionLoader) {
        self.loader = loader
    }

    public var current: ProjectionSet { state.withLock { $0.set } }
    public var generation: Int { state.withLock { $0.set.generation } }

    /// Loads the folder again and publishes the result. `runStatements` executes each new
    /// version's `init` statements (ClickHouse DDL) before it is published; a version whose
    /// statements fail is treated like a file that failed to load.
    public func reload(nowMs: Int64, runStatements: ([Effect], ProjectionDefinition) -> ProjectionFailure?)
        throws(ProjectionLoader.FolderError) -> ReloadReport
    {
        let previous = current
        var (set, report) = try loader.load(previous: previous, nowMs: nowMs)
        (set, report) = applyStatements(set: set, report: report, previous: previous, runStatements: runStatements)

        state.withLock { state in
            state.set = set
            state.lastReport = report
            state.unloaded = [:]
            for failure in set.unloadedFailures {
                state.unloaded[failure.file] = failure
            }
            var statuses: [String: Status] = [:]
            for definition in set.projections {
                var status = state.statuses[definition.name] ?? Status(
                    name: definition.name, file: definition.code.file, version: definition.version,
                    loadedAtMs: definition.loadedAtMs, topics: definition.topics, queries: definition.queries)
                status.file = definition.code.file
                status.version = definition.version
                status.loadedAtMs = definition.loadedAtMs
                status.topics = definition.topics
                status.queries = definition.queries
                statuses[definition.name] = status
            }
            for entry in report.entries {
                switch entry {
                case .loaded(let name, _, _, _), .unchanged(let name, _, _):
                    // Unchanged also clears it: the file was restored to the version serving.
                    statuses[name]?.loadError = nil
                case .failed(let failure, .some):
                    if let name = set.projections.first(where: { $0.code.file == failure.file })?.name {
                        statuses[name]?.loadError = failure
                        statuses[name]?.lastErrorAtMs = nowMs
                    }
                default:
                    break
                }
            }
            state.statuses = statuses
        }
        return report
    }

    /// Runs the `init` statements of newly loaded versions; a failure keeps the old version.
    private func applyStatements(set: ProjectionSet, report: ReloadReport, previous: ProjectionSet,
                                 runStatements: ([Effect], ProjectionDefinition) -> ProjectionFailure?)
        -> (ProjectionSet, ReloadReport)
    {
        var set = set
        var report = report
        for (index, entry) in report.entries.enumerated() {
            guard case .loaded(let name, _, _, _) = entry,
                  let position = set.projections.firstIndex(where: { $0.name == name }) else { continue }
            let definition = set.projections[position]
            guard let failure = runStatements(definition.initEffects, definition) else { continue }
            if let old = previous.projections.first(where: { $0.code.file == definition.code.file }) {
                set.projections[position] = old
                report.entries[index] = .failed(failure, keptVersion: old.version)
            } else {
                set.projections.remove(at: position)
                set.unloadedFailures.append(failure)
                report.entries[index] = .failed(failure, keptVersion: nil)
            }
        }
        return (set, report)
    }

    public var statuses: [Status] {
        state.withLock { $0.statuses.values.sorted { $0.name < $1.name } }
    }

    public func status(named name: String) -> Status? {
        state.withLock { $0.statuses[name] }
    }

    public var unloadedFailures: [ProjectionFailure] {
        state.withLock { $0.unloaded.values.sorted { $0.file < $1.file } }
    }

    public var lastReport: ReloadReport? { state.withLock { $0.lastReport } }

    /// Records handler outcomes of a batch whose effects were applied.
    public func recordApplied(_ applied: [String: AppliedProgress], nowMs: Int64) {
        state.withLock { state in
            for (name, progress) in applied {
                guard var status = state.statuses[name] else { continue }
                status.eventsHandled += progress.handled
                status.eventsFailed += progress.failed
                for (partition, offset) in progress.nextOffsets {
                    status.appliedOffsets[partition] = offset
                }
                if let timestamp = progress.lastEventTimestampMs {
                    status.lastEventTimestampMs = max(status.lastEventTimestampMs ?? timestamp, timestamp)
                }
                if let failure = progress.lastFailure {
                    status.lastEventError = failure
                    status.lastErrorAtMs = nowMs
                }
                status.lastAppliedAtMs = nowMs
                state.statuses[name] = status
            }
        }
    }
}

/// The progress of one projection in a batch, reported to the registry after its effects applied.
public struct AppliedProgress: Sendable {
    public var handled: Int64 = 0
    public var failed: Int64 = 0
    public var nextOffsets: [String: Int64] = [:]
    public var lastEventTimestampMs: Int64?
    public var lastFailure: ProjectionFailure?

    public init() {}
}
