/// The sources a projection state is built from: the file, the library modules it may require
/// and its settings. Sendable, so one thread can validate it and others build their own states.
public struct ProjectionCode: Sendable, Equatable {
    /// The path shown in errors and used as the chunk name, such as `projections/latest_price.lua`.
    public var file: String
    /// The file name without `.lua`: the projection's name unless the file declares one.
    public var stem: String
    public var source: [UInt8]
    public var libraries: LibrarySources
    /// A JSON object that becomes the read-only `settings` global.
    public var settings: [UInt8]

    public init(file: String, stem: String, source: [UInt8], libraries: LibrarySources,
                settings: [UInt8]) {
        self.file = file
        self.stem = stem
        self.source = source
        self.libraries = libraries
        self.settings = settings
    }
}

/// The modules of the library folder, by module name (`util.time` for `lib/util/time.lua`).
public struct LibrarySources: Sendable, Equatable {
    /// The folder as shown in errors, such as `projections/lib`.
    public var path: String
    public var modules: [String: [UInt8]]

    public init(path: String, modules: [String: [UInt8]] = [:]) {
        self.path = path
        self.modules = modules
    }
}
