import Foundation
import HostAPI
import Synchronization

/// A value of a structured log field.
public enum LogValue: Sendable, ExpressibleByStringLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByBooleanLiteral
{
    case string(String)
    case integer(Int64)
    case number(Double)
    case boolean(Bool)
    /// JSON that is already encoded (a projection's log fields), written as it is.
    case json([UInt8])

    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .integer(value) }
    public init(booleanLiteral value: Bool) { self = .boolean(value) }

    public static func int<T: BinaryInteger>(_ value: T) -> LogValue { .integer(Int64(value)) }

    func write(to writer: inout JSONWriter) {
        switch self {
        case .string(let value): writer.string(value)
        case .integer(let value): writer.integer(value)
        case .number(let value): writer.number(value)
        case .boolean(let value): writer.boolean(value)
        case .json(let value): value.isEmpty ? writer.null() : writer.raw(value)
        }
    }
}

/// Structured logs: one JSON object per line on stderr, with a fixed message and the data in
/// fields (`projection`, `kafka.topic`, `kafka.partition`, `kafka.offset`, `error`).
///
/// Repeats of one message are rate-limited: at most `burst` lines per message per window; the
/// next line after the window says how many were suppressed.
public final class Log: Sendable {
    public static let shared = Log()

    private struct State {
        var level: LogLevel = .info
        var windows: [String: (start: Double, count: Int, suppressed: Int)] = [:]
    }

    private let state = Mutex(State())
    private let burst = 20
    private let windowSeconds = 10.0

    public init() {}

    public var level: LogLevel {
        get { state.withLock { $0.level } }
        set { state.withLock { $0.level = newValue } }
    }

    public func debug(_ message: String, _ fields: KeyValuePairs<String, LogValue> = [:]) {
        write(.debug, message, fields)
    }

    public func info(_ message: String, _ fields: KeyValuePairs<String, LogValue> = [:]) {
        write(.info, message, fields)
    }

    public func warn(_ message: String, _ fields: KeyValuePairs<String, LogValue> = [:]) {
        write(.warn, message, fields)
    }

    public func error(_ message: String, _ fields: KeyValuePairs<String, LogValue> = [:]) {
        write(.error, message, fields)
    }

    public func write(_ level: LogLevel, _ message: String, _ fields: KeyValuePairs<String, LogValue>) {
        let now = Date().timeIntervalSince1970
        let suppressed: Int? = state.withLock { state in
            guard level >= state.level else { return nil }
            var window = state.windows[message] ?? (now, 0, 0)
            if now - window.start >= windowSeconds {
                window = (now, 0, window.suppressed)
            }
            window.count += 1
            if window.count > burst {
                window.suppressed += 1
                state.windows[message] = window
                return nil
            }
            let reported = window.suppressed
            window.suppressed = 0
            state.windows[message] = window
            return reported
        }
        guard let suppressed else { return }

        var writer = JSONWriter()
        writer.beginObject()
        writer.field("ts", first: true)
        writer.string(Self.timestamp(now))
        writer.field("level")
        writer.string(level.rawValue)
        writer.field("msg")
        writer.string(message)
        for (key, value) in fields {
            writer.field(key)
            value.write(to: &writer)
        }
        if suppressed > 0 {
            writer.field("suppressed_repeats")
            writer.integer(suppressed)
        }
        writer.endObject()
        var line = writer.bytes
        line.append(0x0a)
        line.withUnsafeBytes { _ = Glibc.write(2, $0.baseAddress, $0.count) }
    }

    /// RFC 3339 UTC with milliseconds.
    static func timestamp(_ seconds: Double) -> String {
        var time = time_t(seconds)
        var parts = tm()
        gmtime_r(&time, &parts)
        let milliseconds = Int((seconds - Double(time)) * 1000)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", parts.tm_year + 1900,
                      parts.tm_mon + 1, parts.tm_mday, parts.tm_hour, parts.tm_min, parts.tm_sec,
                      milliseconds)
    }
}
