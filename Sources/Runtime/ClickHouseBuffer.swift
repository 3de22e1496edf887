import Glibc

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
    /// Bytes buffered over all tables, counted as sent: each row plus its newline.
    public private(set) var byteCount = 0

    /// Tables in the order their first row arrived, so drains are deterministic.
    private var tables: [(name: String, rows: [[UInt8]])] = []
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

    /// Appends one row, a JSON object, for `table`.
    public func append(table: String, row: [UInt8], nowMs: Int64 = monotonicMilliseconds()) {
        let index: Int
        if let existing = tableIndexes[table] {
            index = existing
        } else {
            index = tables.count
            tableIndexes[table] = index
            tables.append((name: table, rows: []))
        }
        tables[index].rows.append(row)

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
    /// rows in append order.
    public func drain() -> [(table: String, rows: [[UInt8]])] {
        let drained = tables.map { (table: $0.name, rows: $0.rows) }
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
