/// The projections of one set, instantiated on one thread, routing each event to every
/// projection subscribed to its topic.
///
/// A runner belongs to the thread that created it, like the Lua states inside. It swaps to a
/// newer set only when `swap(to:)` is called, which its owner does between batches, so an event
/// is always handled entirely by one version.
public final class ProjectionRunner {
    public private(set) var set: ProjectionSet
    private var instances: [String: ProjectionInstance] = [:]
    private var byTopic: [String: [ProjectionInstance]] = [:]
    private let settings: HostSettings

    /// One projection's outcome for one event.
    public struct Result {
        public var projection: String
        public var version: String
        public var outcome: EventOutcome
    }

    public init(set: ProjectionSet, settings: HostSettings) {
        self.set = ProjectionSet()
        self.settings = settings
        _ = swap(to: set)
    }

    /// Instantiates the projections of `newSet`, keeping the states of unchanged versions.
    /// Returns failures of projections that validated elsewhere but could not be built here
    /// (for example when this state hits the memory cap); those keep their previous instance.
    @discardableResult
    public func swap(to newSet: ProjectionSet) -> [ProjectionFailure] {
        var next: [String: ProjectionInstance] = [:]
        var failures: [ProjectionFailure] = []
        for definition in newSet.projections {
            if let current = instances[definition.name], current.code == definition.code {
                next[definition.name] = current
                continue
            }
            do {
                next[definition.name] = try ProjectionInstance(
                    code: definition.code, limits: settings.limits, jsonLimits: settings.jsonLimits,
                    sortObjectKeys: settings.sortObjectKeys)
            } catch {
                failures.append(error)
                if let current = instances[definition.name] {
                    next[definition.name] = current
                }
            }
        }
        instances = next
        set = newSet
        byTopic = [:]
        for name in instances.keys.sorted() {
            let instance = instances[name]!
            for topic in instance.topics {
                byTopic[topic, default: []].append(instance)
            }
        }
        return failures
    }

    public func instance(named name: String) -> ProjectionInstance? {
        instances[name]
    }

    public var subscribedTopics: [String] { byTopic.keys.sorted() }

    /// Names of the projections that consume `topic`, in the order they handle its events.
    public func projections(subscribedTo topic: String) -> [String] {
        byTopic[topic]?.map(\.name) ?? []
    }

    /// Hands `message` to every projection subscribed to its topic, in name order. A failure of
    /// one projection does not stop the others.
    public func handle(_ message: EventMessage, store: KeyedStateStore, nowMs: Int64) -> [Result] {
        guard let subscribers = byTopic[message.topic] else { return [] }
        var results: [Result] = []
        results.reserveCapacity(subscribers.count)
        for instance in subscribers {
            let version = set.projection(named: instance.name)?.version ?? ""
            results.append(Result(projection: instance.name, version: version,
                                  outcome: instance.handle(message, store: store, nowMs: nowMs)))
        }
        return results
    }
}
