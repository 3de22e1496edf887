import Foundation
import HostAPI
import Runtime

/// `check`: validates the configuration, loads the projections once and lists every error
/// with file:line.
struct CheckCommand {
    var configFile: String?
    var flags: [String: String]

    func run() -> Int32 {
        let config: RuntimeConfig
        do {
            config = try RuntimeConfig.load(environment: ProcessInfo.processInfo.environment,
                                            configFile: configFile, flags: flags)
        } catch {
            print("error  configuration: \(error)")
            return 1
        }
        print("ok     configuration" + (configFile.map { " \($0)" } ?? " (defaults and environment)"))
        let folder = config.projections.directory
        let loader = ProjectionLoader(folder: folder, settings: config.hostSettings)
        let report: ReloadReport
        let set: ProjectionSet
        do {
            (set, report) = try loader.load(nowMs: currentTimeMs())
        } catch {
            printError("error: \(error)")
            return 1
        }
        for definition in set.projections {
            let topics = definition.topics.joined(separator: ", ")
            print("ok     \(definition.code.file): projection \(definition.name), version \(definition.shortVersion), topics \(topics)")
        }
        for failure in report.failures {
            print("error  \(failure)")
            if !failure.traceback.isEmpty {
                print(failure.traceback.split(separator: "\n").map { "       " + $0 }.joined(separator: "\n"))
            }
        }
        if set.projections.isEmpty && report.failures.isEmpty {
            printError("error: no projection files (*.lua) in \(folder)")
            return 1
        }
        print("\(set.projections.count) loaded, \(report.failures.count) failed")
        return report.failures.isEmpty ? 0 : 1
    }
}

/// `test`: runs an events file through one file or a folder offline.
struct TestCommand {
    var path: String
    var eventsFile: String
    var topic: String?

    func run() throws(UsageError) -> Int32 {
        var settings = HostSettings()
        settings.sortObjectKeys = true
        let (set, report) = try loadProjections(settings: settings)
        for failure in report.failures {
            printError("error: \(failure)")
        }
        guard !set.projections.isEmpty else {
            printError("error: no projection loaded from \(path)")
            return 1
        }
        guard let data = FileManager.default.contents(atPath: eventsFile) else {
            throw UsageError(message: "test: cannot read the events file \(eventsFile)")
        }

        let runner: OfflineRunner
        do {
            runner = try OfflineRunner(set: set, settings: settings, topic: topic)
        } catch {
            printError("error: \(error.message)")
            return 1
        }
        var output = runner.initLines()
        var number = 0
        for line in data.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            number += 1
            output += runner.run(line: Array(line), number: number)
        }
        FileHandle.standardOutput.write(Data(output.map { $0 + "\n" }.joined().utf8))
        let failed = runner.errorCount + report.failures.count
        return failed == 0 ? 0 : 1
    }

    /// Loads `path` as a folder, or as a single file with the `lib` folder beside it.
    private func loadProjections(settings: HostSettings) throws(UsageError) -> (ProjectionSet, ReloadReport) {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw UsageError(message: "test: \(path) does not exist")
        }
        let folder = isDirectory.boolValue ? path : (path as NSString).deletingLastPathComponent
        let loader = ProjectionLoader(folder: folder.isEmpty ? "." : folder, settings: settings)
        do {
            if isDirectory.boolValue {
                return try loader.load(nowMs: 0)
            }
            return try loader.loadFile(path, nowMs: 0)
        } catch {
            throw UsageError(message: "test: \(error)")
        }
    }
}

/// `run`: loads the configuration and runs the service until SIGTERM or SIGINT.
struct RunCommand {
    var configFile: String?
    var flags: [String: String]

    func run() -> Int32 {
        let config: RuntimeConfig
        do {
            config = try RuntimeConfig.load(environment: ProcessInfo.processInfo.environment,
                                            configFile: configFile, flags: flags)
        } catch {
            printError("projection-runtime: \(error)")
            return 2
        }
        Log.shared.level = config.logLevel
        return RuntimeService(config: config).run()
    }
}
