import Foundation
import HostAPI
import Synchronization

/// The result of a reload, as `POST /admin/reload` returns it.
public struct ReloadOutcome: Sendable {
    public var succeeded: Bool
    public var json: [UInt8]
}

/// Starts and stops everything of `projection-runtime run`: the projection registry, the
/// worker threads, both HTTP ports and the signal thread.
public final class RuntimeService: Sendable {
    private let config: RuntimeConfig
    private let registry: ProjectionRegistry
    private let control: RuntimeControl
    private let workerCount: Int
    private let metrics: RuntimeMetrics
    /// Serializes reloads from SIGHUP and from `POST /admin/reload`.
    private let reloadLock = Mutex(())
    /// When to reload again because the last reload found ClickHouse unreachable, in seconds
    /// since 1970, or nil.
    private let initRetryAt = Mutex<Double?>(nil)

    public init(config: RuntimeConfig) {
        self.config = config
        self.registry = ProjectionRegistry(loader: ProjectionLoader(folder: config.projections.directory,
                                                                    settings: config.hostSettings))
        self.metrics = RuntimeMetrics()
        self.workerCount = config.workers > 0 ? config.workers : max(ProcessInfo.processInfo.activeProcessorCount, 1)
        self.control = RuntimeControl(workers: workerCount)
    }

    /// Runs until SIGTERM or SIGINT; returns the process exit code.
    public func run() -> Int32 {
        let signals = SignalThread.blockHandledSignals()
        Log.shared.info("projection-runtime starting", ["env": .string(config.deploymentEnvironment)])
        for (key, value) in config.redactedDescription() {
            Log.shared.debug("setting", ["key": .string(key), "value": .string(value)])
        }
        if let notice = config.clickhousePortNotice {
            Log.shared.warn(notice)
        }
        for name in config.unrecognizedEnvironmentVariables {
            Log.shared.warn("unknown DATA_PROC_ variable ignored; check its spelling against docs/configuration.md",
                            ["variable": .string(name)])
        }
        Log.shared.info("ClickHouse is written over its HTTP interface", [
            "clickhouse.host": .string(config.clickhouse.host), "clickhouse.http_port": .int(config.clickhouse.httpPort),
        ])

        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: config.projections.directory, isDirectory: &isDirectory),
              isDirectory.boolValue else {
            Log.shared.error("the projections folder does not exist; set DATA_PROC_PROJECTIONS_DIR or --projections", [
                "projections.dir": .string(config.projections.directory),
            ])
            return 1
        }
        // The ports open before the projections load, so that liveness probes get a response
        // while init statements wait for ClickHouse. /ready returns 503 until a projection is
        // loaded.
        let servers: [HTTPServer]
        do {
            servers = try startServers()
        } catch {
            Log.shared.error("cannot start the HTTP servers", ["error": .string("\(error)")])
            return 1
        }
        let initial = reload(trigger: "start")
        if !initial.succeeded {
            Log.shared.warn("some projections failed to load at start; see /health and /projections")
        }

        var threads: [WorkerThread] = []
        for index in 0..<workerCount {
            do {
                let worker = try PipelineWorker(index: index, config: config, registry: registry,
                                                control: control, metrics: metrics)
                threads.append(WorkerThread(worker: worker, index: index))
            } catch {
                Log.shared.error("cannot create a worker", ["worker": .int(index), "error": .string("\(error)")])
                servers.forEach { $0.stop() }
                return 1
            }
        }
        Log.shared.info("starting workers", ["workers": .int(workerCount)])
        threads.forEach { $0.start() }

        signals.wait(control: control, reload: { [self] in _ = reload(trigger: "SIGHUP") },
                     everySecond: { [self] in retryInitIfDue() })
        Log.shared.info("shutting down", ["timeout_ms": .int(config.shutdownTimeoutMs)])
        let deadline = DispatchTime.now() + Double(config.shutdownTimeoutMs) / 1000 + 2
        let finished = threads.allSatisfy { $0.join(until: deadline) }
        servers.forEach { $0.stop() }
        if !finished {
            Log.shared.error("a worker did not stop in time; exiting without its final commit")
            return 1
        }
        Log.shared.info("projection-runtime stopped")
        return 0
    }

    private func startServers() throws(HTTPServerError) -> [HTTPServer] {
        let health = HealthService(registry: registry, control: control, metrics: metrics)
        let queries = QueryService(config: config, registry: registry, metrics: metrics) { [self] in
            reload(trigger: "POST /admin/reload")
        }
        let healthServer = try HTTPServer(name: "health port", bindAddress: config.http.bindAddress, port: config.http.healthPort,
                                          threads: 2, handler: { health.handle($0) })
        let apiServer = try HTTPServer(name: "internal API", bindAddress: config.http.bindAddress, port: config.http.apiPort,
                                       threads: 4, handler: { queries.handle($0) })
        Log.shared.info("listening", ["health_port": .int(healthServer.port), "api_port": .int(apiServer.port),
                                      "bind": .string(config.http.bindAddress)])
        return [healthServer, apiServer]
    }

    /// Reloads once the retry time set by a reload that found ClickHouse unreachable has come.
    private func retryInitIfDue() {
        guard let due = initRetryAt.withLock({ $0 }), Date().timeIntervalSince1970 >= due else { return }
        Log.shared.info("retrying the projections whose init statements found ClickHouse unreachable")
        // One second per statement, not 15: this thread also receives SIGTERM.
        _ = reload(trigger: "ClickHouse retry", statementRetrySeconds: 1)
    }

    /// Loads the projections folder again, runs the `init` statements of new versions against
    /// ClickHouse, publishes the set and reports what happened. Workers and query threads swap
    /// at their next batch or request.
    public func reload(trigger: String, statementRetrySeconds: Double = 15) -> ReloadOutcome {
        reloadLock.withLock { _ in
            let clickhouse: ClickHouseClient
            do {
                clickhouse = try ClickHouseClient(settings: config.clickhouseSettings)
            } catch {
                Log.shared.error("cannot create a ClickHouse client for the reload", ["error": .string("\(error)")])
                return ReloadOutcome(succeeded: false, json: Array(#"{"error":"cannot create a ClickHouse client"}"#.utf8))
            }
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            var unreachable = false
            defer {
                let retryAt = unreachable ? Date().timeIntervalSince1970 + Self.initRetrySeconds : nil
                initRetryAt.withLock { $0 = retryAt }
            }
            do {
                let report = try registry.reload(nowMs: now) { effects, definition in
                    let (failure, retryable) = Self.runStatements(effects, of: definition, on: clickhouse,
                                                                  retryingForSeconds: statementRetrySeconds)
                    unreachable = unreachable || retryable
                    return failure
                }
                logReport(report, trigger: trigger)
                metrics.recordReload(result: report.succeeded ? "ok" : "partial")
                return ReloadOutcome(succeeded: report.succeeded, json: Self.reportJSON(report, trigger: trigger))
            } catch {
                Log.shared.error("reload failed", ["trigger": .string(trigger), "error": .string("\(error)")])
                metrics.recordReload(result: "error")
                var writer = JSONWriter()
                writer.beginObject()
                writer.field("error", first: true)
                writer.string("\(error)")
                writer.endObject()
                return ReloadOutcome(succeeded: false, json: writer.bytes)
            }
        }
    }

    /// Executes `init` statements; the first failure names the projection and the statement,
    /// and whether ClickHouse was unreachable rather than rejecting it. While ClickHouse is
    /// unreachable, each statement is retried for up to `seconds` (15 on start and on request),
    /// so that a ClickHouse that starts a little after the runtime does not fail the load. After
    /// that, the whole reload is retried every `initRetrySeconds`.
    private static func runStatements(_ effects: [Effect], of definition: ProjectionDefinition,
                                      on clickhouse: ClickHouseClient,
                                      retryingForSeconds seconds: Double) -> (ProjectionFailure?, retryable: Bool) {
        for case .clickhouseStatement(let sql) in effects {
            if let error = execute(sql, on: clickhouse, retryingForSeconds: seconds) {
                let message = error.isRetryable
                    ? "ClickHouse is unreachable for a statement from init (the load is retried every \(Int(initRetrySeconds)) s): \(error)"
                    : "ClickHouse rejected a statement from init: \(error)"
                return (ProjectionFailure(phase: .initialize, projection: definition.name, file: definition.code.file,
                                          message: message), error.isRetryable)
            }
        }
        for case .log(let level, let message, let fields) in effects {
            Log.shared.write(level, message, ["projection": .string(definition.name), "fields": .json(fields)])
        }
        return (nil, false)
    }

    /// The wait before a reload is retried because ClickHouse was unreachable.
    static let initRetrySeconds = 10.0

    private static func execute(_ sql: String, on clickhouse: ClickHouseClient,
                                retryingForSeconds seconds: Double) -> ClickHouseError? {
        let deadline = Date().timeIntervalSince1970 + seconds
        var backoff = Backoff()
        while true {
            do {
                try clickhouse.execute(sql)
                return nil
            } catch {
                guard error.isRetryable, Date().timeIntervalSince1970 < deadline else { return error }
                Log.shared.warn("ClickHouse is unreachable; retrying an init statement",
                                ["error": .string("\(error)"), "retry_in_ms": .int(backoff.nextDelayMs)])
                backoff.sleep()
            }
        }
    }

    private func logReport(_ report: ReloadReport, trigger: String) {
        for entry in report.entries {
            switch entry {
            case .loaded(let name, let file, let version, let previous):
                Log.shared.info(previous == nil ? "projection loaded" : "projection reloaded", [
                    "projection": .string(name), "file": .string(file), "version": .string(String(version.prefix(12))),
                    "trigger": .string(trigger),
                ])
            case .unchanged:
                break
            case .failed(let failure, let kept):
                let name = failure.projection
                    ?? registry.current.projections.first { $0.code.file == failure.file }?.name
                Log.shared.error("projection failed to load", [
                    "projection": .string(name ?? "(none loaded)"), "file": .string(failure.file),
                    "line": .int(failure.line ?? 0), "phase": .string(failure.phase.rawValue),
                    "error": .string(failure.message), "kept_version": .string(kept.map { String($0.prefix(12)) } ?? "none"),
                    "trigger": .string(trigger),
                ])
            case .removed(let name, let file, _):
                Log.shared.info("projection unloaded", ["projection": .string(name), "file": .string(file),
                                                        "trigger": .string(trigger)])
            }
        }
    }

    static func reportJSON(_ report: ReloadReport, trigger: String) -> [UInt8] {
        var writer = JSONWriter()
        writer.beginObject()
        writer.field("trigger", first: true)
        writer.string(trigger)
        writer.field("generation")
        writer.integer(report.generation)
        writer.field("succeeded")
        writer.boolean(report.succeeded)
        writer.field("entries")
        writer.array(report.entries) { entry, writer in
            writer.beginObject()
            switch entry {
            case .loaded(let name, let file, let version, let previous):
                entryHead(previous == nil ? "loaded" : "changed", name, file, &writer)
                writer.field("version")
                writer.string(String(version.prefix(12)))
            case .unchanged(let name, let file, let version):
                entryHead("unchanged", name, file, &writer)
                writer.field("version")
                writer.string(String(version.prefix(12)))
            case .failed(let failure, let kept):
                entryHead("failed", failure.projection ?? "", failure.file, &writer)
                writer.field("error")
                writeFailure(failure, to: &writer)
                writer.field("kept_version")
                if let kept { writer.string(String(kept.prefix(12))) } else { writer.null() }
            case .removed(let name, let file, _):
                entryHead("removed", name, file, &writer)
            }
            writer.endObject()
        }
        writer.endObject()
        return writer.bytes
    }

    private static func entryHead(_ result: String, _ name: String, _ file: String, _ writer: inout JSONWriter) {
        writer.field("result", first: true)
        writer.string(result)
        writer.field("projection")
        writer.string(name)
        writer.field("file")
        writer.string(file)
    }
}

/// The worker's thread. `PipelineWorker` is not Sendable, so it moves into the thread once and
/// is never touched from outside again.
final class WorkerThread: @unchecked Sendable {
    private var worker: PipelineWorker?
    private let done = DispatchSemaphore(value: 0)

    private let index: Int

    init(worker: PipelineWorker, index: Int) {
        self.worker = worker
        self.index = index
    }

    func start() {
        let thread = Thread { [self] in
            let worker = self.worker!
            self.worker = nil
            worker.run()
            done.signal()
        }
        thread.name = "worker-\(index)"
        thread.stackSize = 8 << 20
        thread.start()
    }

    /// Waits for the worker to finish; false when it did not finish by `deadline`.
    func join(until deadline: DispatchTime) -> Bool {
        done.wait(timeout: deadline) == .success
    }
}
