import Glibc

/// The Kafka record that produced a ClickHouse row, and the row's position among the rows that
/// record produced. `ClickHouseClient` writes it into the table's source columns, which make a
/// replayed insert replace the rows of the first one instead of adding to them.
public struct RowSource: Sendable, Hashable, CustomStringConvertible {
    public var topic: String
    public var partition: Int32
    public var offset: Int64
    /// Position of the row, from 0, among the rows that this record produced for the same
    /// table, all projections together. Rows that share a source must differ in index, or
    /// ReplacingMergeTree keeps only one of them. A replay must number the rows the same way.
    public var index: Int

    public init(topic: String, partition: Int32, offset: Int64, index: Int) {
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.index = index
    }

    public var description: String {
        "topic \(topic) partition \(partition) offset \(offset) index \(index)"
    }
}

/// Rows waiting for `ClickHouseClient.insert`, grouped by table, and the limits that make them
/// due for a flush.
///
/// Times are milliseconds on one monotonic clock that the caller chooses. Every `nowMs`
/// argument defaults to `monotonicMilliseconds()` (CLOCK_MONOTONIC).
/// The buffer is not thread-safe, so one thread owns it.
public final class ClickHouseBuffer {
    /// The limit that made the buffer due.
    public enum FlushReason: Sendable, Equatable {
        /// One table contains `flushRows` rows or more.
        case rows
        /// All tables together contain `flushBytes` bytes or more.
        case bytes
        /// The oldest row was appended `flushIntervalMs` or longer ago.
        case age
    }

    public let flushRows: Int
    public let flushBytes: Int
    public let flushIntervalMs: Int64

    /// Rows buffered over all tables.
    public private(set) var rowCount = 0
    /// Bytes buffered over all tables: each row as appended plus its newline. The source
    /// columns that `ClickHouseClient` adds at insert time are not counted.
    public private(set) var byteCount = 0

    /// The rows of one table and the source of each row, taken out of the buffer by
    /// `drainTables()`.
    public struct TableRows: Sendable, Equatable {
        public var table: String
        public var rows: [[UInt8]]
        /// One entry per row, in the same order, and nil for a row appended without a source.
        public var sources: [RowSource?]

        public init(table: String, rows: [[UInt8]], sources: [RowSource?]) {
            self.table = table
            self.rows = rows
            self.sources = sources
        }
    }

    /// Tables in the order their first row arrived, so drains are deterministic.
    private var tables: [TableRows] = []
    private var tableIndexes: [String: Int] = [:]
    private var oldestAppendMs: Int64?
    private var rowLimitReached = false

    /// Creates an empty buffer. Every limit must be positive.
    public init(flushRows: Int, flushBytes: Int, flushIntervalMs: Int) {
        precondition(flushRows > 0, "flushRows must be above 0, got \(flushRows)")
        precondition(flushBytes > 0, "flushBytes must be above 0, got \(flushBytes)")
        precondition(flushIntervalMs > 0, "flushIntervalMs must be above 0, got \(flushIntervalMs)")
        self.flushRows = flushRows
        self.flushBytes = flushBytes
        self.flushIntervalMs = Int64(flushIntervalMs)
    }

    /// Creates an empty buffer with the flush limits of `settings`.
    public convenience init(settings: ClickHouseSettings) {
        self.init(
            flushRows: settings.flushRows, flushBytes: settings.flushBytes,
            flushIntervalMs: settings.flushIntervalMs)
    }

    public var isEmpty: Bool { rowCount == 0 }

    /// Number of tables with at least one row.
    public var tableCount: Int { tables.count }

    /// Appends one row, a JSON object, for `table`, without a source. The client rejects such
    /// a row for a table with source columns unless the row contains all four `_source_` keys.
    public func append(table: String, row: [UInt8], nowMs: Int64 = monotonicMilliseconds()) {
        append(table: table, row: row, source: nil, nowMs: nowMs)
    }

    /// Appends one row, a JSON object, for `table`, with the Kafka record that produced it.
    /// A nil `source` is the same as the append without one, so that rows taken out by
    /// `drainTables()` can be put back as they were.
    public func append(
        table: String, row: [UInt8], source: RowSource?,
        nowMs: Int64 = monotonicMilliseconds()
    ) {
        let index: Int
        if let existing = tableIndexes[table] {
            index = existing
        } else {
            index = tables.count
            tableIndexes[table] = index
            tables.append(TableRows(table: table, rows: [], sources: []))
        }
        tables[index].rows.append(row)
        tables[index].sources.append(source)

        rowCount += 1
        byteCount += row.count + 1
        if oldestAppendMs == nil {
            oldestAppendMs = nowMs
        }
        if tables[index].rows.count >= flushRows {
            rowLimitReached = true
        }
    }

    /// Returns the first limit reached, checked as rows, bytes, then age, or nil when none is.
    public func dueReason(nowMs: Int64 = monotonicMilliseconds()) -> FlushReason? {
        if rowLimitReached {
            return .rows
        }
        if byteCount >= flushBytes {
            return .bytes
        }
        if let oldestAppendMs, nowMs - oldestAppendMs >= flushIntervalMs {
            return .age
        }
        return nil
    }

    /// Returns whether any table reached `flushRows`, the total reached `flushBytes`, or the
    /// oldest row is `flushIntervalMs` old.
    public func isDue(nowMs: Int64 = monotonicMilliseconds()) -> Bool {
        dueReason(nowMs: nowMs) != nil
    }

    /// Removes and returns every buffered row, grouped by table in first-append order, with
    /// rows in append order. The sources are dropped, so use `drainTables()` to insert into
    /// tables with source columns.
    public func drain() -> [(table: String, rows: [[UInt8]])] {
        drainTables().map { (table: $0.table, rows: $0.rows) }
    }

    /// Removes and returns every buffered row with its source, grouped by table in
    /// first-append order, with rows in append order. Pass each entry to
    /// `ClickHouseClient.insert(table:rows:sources:)`.
    public func drainTables() -> [TableRows] {
        let drained = tables
        tables.removeAll()
        tableIndexes.removeAll()
        rowCount = 0
        byteCount = 0
        oldestAppendMs = nil
        rowLimitReached = false
        return drained
    }

    /// Milliseconds on CLOCK_MONOTONIC, which wall-clock changes do not move.
    public static func monotonicMilliseconds() -> Int64 {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return Int64(time.tv_sec) * 1000 + Int64(time.tv_nsec) / 1_000_000
    }
}

@available(*, unavailable)
extension ClickHouseBuffer: Sendable {}
