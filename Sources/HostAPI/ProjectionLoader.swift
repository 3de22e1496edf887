import Foundation

/// Loads the projections of a folder and reloads them: build every changed file in a fresh
/// state, validate it and run its `init`, then publish a new set. A file that fails keeps its
/// previous version; a removed file unloads; a new file loads.
public struct ProjectionLoader: Sendable {
    /// The projections folder as given by the user, such as `projections`.
    public var folder: String
    public var settings: HostSettings

    public init(folder: String, settings: HostSettings = HostSettings()) {
        self.folder = folder
        self.settings = settings
    }

    /// Library modules live in this subfolder and are reachable only through `require`.
    public var libraryFolder: String { (folder as NSString).appendingPathComponent("lib") }

    /// A failure to read the folder itself, as opposed to an error in one projection.
    public struct FolderError: Error, CustomStringConvertible {
        public var path: String
        public var reason: String
        public var description: String {
            "cannot read the projections folder \(path): \(reason) (check --projections or DATA_PROC_PROJECTIONS_DIR)"
        }
    }

    /// Loads the folder, reusing `previous` for unchanged files.
    public func load(previous: ProjectionSet = ProjectionSet(), nowMs: Int64) throws(FolderError)
        -> (ProjectionSet, ReloadReport)
    {
        let files = try projectionFiles()
        let libraries = try readLibraries()
        return reload(files: files, libraries: libraries, previous: previous, nowMs: nowMs)
    }

    /// Loads the single file `path` of the folder, for `projection-runtime test FILE`.
    public func loadFile(_ path: String, nowMs: Int64) throws(FolderError) -> (ProjectionSet, ReloadReport) {
        let name = (path as NSString).lastPathComponent
        guard name.hasSuffix(".lua"), let data = FileManager.default.contents(atPath: path) else {
            throw FolderError(path: path, reason: "not a readable .lua file")
        }
        let file = (path: path, stem: String(name.dropLast(4)), source: Array(data))
        return reload(files: [file], libraries: try readLibraries(), previous: ProjectionSet(), nowMs: nowMs)
    }

    /// Builds the code of every file, compares it with `previous` and publishes the result.
    func reload(files: [(path: String, stem: String, source: [UInt8])], libraries: LibrarySources,
                previous: ProjectionSet, nowMs: Int64) -> (ProjectionSet, ReloadReport) {
        var entries: [ReloadReport.Entry] = []
        var loaded: [ProjectionDefinition] = []
        var unloadedFailures: [ProjectionFailure] = []
        var claimedNames: [String: String] = [:]

        for file in files {
            let code = ProjectionCode(file: file.path, stem: file.stem, source: file.source,
                                      libraries: libraries,
                                      settings: settings.settingsJSON(forStem: file.stem))
            let old = previous.projections.first { $0.code.file == file.path }
            var result = build(code: code, reusing: old, nowMs: nowMs)

            if case .success(let definition) = result, let owner = claimedNames[definition.name] {
                result = .failure(ProjectionFailure(
                    phase: .validate, projection: definition.name, file: file.path,
                    message: "projection name '\(definition.name)' is already used by \(owner); names must be unique in the folder"))
            }
            switch result {
            case .success(let definition):
                claimedNames[definition.name] = file.path
                loaded.append(definition)
                if definition == old {
                    entries.append(.unchanged(name: definition.name, file: file.path, version: definition.version))
                } else {
                    entries.append(.loaded(name: definition.name, file: file.path,
                                           version: definition.version, previousVersion: old?.version))
                }
            case .failure(let failure):
                if let old, claimedNames[old.name] == nil {
                    claimedNames[old.name] = file.path
                    loaded.append(old)
                    entries.append(.failed(failure, keptVersion: old.version))
                } else {
                    unloadedFailures.append(failure)
                    entries.append(.failed(failure, keptVersion: nil))
                }
            }
        }

        let remaining = Set(files.map(\.path))
        for old in previous.projections where !remaining.contains(old.code.file) {
            entries.append(.removed(name: old.name, file: old.code.file, version: old.version))
        }

        let generation = previous.generation + 1
        let set = ProjectionSet(generation: generation, projections: loaded,
                                unloadedFailures: unloadedFailures)
        return (set, ReloadReport(entries: entries, generation: generation))
    }

    /// Returns `old` when neither the file nor a library it required changed; otherwise
    /// compiles the file in a fresh state and runs its `init`.
    func build(code: ProjectionCode, reusing old: ProjectionDefinition?, nowMs: Int64)
        -> Result<ProjectionDefinition, ProjectionFailure>
    {
        if let old, Self.version(of: code, requiredLibraries: old.requiredLibraries) == old.version {
            return .success(old)
        }
        do {
            let instance = try ProjectionInstance(code: code, limits: settings.limits,
                                                  jsonLimits: settings.jsonLimits,
                                                  sortObjectKeys: settings.sortObjectKeys)
            let initEffects = try instance.runInit(nowMs: nowMs)
            let required = instance.requiredLibraries
            return .success(ProjectionDefinition(
                name: instance.name, code: code,
                version: Self.version(of: code, requiredLibraries: required),
                topics: instance.topics, queries: instance.queryNames, scripts: instance.scripts,
                requiredLibraries: required, initEffects: initEffects, loadedAtMs: nowMs))
        } catch {
            return .failure(error)
        }
    }

    /// SHA-256 over the file, its settings and the library modules it required.
    static func version(of code: ProjectionCode, requiredLibraries: [String]) -> String {
        var input = code.source
        input.append(0)
        input.append(contentsOf: code.settings)
        for module in requiredLibraries.sorted() {
            input.append(0)
            input.append(contentsOf: module.utf8)
            input.append(0)
            // A removed module hashes differently from an empty one.
            input.append(contentsOf: code.libraries.modules[module] ?? [0xff])
        }
        return Digest.sha256Hex(input)
    }

    // MARK: - Reading the folder

    /// The folder's `*.lua` files (not its subfolders), sorted by name. Hidden files and editor
    /// leftovers starting with `.` or `#` are skipped.
    func projectionFiles() throws(FolderError) -> [(path: String, stem: String, source: [UInt8])] {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: folder, isDirectory: &isDirectory) else {
            throw FolderError(path: folder, reason: "no such folder")
        }
        guard isDirectory.boolValue else {
            throw FolderError(path: folder, reason: "not a folder")
        }
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: folder)
        } catch {
            throw FolderError(path: folder, reason: Self.reason(error))
        }
        var files: [(path: String, stem: String, source: [UInt8])] = []
        for name in names.sorted() where name.hasSuffix(".lua") && !name.hasPrefix(".") && !name.hasPrefix("#") {
            let path = (folder as NSString).appendingPathComponent(name)
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory),
                  !isDirectory.boolValue else { continue }
            guard let data = FileManager.default.contents(atPath: path) else {
                throw FolderError(path: path, reason: "the file cannot be read")
            }
            files.append((path, String(name.dropLast(4)), Array(data)))
        }
        return files
    }

    /// Every `.lua` file under the library folder, by module name.
    func readLibraries() throws(FolderError) -> LibrarySources {
        var sources = LibrarySources(path: libraryFolder)
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: libraryFolder, isDirectory: &isDirectory),
              isDirectory.boolValue else {
            return sources
        }
        guard let walker = FileManager.default.enumerator(atPath: libraryFolder) else {
            throw FolderError(path: libraryFolder, reason: "the folder cannot be listed")
        }
        while let relative = walker.nextObject() as? String {
            guard relative.hasSuffix(".lua"), !relative.hasPrefix(".") else { continue }
            let path = (libraryFolder as NSString).appendingPathComponent(relative)
            guard let data = FileManager.default.contents(atPath: path) else { continue }
            let module = String(relative.dropLast(4)).replacingOccurrences(of: "/", with: ".")
            sources.modules[module] = Array(data)
        }
        return sources
    }

    private static func reason(_ error: Error) -> String {
        let nsError = error as NSError
        if let underlying = nsError.userInfo[NSUnderlyingErrorKey] as? NSError,
           let code = POSIXErrorCode(rawValue: Int32(underlying.code)) {
            return String(cString: strerror(code.rawValue))
        }
        return nsError.localizedDescription
    }
}
