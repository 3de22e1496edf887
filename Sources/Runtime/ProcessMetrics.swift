import Glibc

/// The standard `process_*` metrics of the Prometheus client libraries, read from Linux's /proc
/// at every render.
///
/// A file that cannot be read leaves its metrics out of that render and logs a warning (the log
/// rate-limits repeats), so one unreadable file does not hide the other metrics.
public struct ProcessMetrics: MetricsCollector {
    /// One reading of the process's resources. A field is nil when its source could not be read.
    public struct Sample: Sendable {
        public var residentMemoryBytes: Double?
        public var virtualMemoryBytes: Double?
        /// User plus system CPU time in seconds.
        public var cpuSeconds: Double?
        /// Start time in seconds since the Unix epoch.
        public var startTimeSeconds: Double?
        /// Open file descriptors, not counting the one used to list them.
        public var openFileDescriptors: Double?
        /// The soft limit on open file descriptors, or +Inf when unlimited.
        public var maxFileDescriptors: Double?
        /// A description of each source that could not be read or parsed.
        public var failures: [String] = []
    }

    public init() {}

    /// Reads every metric once.
    public func sample() -> Sample {
        var sample = Sample()
        do throws(ProcFileError) {
            let stat = try ProcessStat.read()
            sample.residentMemoryBytes = stat.residentMemoryBytes
            sample.virtualMemoryBytes = stat.virtualMemoryBytes
            sample.cpuSeconds = stat.cpuSeconds
            sample.startTimeSeconds = try stat.startTimeSeconds(bootTime: Self.bootTime())
        } catch {
            sample.failures.append(error.description)
        }
        do throws(ProcFileError) {
            sample.openFileDescriptors = try Self.openFileDescriptors()
        } catch {
            sample.failures.append(error.description)
        }
        do throws(ProcFileError) {
            sample.maxFileDescriptors = try Self.maxFileDescriptors()
        } catch {
            sample.failures.append(error.description)
        }
        return sample
    }

    public func render(into output: inout String) {
        let sample = sample()
        for failure in sample.failures {
            Log.shared.warn("cannot read process metrics", ["error": .string(failure)])
        }
        let metrics: [(name: String, type: String, help: String, value: Double?)] = [
            ("process_cpu_seconds_total", "counter", "CPU time used in user and system mode, in seconds.",
             sample.cpuSeconds),
            ("process_open_fds", "gauge", "Open file descriptors.", sample.openFileDescriptors),
            ("process_max_fds", "gauge", "Soft limit on open file descriptors.", sample.maxFileDescriptors),
            ("process_virtual_memory_bytes", "gauge", "Size of the virtual address space in bytes.",
             sample.virtualMemoryBytes),
            ("process_resident_memory_bytes", "gauge", "Resident set size in bytes.",
             sample.residentMemoryBytes),
            ("process_start_time_seconds", "gauge", "Process start time in seconds since the Unix epoch.",
             sample.startTimeSeconds),
        ]
        for metric in metrics {
            guard let value = metric.value else { continue }
            PrometheusText.appendHeader(name: metric.name, help: metric.help, type: metric.type,
                                        into: &output)
            PrometheusText.appendSample(name: metric.name, labels: "", value: value, into: &output)
        }
    }

    /// Reads the boot time in seconds since the epoch from the `btime` line of /proc/stat.
    private static func bootTime() throws(ProcFileError) -> Double {
        let path = "/proc/stat"
        let text = try readProcFile(path)
        for line in text.split(separator: "\n") where line.hasPrefix("btime ") {
            if let seconds = Double(line.dropFirst("btime ".count)) {
                return seconds
            }
        }
        throw ProcFileError(path: path, reason: "no btime line")
    }

    /// Counts the entries of /proc/self/fd, skipping the descriptor that lists them.
    private static func openFileDescriptors() throws(ProcFileError) -> Double {
        let path = "/proc/self/fd"
        guard let directory = opendir(path) else {
            throw ProcFileError(path: path, errno: errno)
        }
        defer { closedir(directory) }
        let ownDescriptor = String(dirfd(directory))
        var count = 0
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { bytes in
                String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." && name != ownDescriptor {
                count += 1
            }
        }
        return Double(count)
    }

    /// Reads the soft limit of the `Max open files` line of /proc/self/limits.
    private static func maxFileDescriptors() throws(ProcFileError) -> Double {
        let path = "/proc/self/limits"
        let text = try readProcFile(path)
        let prefix = "Max open files"
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }),
              let softLimit = line.dropFirst(prefix.count).split(separator: " ").first else {
            throw ProcFileError(path: path, reason: "no 'Max open files' line")
        }
        if softLimit == "unlimited" {
            return .infinity
        }
        guard let value = Double(softLimit) else {
            throw ProcFileError(path: path, reason: "invalid soft limit '\(softLimit)'")
        }
        return value
    }
}

/// The fields of /proc/self/stat that the process metrics use, as proc(5) numbers them.
private struct ProcessStat {
    var residentMemoryBytes: Double
    var virtualMemoryBytes: Double
    var cpuSeconds: Double
    /// Clock ticks from boot to the process start.
    var startTicks: Double

    private static let ticksPerSecond = Double(sysconf(Int32(_SC_CLK_TCK)))
    private static let pageSize = Double(sysconf(Int32(_SC_PAGESIZE)))

    static func read() throws(ProcFileError) -> ProcessStat {
        let path = "/proc/self/stat"
        let text = try readProcFile(path)
        // The command name (field 2) is in parentheses and may contain spaces and ')', so the
        // fields are counted from the last ')'. Index 0 after it is field 3, the state.
        guard let nameEnd = text.lastIndex(of: ")") else {
            throw ProcFileError(path: path, reason: "no ')' after the command name")
        }
        let fields = text[text.index(after: nameEnd)...].split(separator: " ")
        func field(_ number: Int) throws(ProcFileError) -> Double {
            let index = number - 3
            guard index < fields.count, let value = Double(fields[index]) else {
                throw ProcFileError(path: path, reason: "field \(number) is missing or not a number")
            }
            return value
        }
        let userTicks = try field(14)
        let systemTicks = try field(15)
        return ProcessStat(
            residentMemoryBytes: try field(24) * pageSize,
            virtualMemoryBytes: try field(23),
            cpuSeconds: (userTicks + systemTicks) / ticksPerSecond,
            startTicks: try field(22))
    }

    func startTimeSeconds(bootTime: Double) -> Double {
        bootTime + startTicks / Self.ticksPerSecond
    }
}

/// A /proc file or folder that could not be read or parsed.
private struct ProcFileError: Error, CustomStringConvertible {
    var path: String
    var reason: String

    init(path: String, reason: String) {
        self.path = path
        self.reason = reason
    }

    init(path: String, errno code: Int32) {
        self.init(path: path, reason: String(cString: strerror(code)))
    }

    var description: String { "\(path): \(reason)" }
}

/// Reads a whole /proc file. Their reported size is 0, so this reads until end of file.
private func readProcFile(_ path: String) throws(ProcFileError) -> String {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else {
        throw ProcFileError(path: path, errno: errno)
    }
    defer { close(descriptor) }

    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
        if count < 0 {
            if errno == EINTR { continue }
            throw ProcFileError(path: path, errno: errno)
        }
        if count == 0 { break }
        bytes += chunk[..<count]
    }
    return String(decoding: bytes, as: UTF8.self)
}
