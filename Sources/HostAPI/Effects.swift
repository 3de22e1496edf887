/// What a projection asks for while it handles an event or runs `init`. Handlers never do I/O:
/// the runtime applies effects in batches after the handler returned.
public enum Effect: Sendable, Equatable {
    /// A Redis write command; the first argument is the command name in upper case.
    case redis(arguments: [[UInt8]])
    /// EVALSHA of a script the projection declared in `scripts`.
    case redisScript(name: String, sha1: String, keys: [[UInt8]], arguments: [[UInt8]])
    /// One row for a ClickHouse table, encoded as a JSON object (one JSONEachRow line).
    case insert(table: String, row: [UInt8])
    /// A ClickHouse statement from `init`, such as `CREATE TABLE IF NOT EXISTS`.
    case clickhouseStatement(sql: String)
    /// A keyed-state change, already visible to later reads of the same projection and scope.
    case state(StateChange)
    /// A log line from the projection; `fields` is a JSON object or empty.
    case log(level: LogLevel, message: String, fields: [UInt8])
    /// An increment of a projection counter; `labels` is a JSON object or empty.
    case count(name: String, by: Double, labels: [UInt8])
}

public enum LogLevel: String, Sendable, CaseIterable, Comparable {
    case debug, info, warn, error

    private var rank: Int {
        switch self {
        case .debug: 0
        case .info: 1
        case .warn: 2
        case .error: 3
        }
    }

    public static func < (lhs: LogLevel, rhs: LogLevel) -> Bool { lhs.rank < rhs.rank }
}

/// A change to one key of a projection's keyed state.
public struct StateChange: Sendable, Equatable {
    public var key: [UInt8]
    /// The new value as JSON, or nil when the key is deleted.
    public var value: [UInt8]?
    /// Time to live in wall-clock milliseconds from when the change is applied, or nil.
    public var ttlMs: Int64?

    public init(key: [UInt8], value: [UInt8]?, ttlMs: Int64? = nil) {
        self.key = key
        self.value = value
        self.ttlMs = ttlMs
    }
}

/// A Redis script declared by a projection, identified by the SHA-1 of its source as Redis
/// identifies it for EVALSHA.
public struct RedisScript: Sendable, Equatable {
    public var name: String
    public var source: [UInt8]
    public var sha1: String

    public init(name: String, source: [UInt8]) {
        self.name = name
        self.source = source
        self.sha1 = Digest.sha1Hex(source)
    }
}

/// Redis commands a handler may queue with `ctx.redis`, with their arity as Redis 7.0's
/// `COMMAND INFO` gives it: the number of words including the command name, or at least that
/// many when negative. Reads are excluded because a handler must not wait on a network round
/// trip; it reads keyed state instead. The arity is checked when the command is queued,
/// because Redis rejects a command of the wrong arity inside MULTI and then aborts the whole
/// transaction, every other event's writes with it.
let redisWriteCommands: [String: Int] = [
    "APPEND": 3, "DECR": 2, "DECRBY": 3, "DEL": -2, "EXPIRE": -3, "EXPIREAT": -3, "GEOADD": -5,
    "HDEL": -3, "HINCRBY": 4, "HINCRBYFLOAT": 4, "HMSET": -4, "HSET": -4, "HSETNX": 4, "INCR": 2,
    "INCRBY": 3, "INCRBYFLOAT": 3, "LINSERT": 5, "LPOP": -2, "LPUSH": -3, "LREM": 4, "LSET": 4,
    "LTRIM": 4, "MSET": -3, "PERSIST": 2, "PEXPIRE": -3, "PEXPIREAT": -3, "PFADD": -2, "PSETEX": 4,
    "PUBLISH": 3, "RPOP": -2, "RPUSH": -3, "SADD": -3, "SET": -3, "SETEX": 4, "SETNX": 3,
    "SETRANGE": 4, "SMOVE": 4, "SPOP": -2, "SREM": -3, "UNLINK": -2, "XADD": -5, "XDEL": -3,
    "XTRIM": -4, "ZADD": -4, "ZINCRBY": 4, "ZPOPMAX": -2, "ZPOPMIN": -2, "ZREM": -3,
    "ZREMRANGEBYLEX": 4, "ZREMRANGEBYRANK": 4, "ZREMRANGEBYSCORE": 4,
]

let redisWriteCommandNames = Set(redisWriteCommands.keys)

/// The maximum number of words of some write commands, from their syntax in Redis 7.0, where
/// the arity gives only a minimum: `LPOP key [count]`, `EXPIRE key seconds [NX | XX | GT | LT]`.
let redisWriteMaximumWords: [String: Int] = [
    "LPOP": 3, "RPOP": 3, "SPOP": 3, "ZPOPMAX": 3, "ZPOPMIN": 3,
    "EXPIRE": 4, "PEXPIRE": 4, "EXPIREAT": 4, "PEXPIREAT": 4,
]

/// Write commands whose words from index `from` on are pairs, and what the pairs are. Commands
/// with options before their pairs (ZADD, GEOADD, SET, XADD) are not checked here.
let redisWritePairs: [String: (from: Int, pairs: String)] = [
    "HSET": (2, "field/value pairs after the key"), "HMSET": (2, "field/value pairs after the key"),
    "MSET": (1, "key/value pairs"),
]

/// Redis commands a query may run with `ctx.redis`.
let redisReadCommands: Set<String> = [
    "EXISTS", "GET", "GETRANGE", "HEXISTS", "HGET", "HGETALL", "HKEYS", "HLEN", "HMGET",
    "HVALS", "LINDEX", "LLEN", "LRANGE", "MGET", "PTTL", "SCARD", "SISMEMBER", "SMEMBERS",
    "SMISMEMBER", "STRLEN", "TTL", "TYPE", "XLEN", "XRANGE", "XREVRANGE", "ZCARD", "ZCOUNT",
    "ZRANGE", "ZRANGEBYSCORE", "ZRANK", "ZREVRANGE", "ZREVRANGEBYSCORE", "ZREVRANK", "ZSCORE",
]
