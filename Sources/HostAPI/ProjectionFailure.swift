/// An error raised while loading or running a projection, with where it happened.
public struct ProjectionFailure: Error, Sendable, Equatable, CustomStringConvertible {
    /// The step of a projection's life that failed.
    public enum Phase: String, Sendable {
        /// Compiling the file or running its top-level code.
        case load
        /// Checking the table the file returned against the projection contract.
        case validate
        /// Running `init(ctx)`.
        case initialize = "init"
        /// Decoding an event payload as JSON.
        case decode
        /// Running `on_event(event, ctx)`.
        case onEvent = "on_event"
        /// Running a query function.
        case query
    }

    public var phase: Phase
    /// The projection's name, or nil when the file failed before declaring one.
    public var projection: String?
    /// The file the error points into: the projection file, or a library it required.
    public var file: String
    public var line: Int?
    public var message: String
    public var traceback: String

    public init(phase: Phase, projection: String?, file: String, line: Int? = nil,
                message: String, traceback: String = "") {
        self.phase = phase
        self.projection = projection
        self.file = file
        self.line = line
        self.message = message
        self.traceback = traceback
    }

    /// Builds a failure from a Lua error, taking `file:line` from the message when Lua put it
    /// there (`projections/x.lua:12: attempt to index a nil value`).
    init(phase: Phase, projection: String?, file: String, error: LuaError) {
        // The prelude's own frames say nothing to a projection author.
        let traceback = error.traceback.split(separator: "\n")
            .filter { !$0.contains("sandbox prelude") && !$0.contains("[C]: in function 'error'") }
        let useful = traceback.count > 1 ? traceback.joined(separator: "\n") : ""
        self.init(phase: phase, projection: projection, file: file, message: error.message,
                  traceback: useful)
        if let position = Self.sourcePosition(in: error.message) {
            // Lua shortens long chunk names to "...<tail>"; the tail identifies the file.
            let tail = position.file.hasPrefix("...") ? String(position.file.dropFirst(3)) : nil
            self.file = tail.map { file.hasSuffix($0) ? file : position.file } ?? position.file
            self.line = position.line
            self.message = position.rest
        }
    }

    /// `file:line: message` when the error names a position, else `file: message`.
    public var description: String {
        let location = line.map { "\(file):\($0)" } ?? file
        let subject = projection.map { "projection \($0), \(phase.rawValue)" } ?? phase.rawValue
        return "\(location): \(subject): \(message)"
    }

    /// Finds a leading `path.lua:N: ` in a Lua error message.
    static func sourcePosition(in message: String) -> (file: String, line: Int, rest: String)? {
        guard let marker = message.range(of: ".lua:") else { return nil }
        let file = String(message[..<marker.lowerBound]) + ".lua"
        guard !file.contains(" ") else { return nil }
        let afterFile = message[marker.upperBound...]
        let digits = afterFile.prefix { $0.isASCII && $0.isNumber }
        guard let line = Int(digits), afterFile.dropFirst(digits.count).hasPrefix(":") else {
            return nil
        }
        let rest = afterFile.dropFirst(digits.count + 1).drop { $0 == " " }
        return (file, line, String(rest))
    }
}
