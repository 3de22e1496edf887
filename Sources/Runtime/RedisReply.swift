import CHiredis
import HostAPI

/// A Redis reply, copied out of hiredis' `redisReply` tree into Swift values.
public indirect enum RedisReply: Sendable, Equatable {
    case status(String)
    /// An error reply, such as `WRONGTYPE Operation against a key holding the wrong kind of value`.
    case error(String)
    case integer(Int64)
    /// A bulk string, binary safe.
    case string([UInt8])
    case null
    case array([RedisReply])
    /// A RESP3 double.
    case double(Double)
    /// A RESP3 boolean.
    case bool(Bool)

    /// The reply converted for a query. Status and bulk strings become bytes, and error
    /// replies become errors that the query raises.
    public var queryReply: QueryReply {
        switch self {
        case .status(let text): .bytes(Array(text.utf8))
        case .error(let message): .error(message)
        case .integer(let value): .integer(value)
        case .string(let bytes): .bytes(bytes)
        case .null: .null
        case .array(let items): .array(items.map(\.queryReply))
        case .double(let value): .number(value)
        case .bool(let value): .boolean(value)
        }
    }

    /// The error text when this is an error reply.
    var errorMessage: String? {
        if case .error(let message) = self {
            return message
        }
        return nil
    }
}

/// Reply types of hiredis 1.x for RESP3. The installed hiredis 0.14 speaks only RESP2 and
/// defines none of them, so its reader never produces these.
private enum RESP3ReplyType {
    static let double: Int32 = 7
    static let bool: Int32 = 8
    static let map: Int32 = 9
    static let set: Int32 = 10
    static let push: Int32 = 12
    static let bigNumber: Int32 = 13
    static let verbatim: Int32 = 14
}

extension RedisReply {
    /// Copies a hiredis reply tree. The caller still owns `reply` and frees it with
    /// `freeReplyObject` afterwards, because nothing returned here points into it.
    ///
    /// Returns nil for a reply type that this client does not know.
    init?(copying reply: UnsafePointer<redisReply>) {
        let node = reply.pointee
        switch node.type {
        case REDIS_REPLY_STATUS:
            self = .status(String(decoding: Self.bytes(node), as: UTF8.self))
        case REDIS_REPLY_ERROR:
            self = .error(String(decoding: Self.bytes(node), as: UTF8.self))
        case REDIS_REPLY_INTEGER:
            self = .integer(Int64(node.integer))
        case REDIS_REPLY_STRING, RESP3ReplyType.bigNumber, RESP3ReplyType.verbatim:
            self = .string(Self.bytes(node))
        case REDIS_REPLY_NIL:
            self = .null
        case REDIS_REPLY_ARRAY, RESP3ReplyType.map, RESP3ReplyType.set, RESP3ReplyType.push:
            guard let items = Self.elements(node) else { return nil }
            self = .array(items)
        case RESP3ReplyType.double:
            // hiredis 1.x keeps the textual form of a double in `str` beside `dval`.
            guard let value = Double(String(decoding: Self.bytes(node), as: UTF8.self)) else {
                return nil
            }
            self = .double(value)
        case RESP3ReplyType.bool:
            self = .bool(node.integer != 0)
        default:
            return nil
        }
    }

    private static func bytes(_ node: redisReply) -> [UInt8] {
        guard let text = node.str, node.len > 0 else { return [] }
        return Array(UnsafeRawBufferPointer(start: text, count: node.len))
    }

    private static func elements(_ node: redisReply) -> [RedisReply]? {
        guard node.elements > 0 else { return [] }
        guard let element = node.element else { return nil }
        var items: [RedisReply] = []
        items.reserveCapacity(node.elements)
        for index in 0..<node.elements {
            guard let child = element[index], let item = RedisReply(copying: child) else {
                return nil
            }
            items.append(item)
        }
        return items
    }
}
