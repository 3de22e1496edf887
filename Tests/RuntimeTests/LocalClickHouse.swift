import Foundation
import Glibc

/// A clickhouse-server for tests, run by scripts/clickhouse-local.sh in a temporary folder on
/// free loopback ports.
///
/// `init` returns once the server responds to /ping. `stop()` ends the server and removes the
/// folder. If the test process dies first, the script notices within a second and stops the
/// server itself, but the folder stays.
final class LocalClickHouse {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// The server binary: /usr/bin/clickhouse-server, else /usr/sbin/clickhouse-server (where
    /// Debian 12's package installs it), else nil.
    static let serverPath: String? = {
        let candidates = ["/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server"]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }()

    let httpPort: Int
    /// Password of the user "default", or nil when it has none.
    let password: String?
    let folder: URL
    private var process: Process?

    /// Starts the server and waits until it responds, for at most 30 s (the script's limit).
    init(password: String?) throws {
        guard let serverPath = Self.serverPath else {
            throw Failure(description: "clickhouse-server is not installed")
        }
        let ports = try Self.freePorts(count: 3)
        httpPort = ports[0]
        self.password = password
        folder = FileManager.default.temporaryDirectory.appendingPathComponent(
            "local-clickhouse-\(getpid())-\(httpPort)")

        let script = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/clickhouse-local.sh")
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/bin/bash")
        child.arguments = [script.path, folder.path] + ports.map(String.init)
        var environment = ProcessInfo.processInfo.environment
        environment["CLICKHOUSE_SERVER"] = serverPath
        environment["CLICKHOUSE_LOCAL_PASSWORD"] = password ?? ""
        child.environment = environment
        let output = Pipe()
        child.standardOutput = output
        // The script's stderr, with the server log's tail on failure, goes to the test log.

        try child.run()
        process = child
        do {
            try Self.waitForReadyLine(output.fileHandleForReading)
        } catch {
            stop()
            throw error
        }
    }

    deinit {
        stop()
    }

    /// Stops the server with SIGTERM through the script, waits for both, and removes the folder.
    func stop() {
        guard let process else { return }
        if process.isRunning {
            process.terminate()
        }
        process.waitUntilExit()
        self.process = nil
        try? FileManager.default.removeItem(at: folder)
    }

    /// Reads the script's stdout until its ready line. The script exits, closing the pipe, when
    /// the server fails to start or does not respond in time.
    private static func waitForReadyLine(_ handle: FileHandle) throws {
        var seen = ""
        while true {
            let chunk = handle.availableData
            if chunk.isEmpty {
                throw Failure(
                    description: "clickhouse-local.sh exited before the server was ready; "
                        + "output: \(seen)")
            }
            seen += String(decoding: chunk, as: UTF8.self)
            if seen.contains("clickhouse-local: ready") {
                return
            }
        }
    }

    /// Returns TCP ports on 127.0.0.1 that nothing listens on right now. All sockets stay bound
    /// until every port is chosen, so the ports differ.
    static func freePorts(count: Int) throws -> [Int] {
        var descriptors: [Int32] = []
        defer { descriptors.forEach { _ = close($0) } }

        var ports: [Int] = []
        for _ in 0..<count {
            let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard descriptor >= 0 else {
                throw Failure(description: "socket failed: \(String(cString: strerror(errno)))")
            }
            descriptors.append(descriptor)
            ports.append(try boundPort(descriptor, listen: false))
        }
        return ports
    }

    /// Binds `descriptor` to a kernel-chosen port on 127.0.0.1, optionally listens, and
    /// returns the port.
    static func boundPort(_ descriptor: Int32, listen shouldListen: Bool) throws -> Int {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { generic in
                bind(descriptor, generic, length) == 0
                    && getsockname(descriptor, generic, &length) == 0
            }
        }
        guard bound, !shouldListen || listen(descriptor, 1) == 0 else {
            let reason = String(cString: strerror(errno))
            throw Failure(description: "binding a loopback port failed: \(reason)")
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}
