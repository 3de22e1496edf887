/// Connection settings of a `RedisConnection`: the endpoint, database, credentials and timeouts.
///
/// `description`, `debugDescription` and `dump` show whether a password is set, never the
/// password itself.
public struct RedisSettings: Sendable, Equatable {
    public var host: String
    public var port: Int
    /// When set, the connection uses this Unix domain socket and ignores `host` and `port`.
    public var unixSocketPath: String?
    /// The logical database selected with SELECT after connecting.
    public var db: Int
    /// The ACL user for AUTH, or nil for the default user. Redis before 6 has no ACL users.
    public var username: String?
    /// The password for AUTH, or nil to skip AUTH.
    public var password: String?
    /// The limit on establishing the connection, in milliseconds. With 0 the wait lasts as
    /// long as the operating system allows.
    public var connectTimeoutMs: Int
    /// The limit on each socket read or write of a command, in milliseconds. With 0 the wait
    /// has no limit.
    public var commandTimeoutMs: Int

    public init(host: String = "127.0.0.1", port: Int = 6379, db: Int = 0,
                username: String? = nil, password: String? = nil,
                connectTimeoutMs: Int = 1000, commandTimeoutMs: Int = 5000) {
        self.host = host
        self.port = port
        self.unixSocketPath = nil
        self.db = db
        self.username = username
        self.password = password
        self.connectTimeoutMs = connectTimeoutMs
        self.commandTimeoutMs = commandTimeoutMs
    }

    public init(unixSocketPath: String, db: Int = 0, username: String? = nil,
                password: String? = nil, connectTimeoutMs: Int = 1000,
                commandTimeoutMs: Int = 5000) {
        self.init(host: "", port: 0, db: db, username: username, password: password,
                  connectTimeoutMs: connectTimeoutMs, commandTimeoutMs: commandTimeoutMs)
        self.unixSocketPath = unixSocketPath
    }

    /// `host:port`, or `unix:<path>` for a Unix domain socket.
    public var endpoint: String {
        if let unixSocketPath {
            return "unix:\(unixSocketPath)"
        }
        return "\(host):\(port)"
    }

    /// The first setting that cannot work, described for an error message, or nil.
    var invalidSettingMessage: String? {
        if unixSocketPath == nil && !(1...65535).contains(port) {
            return "Redis port \(port) is invalid: expected 1-65535"
        }
        if unixSocketPath == nil && host.isEmpty {
            return "Redis host is missing"
        }
        if db < 0 {
            return "Redis db \(db) is invalid: expected 0 or more"
        }
        if connectTimeoutMs < 0 || commandTimeoutMs < 0 {
            return "Redis timeouts must be 0 or more milliseconds"
        }
        return nil
    }
}

extension RedisSettings: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    public var description: String {
        let passwordState = password == nil ? "none" : "set"
        return "RedisSettings(endpoint: \(endpoint), db: \(db), username: \(username ?? "default"), "
            + "password: \(passwordState), connectTimeoutMs: \(connectTimeoutMs), "
            + "commandTimeoutMs: \(commandTimeoutMs))"
    }

    public var debugDescription: String { description }

    public var customMirror: Mirror {
        Mirror(self, children: [
            "endpoint": endpoint,
            "db": db,
            "username": username ?? "default",
            "password": password == nil ? "none" : "set",
            "connectTimeoutMs": connectTimeoutMs,
            "commandTimeoutMs": commandTimeoutMs,
        ])
    }
}
