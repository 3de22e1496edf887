import CHiredis
import Foundation
import XCTest

/// A redis-server child process on 127.0.0.1 with persistence off, for one test.
///
/// `start()` returns once the server replies to PING. `deinit` stops the process and removes
/// its working directory.
final class LocalRedis {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    let port: Int
    /// The Unix socket the server also listens on, when `listenOnUnixSocket` was set.
    let unixSocketPath: String?
    private let extraArguments: [String]
    private let directory: URL
    private var process: Process?

    /// The path of redis-server on PATH, or nil when it is not installed.
    static let executablePath: String? = {
        let searchPath = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for folder in searchPath.split(separator: ":") {
            let candidate = "\(folder)/redis-server"
            if FileManager.default.isExecutableFile(atPath: candidate) {
                return candidate
            }
        }
        return nil
    }()

    /// Starts a server on a free port. `arguments` are extra redis-server options, such as
    /// `["--requirepass", "secret"]`.
    init(arguments: [String] = [], listenOnUnixSocket: Bool = false) throws {
        guard Self.executablePath != nil else {
            throw XCTSkip("redis-server is not installed")
        }
        port = try Self.freePort()
        directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("local-redis-\(getpid())-\(port)-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        unixSocketPath = listenOnUnixSocket ? directory.appendingPathComponent("redis.sock").path : nil
        extraArguments = arguments
        try start()
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(at: directory)
    }

    /// Starts the server on `port`, again after `kill()` or `stop()`.
    func start() throws {
        guard process == nil, let executablePath = Self.executablePath else { return }
        var arguments = [
            "--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", directory.path, "--daemonize", "no", "--logfile", "",
        ]
        if let unixSocketPath {
            arguments += ["--unixsocket", unixSocketPath, "--unixsocketperm", "700"]
        }
        arguments += extraArguments

        let child = Process()
        child.executableURL = URL(fileURLWithPath: executablePath)
        child.arguments = arguments
        child.standardOutput = FileHandle.nullDevice
        child.standardError = FileHandle.nullDevice
        try child.run()
        process = child
        try waitUntilReplying(deadline: Date().addingTimeInterval(5))
    }

    /// Ends the server with SIGKILL, as a crash would, and waits for it to exit.
    func kill() {
        signalAndWait(SIGKILL)
    }

    /// Ends the server with SIGTERM and waits for it to exit.
    func stop() {
        signalAndWait(SIGTERM)
    }

    private func signalAndWait(_ signal: Int32) {
        guard let process else { return }
        if process.isRunning {
            Glibc.kill(process.processIdentifier, signal)
        }
        process.waitUntilExit()
        self.process = nil
    }

    /// Polls with PING until the server returns any reply. A NOAUTH error also counts, because
    /// it shows the server is serving commands.
    private func waitUntilReplying(deadline: Date) throws {
        while Date() < deadline {
            if let process, !process.isRunning {
                throw Failure(description: "redis-server on port \(port) exited with status \(process.terminationStatus) while starting")
            }
            if Self.repliesToPing(port: port) {
                return
            }
            usleep(20_000)
        }
        throw Failure(description: "redis-server on port \(port) did not reply to PING within 5 s")
    }

    private static func repliesToPing(port: Int) -> Bool {
        // hiredis allocates the context and the reply, and this function frees both.
        guard let context = redisConnectWithTimeout("127.0.0.1", Int32(port), timeval(tv_sec: 0, tv_usec: 200_000)) else {
            return false
        }
        defer { redisFree(context) }
        guard context.pointee.err == 0 else { return false }

        let reply = "PING".withCString { name -> UnsafeMutableRawPointer? in
            var argv: [UnsafePointer<CChar>?] = [name]
            var lengths = [4]
            return redisCommandArgv(context, 1, &argv, &lengths)
        }
        guard let reply else { return false }
        freeReplyObject(reply)
        return true
    }

    /// Returns a TCP port on 127.0.0.1 that nothing listens on right now, as the kernel picks it.
    static func freePort() throws -> Int {
        let socketDescriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard socketDescriptor >= 0 else {
            throw Failure(description: "socket() failed: \(String(cString: strerror(errno)))")
        }
        defer { close(socketDescriptor) }

        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { generic in
                guard bind(socketDescriptor, generic, length) == 0 else { return false }
                return getsockname(socketDescriptor, generic, &length) == 0
            }
        }
        guard bound else {
            throw Failure(description: "binding a free port failed: \(String(cString: strerror(errno)))")
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}
