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

    /// Whether the command has no arguments, not even a name, and so cannot be sent.
    var isEmpty: Bool {
        if case .arguments(let arguments) = self {
            return arguments.isEmpty
        }
        return false
    }

    /// Appends the command in the RESP2 request form (an array of bulk strings) to `buffer`,
    /// the bytes that `wireArguments` would be sent as.
    func encode(into buffer: inout [UInt8]) {
        switch self {
        case .arguments(let arguments):
            RESPWriter.appendArrayHeader(arguments.count, to: &buffer)
            for argument in arguments {
                RESPWriter.appendBulkString(argument, to: &buffer)
            }
        case .script(let sha1, _, let keys, let arguments):
            RESPWriter.appendArrayHeader(3 + keys.count + arguments.count, to: &buffer)
            buffer.append(contentsOf: RESPWriter.evalshaName)
            var sha1 = sha1
            sha1.withUTF8 { RESPWriter.appendBulkString($0, to: &buffer) }
            RESPWriter.appendBulkDecimal(keys.count, to: &buffer)
            for key in keys {
                RESPWriter.appendBulkString(key, to: &buffer)
            }
            for argument in arguments {
                RESPWriter.appendBulkString(argument, to: &buffer)
            }
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

/// An encoder of RESP2 requests, byte for byte as hiredis' `redisFormatCommandArgv` formats
/// them (RedisClientTests compares the two).
enum RESPWriter {
    static func appendArrayHeader(_ count: Int, to buffer: inout [UInt8]) {
        buffer.append(UInt8(ascii: "*"))
        appendDecimal(count, to: &buffer)
        appendLineEnd(to: &buffer)
    }

    private static func appendLineEnd(to buffer: inout [UInt8]) {
        buffer.append(UInt8(ascii: "\r"))
        buffer.append(UInt8(ascii: "\n"))
    }

    /// `$7\r\nEVALSHA\r\n`, the command name of a script call as a bulk string.
    static let evalshaName: [UInt8] = Array("$7\r\nEVALSHA\r\n".utf8)

    static func appendBulkString(_ bytes: [UInt8], to buffer: inout [UInt8]) {
        bytes.withUnsafeBufferPointer { appendBulkString($0, to: &buffer) }
    }

    static func appendBulkString(_ bytes: UnsafeBufferPointer<UInt8>, to buffer: inout [UInt8]) {
        buffer.append(UInt8(ascii: "$"))
        appendDecimal(bytes.count, to: &buffer)
        appendLineEnd(to: &buffer)
        buffer.append(contentsOf: bytes)
        appendLineEnd(to: &buffer)
    }

    /// Appends `value` in decimal as a bulk string, such as the key count of EVALSHA.
    static func appendBulkDecimal(_ value: Int, to buffer: inout [UInt8]) {
        buffer.append(UInt8(ascii: "$"))
        appendDecimal(decimalDigitCount(value), to: &buffer)
        appendLineEnd(to: &buffer)
        appendDecimal(value, to: &buffer)
        appendLineEnd(to: &buffer)
    }

    /// Appends the decimal digits of `value`, with a minus sign when it is negative, without
    /// creating a String.
    static func appendDecimal(_ value: Int, to buffer: inout [UInt8]) {
        appendDecimal(Int64(value), to: &buffer)
    }

    static func appendDecimal(_ value: Int64, to buffer: inout [UInt8]) {
        if value < 0 {
            buffer.append(UInt8(ascii: "-"))
        }
        // The magnitude of Int64.min does not fit in Int64 but fits in UInt64.
        var magnitude = value.magnitude
        if magnitude < 10 {
            buffer.append(UInt8(ascii: "0") + UInt8(magnitude))
            return
        }
        // 20 digits hold UInt64.max. The digits are written from the end of the scratch tuple.
        var digits: (UInt64, UInt64, UInt64) = (0, 0, 0)
        withUnsafeMutableBytes(of: &digits) { scratch in
            var position = scratch.count
            while magnitude > 0 {
                position -= 1
                scratch[position] = UInt8(ascii: "0") + UInt8(magnitude % 10)
                magnitude /= 10
            }
            buffer.append(contentsOf: UnsafeRawBufferPointer(rebasing: scratch[position...]))
        }
    }

    static func decimalDigitCount(_ value: Int) -> Int {
        var magnitude = value.magnitude
        var digits = value < 0 ? 2 : 1
        while magnitude >= 10 {
            magnitude /= 10
            digits += 1
        }
        return digits
    }
}
