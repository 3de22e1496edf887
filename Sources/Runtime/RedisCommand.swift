import HostAPI

/// One command of a pipeline or transaction.
public enum RedisCommand: Sendable, Equatable {
    /// A command given as its arguments, where `arguments[0]` is the command name.
    case arguments([[UInt8]])
    /// A script call, sent as EVALSHA. `source` is loaded with SCRIPT LOAD when the server
    /// does not have the script yet.
    case script(sha1: String, source: [UInt8], keys: [[UInt8]], arguments: [[UInt8]])

    /// Creates a call of a script that a projection declared.
    public static func script(_ script: RedisScript, keys: [[UInt8]],
                              arguments: [[UInt8]]) -> RedisCommand {
        .script(sha1: script.sha1, source: script.source, keys: keys, arguments: arguments)
    }

    /// The arguments as sent on the wire.
    var wireArguments: [[UInt8]] {
        switch self {
        case .arguments(let arguments):
            return arguments
        case .script(let sha1, _, let keys, let arguments):
            var wire: [[UInt8]] = [Array("EVALSHA".utf8), Array(sha1.utf8), Array(String(keys.count).utf8)]
            wire.append(contentsOf: keys)
            wire.append(contentsOf: arguments)
            return wire
        }
    }

    /// The command name in upper case and its first key, for error messages and logs.
    ///
    /// It contains no argument values: AUTH and HELLO show only the name because their
    /// arguments hold credentials, and EVAL shows its first key rather than its source.
    var summary: String {
        switch self {
        case .script(let sha1, _, let keys, _):
            return Self.join("EVALSHA \(sha1)", keys.first)
        case .arguments(let arguments):
            guard let first = arguments.first else { return "(empty command)" }
            let name = String(decoding: first, as: UTF8.self).uppercased()
            switch name {
            case "AUTH", "HELLO":
                return name
            case "EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO":
                // The layout is NAME script-or-sha numkeys key..., so the first key follows numkeys.
                let keyCount = arguments.count > 2 ? Int(String(decoding: arguments[2], as: UTF8.self)) : nil
                let firstKey = (keyCount ?? 0) > 0 && arguments.count > 3 ? arguments[3] : nil
                return Self.join(name, firstKey)
            default:
                return Self.join(name, arguments.count > 1 ? arguments[1] : nil)
            }
        }
    }

    private static let maxKeyBytesShown = 64

    private static func join(_ name: String, _ key: [UInt8]?) -> String {
        guard let key else { return name }
        var displayedKey = String(decoding: key.prefix(maxKeyBytesShown), as: UTF8.self)
        if key.count > maxKeyBytesShown {
            displayedKey += "..."
        }
        return "\(name) \(displayedKey)"
    }
}
