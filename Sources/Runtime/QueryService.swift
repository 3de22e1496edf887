import Foundation
import HostAPI
import Synchronization

/// The internal API (`DATA_PROC_INTERNAL_API_PORT`): projection listing, queries and reload.
///
/// Queries run in Lua states of their own, one set per HTTP thread, never in a worker's. Each
/// HTTP thread also has its own Redis connection and ClickHouse client for the reads.
final class QueryService: Sendable {
    private let config: RuntimeConfig
    private let registry: ProjectionRegistry
    private let metrics: RuntimeMetrics
    private let reload: @Sendable () -> ReloadOutcome
    private let contexts = Mutex<[UInt: QueryContextBox]>([:])

    init(config: RuntimeConfig, registry: ProjectionRegistry, metrics: RuntimeMetrics,
         reload: @escaping @Sendable () -> ReloadOutcome) {
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.reload = reload
    }

    /// Called on libmicrohttpd's worker threads.
    func handle(_ request: HTTPRequest) -> HTTPResponse {
        let parts = request.path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        switch (request.method, parts.count) {
        case ("GET", 1) where parts[0] == "projections", ("HEAD", 1) where parts[0] == "projections":
            return .json(200, listProjections())
        case ("GET", 2) where parts[0] == "projections", ("GET", 3) where parts[0] == "projections":
            return query(projection: parts[1], query: parts.count == 3 ? parts[2] : "default",
                         parameters: request.query)
        case ("POST", 2) where parts == ["admin", "reload"]:
            let outcome = reload()
            return .json(outcome.succeeded ? 200 : 422, outcome.json)
        case (_, _) where parts.first == "admin" || parts.first == "projections":
            return errorResponse(405, "method \(request.method) is not allowed on \(request.path)")
        default:
            return errorResponse(404, "no such endpoint: \(request.path) (try GET /projections)")
        }
    }

    // MARK: - Queries

    private func query(projection name: String, query: String, parameters: [String: String]) -> HTTPResponse {
        let started = DispatchTime.now().uptimeNanoseconds
        let context = threadContext()
        context.swapIfReloaded(to: registry.current)
        guard let instance = context.runner.instance(named: name),
              let definition = context.runner.set.projection(named: name) else {
            let known = registry.current.projections.map(\.name).joined(separator: ", ")
            return errorResponse(404, "unknown projection '\(name)' (loaded: \(known))")
        }

        let outcome = instance.query(query, parameters: parameters, backend: context,
                                     nowMs: Int64(Date().timeIntervalSince1970 * 1000))
        for case .log(let level, let message, let fields) in instance.lastEffects {
            Log.shared.write(level, message, ["projection": .string(name), "query": .string(query),
                                              "fields": .json(fields)])
        }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
        let response = response(for: outcome, projection: name, query: query, definition: definition)
        metrics.recordQuery(projection: name, query: query, status: response.status, seconds: seconds)
        return response
    }

    private func response(for outcome: QueryOutcome, projection: String, query: String,
                          definition: ProjectionDefinition) -> HTTPResponse {
        let meta = freshness(projection: projection, definition: definition)
        var response: HTTPResponse
        switch outcome {
        case .found(let body):
            response = .json(200, Self.addingMeta(meta.json, to: body))
        case .notFound:
            response = errorResponse(404, "no data for this request", meta: meta.json)
        case .badRequest(let message):
            response = errorResponse(400, message, meta: meta.json)
        case .unknownQuery(let available):
            response = errorResponse(404, "projection '\(projection)' has no query '\(query)' (queries: \(available.joined(separator: ", ")))")
        case .failed(let failure):
            Log.shared.error("query failed", ["projection": .string(projection), "query": .string(query),
                                              "error": .string(failure.description)])
            response = errorResponse(500, failure.description, meta: meta.json)
        }
        response.headers += meta.headers
        return response
    }

    /// Returns the version that served the query and how fresh its data is: the offsets and
    /// event time whose effects the workers applied last.
    private func freshness(projection: String, definition: ProjectionDefinition)
        -> (json: [UInt8], headers: [(String, String)])
    {
        let status = registry.status(named: projection)
        var writer = JSONWriter()
        writer.beginObject()
        writer.field("projection", first: true)
        writer.string(projection)
        writer.field("version")
        writer.string(definition.shortVersion)
        writer.field("applied_at_ms")
        if let applied = status?.lastAppliedAtMs { writer.integer(applied) } else { writer.null() }
        writer.field("last_event_timestamp_ms")
        if let event = status?.lastEventTimestampMs { writer.integer(event) } else { writer.null() }
        let offsets = status?.appliedOffsets ?? [:]
        writer.field("applied_offsets")
        writer.object(offsets.keys.sorted()) { key, writer in writer.integer(offsets[key]!) }
        writer.endObject()

        var headers = [("X-Projection-Version", definition.shortVersion)]
        if let event = status?.lastEventTimestampMs {
            headers.append(("X-Projection-Event-Time-Ms", String(event)))
        }
        if let applied = status?.lastAppliedAtMs {
            headers.append(("X-Projection-Applied-At-Ms", String(applied)))
        }
        return (writer.bytes, headers)
    }

    /// Adds `"_meta": {...}` as the first member of a JSON object; other values stay as they are.
    static func addingMeta(_ meta: [UInt8], to body: [UInt8]) -> [UInt8] {
        guard body.first == UInt8(ascii: "{") else { return body }
        var out = Array(#"{"_meta":"#.utf8) + meta
        if body != Array("{}".utf8) {
            out.append(UInt8(ascii: ","))
        }
        out.append(contentsOf: body.dropFirst())
        return out
    }

    // MARK: - Listing

    private func listProjections() -> [UInt8] {
        let statuses = registry.statuses
        let unloaded = registry.unloadedFailures
        var writer = JSONWriter()
        writer.beginObject()
        writer.field("generation", first: true)
        writer.integer(registry.generation)
        writer.field("projections")
        writer.array(statuses) { status, writer in Self.writeStatus(status, to: &writer) }
        writer.field("failed_files")
        writer.array(unloaded) { failure, writer in writeFailure(failure, to: &writer) }
        writer.endObject()
        return writer.bytes
    }

    private static func writeStatus(_ status: ProjectionRegistry.Status, to writer: inout JSONWriter) {
        writer.beginObject()
        writer.field("name", first: true)
        writer.string(status.name)
        writer.field("file")
        writer.string(status.file)
        writer.field("version")
        writer.string(status.version)
        writer.field("loaded_at_ms")
        writer.integer(status.loadedAtMs)
        writer.field("status")
        writer.string(status.loadError == nil ? "ok" : "error")
        writer.field("topics")
        writer.array(status.topics) { topic, writer in writer.string(topic) }
        writer.field("queries")
        writer.array(status.queries) { query, writer in writer.string(query) }
        writer.field("events_handled")
        writer.integer(status.eventsHandled)
        writer.field("events_failed")
        writer.integer(status.eventsFailed)
        writer.field("load_error")
        if let failure = status.loadError { writeFailure(failure, to: &writer) } else { writer.null() }
        writer.field("last_event_error")
        if let failure = status.lastEventError { writeFailure(failure, to: &writer) } else { writer.null() }
        writer.field("last_error_at_ms")
        if let at = status.lastErrorAtMs { writer.integer(at) } else { writer.null() }
        writer.endObject()
    }

    private func errorResponse(_ status: Int, _ message: String, meta: [UInt8]? = nil) -> HTTPResponse {
        var writer = JSONWriter()
        writer.beginObject()
        writer.field("error", first: true)
        writer.string(message)
        if let meta {
            writer.field("_meta")
            writer.raw(meta)
        }
        writer.endObject()
        return .json(status, writer.bytes)
    }

    // MARK: - Per-thread query states

    private func threadContext() -> QueryContext {
        let thread = UInt(pthread_self())
        if let box = contexts.withLock({ $0[thread] }) {
            return box.context
        }
        let context = QueryContext(config: config, set: registry.current)
        contexts.withLock { $0[thread] = QueryContextBox(context: context) }
        return context
    }
}

/// A `QueryContext` stored in the service's table. Only the thread it was created for reads it
/// (the table is keyed by thread), so the unchecked conformance holds.
private final class QueryContextBox: @unchecked Sendable {
    let context: QueryContext

    init(context: QueryContext) {
        self.context = context
    }
}

/// One HTTP thread's query states and its connections for reads.
final class QueryContext: QueryBackend {
    private(set) var runner: ProjectionRunner
    private let redis: RedisConnection
    /// Nil only when libcurl could not create a handle; ClickHouse reads then fail.
    private let clickhouse: ClickHouseClient?

    init(config: RuntimeConfig, set: ProjectionSet) {
        self.runner = ProjectionRunner(set: set, settings: config.hostSettings)
        self.redis = RedisConnection(settings: config.redisSettings)
        self.clickhouse = try? ClickHouseClient(settings: config.clickhouseSettings)
    }

    func swapIfReloaded(to set: ProjectionSet) {
        if set.generation != runner.set.generation {
            runner.swap(to: set)
        }
    }

    /// Runs a read; a connection that Redis closed (after a restart) is reopened and the read
    /// tried once more, since reads are safe to repeat.
    func redis(_ arguments: [[UInt8]]) -> QueryReply {
        var lastError: RedisError?
        for _ in 0..<2 {
            do {
                try redis.ensureConnected(deadline: Date().timeIntervalSince1970 + 1)
                return try redis.command(arguments).queryReply
            } catch {
                lastError = error
            }
        }
        return .error("Redis read failed: \(lastError.map { "\($0)" } ?? "unknown error")")
    }

    func clickhouse(_ sql: String) -> QueryReply {
        guard let clickhouse else {
            return .error("ClickHouse query failed: no HTTP client could be created")
        }
        do {
            return .array(try clickhouse.select(sql).map { QueryReply.json($0) })
        } catch {
            return .error("ClickHouse query failed: \(error)")
        }
    }
}

func writeFailure(_ failure: ProjectionFailure, to writer: inout JSONWriter) {
    writer.beginObject()
    writer.field("file", first: true)
    writer.string(failure.file)
    writer.field("line")
    if let line = failure.line { writer.integer(line) } else { writer.null() }
    writer.field("projection")
    if let projection = failure.projection { writer.string(projection) } else { writer.null() }
    writer.field("phase")
    writer.string(failure.phase.rawValue)
    writer.field("message")
    writer.string(failure.message)
    writer.endObject()
}
