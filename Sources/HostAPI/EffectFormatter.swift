/// Formats effects and failures as one JSON object per line, with fields in a fixed order, for
/// `projection-runtime test` and its golden files.
public struct EffectFormatter {
    public init() {}

    /// Where an output line comes from: the input line and the message's coordinates.
    public struct Origin {
        public var line: Int
        public var topic: String?
        public var partition: Int32?
        public var offset: Int64?
        public var projection: String?

        public init(line: Int, topic: String? = nil, partition: Int32? = nil, offset: Int64? = nil,
                    projection: String? = nil) {
            self.line = line
            self.topic = topic
            self.partition = partition
            self.offset = offset
            self.projection = projection
        }
    }

    public func format(_ effect: Effect, origin: Origin) -> String {
        var writer = begin(origin)
        switch effect {
        case .redis(let arguments):
            writer.field("effect")
            writer.string("redis")
            writer.field("command")
            writer.array(arguments) { argument, writer in writer.byteString(argument) }
        case .redisScript(let name, let sha1, let keys, let arguments):
            writer.field("effect")
            writer.string("redis_script")
            writer.field("script")
            writer.string(name)
            writer.field("sha1")
            writer.string(sha1)
            writer.field("keys")
            writer.array(keys) { key, writer in writer.byteString(key) }
            writer.field("args")
            writer.array(arguments) { argument, writer in writer.byteString(argument) }
        case .insert(let table, let row):
            writer.field("effect")
            writer.string("insert")
            writer.field("table")
            writer.string(table)
            writer.field("row")
            writer.raw(row)
        case .clickhouseStatement(let sql):
            writer.field("effect")
            writer.string("clickhouse")
            writer.field("sql")
            writer.string(sql)
        case .state(let change):
            formatState(change, into: &writer)
        case .log(let level, let message, let fields):
            writer.field("effect")
            writer.string("log")
            writer.field("level")
            writer.string(level.rawValue)
            writer.field("message")
            writer.string(message)
            if !fields.isEmpty {
                writer.field("fields")
                writer.raw(fields)
            }
        case .count(let name, let by, let labels):
            writer.field("effect")
            writer.string("count")
            writer.field("name")
            writer.string(name)
            writer.field("by")
            if by.rounded() == by, abs(by) < 1e15 {
                writer.integer(Int64(by))
            } else {
                writer.number(by)
            }
            if !labels.isEmpty {
                writer.field("labels")
                writer.raw(labels)
            }
        }
        writer.endObject()
        return writer.text
    }

    private func formatState(_ change: StateChange, into writer: inout JSONWriter) {
        writer.field("effect")
        writer.string("state")
        writer.field("op")
        writer.string(change.value == nil ? "delete" : "put")
        writer.field("key")
        writer.byteString(change.key)
        if let value = change.value {
            writer.field("value")
            writer.raw(value)
        }
        if let ttl = change.ttlMs {
            writer.field("ttl_ms")
            writer.integer(ttl)
        }
    }

    public func format(_ failure: ProjectionFailure, origin: Origin) -> String {
        var writer = begin(origin)
        writer.field("effect")
        writer.string("error")
        writer.field("phase")
        writer.string(failure.phase.rawValue)
        writer.field("file")
        writer.string(failure.file)
        if let line = failure.line {
            writer.field("source_line")
            writer.integer(line)
        }
        writer.field("message")
        writer.string(failure.message)
        writer.endObject()
        return writer.text
    }

    /// A line of the events file that could not be turned into a message.
    public func formatInputError(_ message: String, line: Int) -> String {
        var writer = begin(Origin(line: line))
        writer.field("effect")
        writer.string("error")
        writer.field("phase")
        writer.string("input")
        writer.field("message")
        writer.string(message)
        writer.endObject()
        return writer.text
    }

    private func begin(_ origin: Origin) -> JSONWriter {
        var writer = JSONWriter()
        writer.beginObject()
        writer.field("line", first: true)
        writer.integer(origin.line)
        if let topic = origin.topic {
            writer.field("topic")
            writer.string(topic)
        }
        if let partition = origin.partition {
            writer.field("partition")
            writer.integer(partition)
        }
        if let offset = origin.offset {
            writer.field("offset")
            writer.integer(offset)
        }
        if let projection = origin.projection {
            writer.field("projection")
            writer.string(projection)
        }
        return writer
    }
}
