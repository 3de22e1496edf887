import HostAPI

/// The health port (`DATA_PROC_PROJECTION_PORT`): `/health` for liveness, `/ready` for
/// readiness and `/metrics` for Prometheus.
final class HealthService: Sendable {
    private let registry: ProjectionRegistry
    private let control: RuntimeControl
    private let metrics: RuntimeMetrics

    init(registry: ProjectionRegistry, control: RuntimeControl, metrics: RuntimeMetrics) {
        self.registry = registry
        self.control = control
        self.metrics = metrics
    }

    /// Called on libmicrohttpd's worker threads.
    func handle(_ request: HTTPRequest) -> HTTPResponse {
        guard request.method == "GET" || request.method == "HEAD" else {
            return .json(405, Array(#"{"error":"only GET and HEAD are allowed on the health port"}"#.utf8))
        }
        switch request.path {
        case "/health", "/healthz", "/livez":
            return health()
        case "/ready", "/readyz":
            return ready()
        case "/metrics":
            var response = HTTPResponse.text(200, metrics.render())
            response.contentType = "text/plain; version=0.0.4; charset=utf-8"
            return response
        default:
            return .json(404, Array(#"{"error":"no such endpoint (try /health, /ready or /metrics)"}"#.utf8))
        }
    }

    /// Returns why the runtime is not ready, or an empty list when it is.
    func notReadyReasons() -> [String] {
        let health = control.snapshot
        var reasons: [String] = []
        // Waiting for the group's first assignment is not a reason: the query API reads Redis
        // and serves every key whichever partitions this process owns, and a join can take the
        // broker's initial rebalance delay or longer. /health shows the join.
        if let error = health.kafkaError {
            reasons.append("the Kafka subscription failed: \(error)")
        }
        if let down = health.brokersDown {
            reasons.append("no Kafka broker is reachable: \(down)")
        }
        if !health.redisReachable {
            reasons.append(health.redisError.map { "Redis is not reachable: \($0)" } ?? "Redis is not connected yet")
        }
        if let paused = health.pausedReason {
            reasons.append("consumption is paused: \(paused)")
        }
        if registry.current.projections.isEmpty {
            reasons.append("no projection is loaded")
        }
        if health.workerStopped {
            reasons.append("the worker has stopped")
        }
        return reasons
    }

    private func ready() -> HTTPResponse {
        let reasons = notReadyReasons()
        var writer = JSONWriter()
        writer.beginObject()
        writer.field("ready", first: true)
        writer.boolean(reasons.isEmpty)
        writer.field("reasons")
        writer.array(reasons) { reason, writer in writer.string(reason) }
        writer.endObject()
        return .json(reasons.isEmpty ? 200 : 503, writer.bytes)
    }

    /// Liveness stays 200 while the process works, even when a dependency is down, so that
    /// Kubernetes restarts the pod only when a restart can help.
    private func health() -> HTTPResponse {
        let health = control.snapshot
        // Load errors only: a handler error on one event is counted and dead-lettered, and
        // tells nothing about the health of the process.
        let failures = registry.unloadedFailures + registry.statuses.compactMap(\.loadError)
        var writer = JSONWriter()
        writer.beginObject()
        writer.field("status", first: true)
        writer.string(health.workerStopped ? "stopped" : (notReadyReasons().isEmpty && failures.isEmpty ? "ok" : "degraded"))
        writer.field("components")
        writer.beginObject()
        let kafkaState = health.brokersDown != nil ? "unreachable" : (health.consumerJoined ? "joined" : "joining")
        component("kafka", ok: health.brokersDown == nil && health.kafkaError == nil,
                  state: kafkaState, error: health.kafkaError ?? health.brokersDown, first: true,
                  into: &writer) { writer in
            writer.field("assigned_partitions")
            writer.integer(health.assignedPartitions)
        }
        component("redis", ok: health.redisReachable, state: health.redisReachable ? "reachable" : "unreachable",
                  error: health.redisError, into: &writer)
        component("clickhouse", ok: health.clickhouseReachable,
                  state: health.clickhouseReachable ? "reachable" : "unreachable", error: health.clickhouseError,
                  into: &writer)
        writer.field("projections")
        writer.beginObject()
        writer.field("status", first: true)
        writer.string(failures.isEmpty ? "ok" : "error")
        writer.field("generation")
        writer.integer(registry.generation)
        writer.field("loaded")
        writer.array(registry.statuses) { status, writer in
            writer.beginObject()
            writer.field("name", first: true)
            writer.string(status.name)
            writer.field("version")
            writer.string(String(status.version.prefix(12)))
            writer.endObject()
        }
        writer.field("errors")
        writer.array(failures) { failure, writer in writeFailure(failure, to: &writer) }
        writer.endObject()
        writer.endObject()
        writer.endObject()
        return .json(health.workerStopped ? 503 : 200, writer.bytes)
    }

    private func component(_ name: String, ok: Bool, state: String, error: String?, first: Bool = false,
                           into writer: inout JSONWriter, extra: (inout JSONWriter) -> Void = { _ in }) {
        writer.field(name, first: first)
        writer.beginObject()
        writer.field("status", first: true)
        writer.string(ok ? "ok" : "error")
        writer.field("state")
        writer.string(state)
        if let error {
            writer.field("error")
            writer.string(error)
        }
        extra(&writer)
        writer.endObject()
    }
}
