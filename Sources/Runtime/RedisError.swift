/// A failure of a Redis call. The message names the endpoint and the command (its name and
/// first key) but never argument values, because values may contain projection data.
public struct RedisError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// The TCP or Unix socket connection, or the SELECT after it, failed.
        case connect
        /// Reading or writing the socket failed, or the server closed the connection.
        case io
        /// No reply arrived within the command timeout.
        case timeout
        /// The reply could not be parsed or had an unexpected shape.
        case `protocol`
        /// The server rejected AUTH, or requires a password that the settings do not contain.
        case auth
        /// MULTI/EXEC did not run: a queued command was rejected or EXEC returned nil.
        case transactionAborted
        /// The server returned an error reply where the client needs a success, such as a
        /// SCRIPT LOAD of a script that does not compile.
        case reply
        /// The caller passed a command that cannot be sent, such as one with no arguments.
        case invalidCommand
    }

    public var kind: Kind
    /// `host:port` or `unix:<path>`.
    public var endpoint: String
    /// The command name and its first key, when the failure belongs to one command.
    public var command: String?
    public var message: String

    public init(kind: Kind, endpoint: String, command: String? = nil, message: String) {
        self.kind = kind
        self.endpoint = endpoint
        self.command = command
        self.message = message
    }

    public var description: String { message }
}

/// Returns server error text with the argument values cut off. Since Redis 6.2 the errors for unknown
/// commands and subcommands end with ", with args beginning with: ..." followed by the
/// arguments, which may contain data.
func redactedServerError(_ text: String) -> String {
    guard let range = text.range(of: ", with args beginning with:") else { return text }
    return String(text[..<range.lowerBound])
}
