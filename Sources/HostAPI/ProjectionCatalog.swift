import Foundation

/// A projection that passed loading and `init`, as published to the threads that run it.
public struct ProjectionDefinition: Sendable, Equatable {
    public var name: String
    public var code: ProjectionCode
    /// SHA-256 of the file and of every library module it required, in hex.
    public var version: String
    public var topics: [String]
    public var queries: [String]
    public var scripts: [RedisScript]
    public var requiredLibraries: [String]
    /// Statements `init` queued (ClickHouse DDL), to run before the version serves.
    public var initEffects: [Effect]
    /// When this version was loaded, in epoch milliseconds.
    public var loadedAtMs: Int64

    /// The first 12 hex digits of the version, as shown in logs and responses.
    public var shortVersion: String { String(version.prefix(12)) }
}

/// An immutable set of loaded projections. Each reload publishes a new one; workers swap to it
/// between batches and query threads between requests.
public struct ProjectionSet: Sendable {
    /// Increases by one with every published set.
    public var generation: Int
    public var projections: [ProjectionDefinition]
    /// Files that failed and had no earlier version to keep, with their errors.
    public var unloadedFailures: [ProjectionFailure]

    public init(generation: Int = 0, projections: [ProjectionDefinition] = [],
                unloadedFailures: [ProjectionFailure] = []) {
        self.generation = generation
        self.projections = projections
        self.unloadedFailures = unloadedFailures
    }

    public func projection(named name: String) -> ProjectionDefinition? {
        projections.first { $0.name == name }
    }

    /// Every topic some projection consumes, sorted.
    public var topics: [String] {
        Array(Set(projections.flatMap(\.topics))).sorted()
    }
}

/// What happened to each file in a load or reload.
public struct ReloadReport: Sendable {
    public enum Entry: Sendable, Equatable {
        /// A new or changed file loaded; `previousVersion` is nil for a new projection.
        case loaded(name: String, file: String, version: String, previousVersion: String?)
        case unchanged(name: String, file: String, version: String)
        /// A file failed; `keptVersion` is the version still serving, if there was one.
        case failed(ProjectionFailure, keptVersion: String?)
        case removed(name: String, file: String, version: String)
    }

    public var entries: [Entry]
    public var generation: Int

    public var failures: [ProjectionFailure] {
        entries.compactMap {
            if case .failed(let failure, _) = $0 { return failure }
            return nil
        }
    }

    public var succeeded: Bool { failures.isEmpty }
}
