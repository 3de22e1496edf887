import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import XCTest

@testable import Runtime

/// Runs real HTTP requests against a server on 127.0.0.1, sent by the curl command-line tool.
final class HTTPServerTests: XCTestCase {
    /// The requests a handler received and the threads it ran on.
    private final class Recorder: Sendable {
        private let state = Mutex<(requests: [HTTPRequest], threads: [UInt])>(([], []))

        func record(_ request: HTTPRequest) {
            let thread = UInt(pthread_self())
            state.withLock { state in
                state.requests.append(request)
                state.threads.append(thread)
            }
        }

        var requests: [HTTPRequest] { state.withLock { $0.requests } }
        var threads: [UInt] { state.withLock { $0.threads } }
    }

    private struct CurlResult {
        var exitCode: Int32
        var status: Int
        /// Response header lines as curl wrote them, with lower-cased names.
        var headers: [String]
        var body: [UInt8]

        var text: String { String(decoding: body, as: UTF8.self) }
    }

    private var scratch: URL!

    override func setUpWithError() throws {
        scratch = FileManager.default.temporaryDirectory
            .appendingPathComponent("http-server-tests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try FileManager.default.removeItem(at: scratch)
    }

    // MARK: - Helpers

    private func startServer(threads: Int = 2, port: Int = 0,
                             handler: @escaping @Sendable (HTTPRequest) -> HTTPResponse) throws
        -> HTTPServer
    {
        try HTTPServer(name: "test port", bindAddress: "127.0.0.1", port: port, threads: threads,
                       connectionTimeoutSeconds: 5, handler: handler)
    }

    private func url(_ server: HTTPServer, _ pathAndQuery: String) -> String {
        "http://127.0.0.1:\(server.port)\(pathAndQuery)"
    }

    /// Starts curl with the body going to one file and the headers to another.
    private func launchCurl(_ arguments: [String]) throws -> (Process, Pipe, URL, URL) {
        let name = UUID().uuidString
        let bodyFile = scratch.appendingPathComponent("\(name).body")
        let headerFile = scratch.appendingPathComponent("\(name).headers")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        process.arguments = ["--silent", "--max-time", "10", "--output", bodyFile.path,
                             "--dump-header", headerFile.path, "--write-out", "%{http_code}"]
            + arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        return (process, output, bodyFile, headerFile)
    }

    private func finishCurl(_ launched: (Process, Pipe, URL, URL)) -> CurlResult {
        let (process, output, bodyFile, headerFile) = launched
        let statusText = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        let headerText = (try? String(contentsOf: headerFile, encoding: .utf8)) ?? ""
        return CurlResult(
            exitCode: process.terminationStatus,
            status: Int(statusText) ?? 0,
            headers: headerText.split(separator: "\r\n").map { line in
                guard let colon = line.firstIndex(of: ":") else { return String(line) }
                return line[..<colon].lowercased() + line[colon...]
            },
            body: (try? Array(Data(contentsOf: bodyFile))) ?? [])
    }

    private func curl(_ arguments: [String]) throws -> CurlResult {
        finishCurl(try launchCurl(arguments))
    }

    private func writeFile(_ bytes: [UInt8]) throws -> String {
        let file = scratch.appendingPathComponent(UUID().uuidString)
        try Data(bytes).write(to: file)
        return file.path
    }

    private func patternBytes(count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 / 251) }
    }

    // MARK: - Requests and responses

    func testGetDecodesQueryAndHeaders() throws {
        let recorder = Recorder()
        let server = try startServer { request in
            recorder.record(request)
            return .text(200, "ok")
        }
        defer { server.stop() }

        let result = try curl(["--header", "X-Tenant-Key: k1",
                               url(server, "/v1/orders?tenant_id=a%20b&limit=10&flag&q=x+y&limit=20")])

        XCTAssertEqual(result.status, 200)
        XCTAssertEqual(result.text, "ok")
        let request = try XCTUnwrap(recorder.requests.first)
        XCTAssertEqual(request.method, "GET")
        XCTAssertEqual(request.path, "/v1/orders")
        XCTAssertEqual(request.query["tenant_id"], "a b")
        XCTAssertEqual(request.query["limit"], "10", "the first value of a repeated name wins")
        XCTAssertEqual(request.query["flag"], "")
        XCTAssertEqual(request.query["q"], "x y", "a plus sign in the query is a space")
        XCTAssertEqual(request.headers["x-tenant-key"], "k1")
        XCTAssertEqual(request.headers["host"], "127.0.0.1:\(server.port)")
        XCTAssertEqual(request.body, [])
    }

    func testPathIsPercentDecoded() throws {
        let recorder = Recorder()
        let server = try startServer { request in
            recorder.record(request)
            return .text(200, "ok")
        }
        defer { server.stop() }

        let result = try curl([url(server, "/projections/daily%20totals")])

        XCTAssertEqual(result.status, 200)
        XCTAssertEqual(recorder.requests.first?.path, "/projections/daily totals")
    }

    func testHandlerResponsePassesThrough() throws {
        let server = try startServer { _ in
            .json(404, Array(#"{"error":"no such projection"}"#.utf8), headers: [("X-Request-Id", "r-17")])
        }
        defer { server.stop() }

        let result = try curl([url(server, "/projections/missing")])

        XCTAssertEqual(result.status, 404)
        XCTAssertEqual(result.text, #"{"error":"no such projection"}"#)
        XCTAssertTrue(result.headers.contains("content-type: application/json"), "\(result.headers)")
        XCTAssertTrue(result.headers.contains("x-request-id: r-17"), "\(result.headers)")
    }

    func testEmptyBodyResponse() throws {
        let server = try startServer { _ in HTTPResponse(status: 204, contentType: "text/plain", body: []) }
        defer { server.stop() }

        let result = try curl([url(server, "/")])

        XCTAssertEqual(result.status, 204)
        XCTAssertEqual(result.body, [])
    }

    func testHeadSendsHeadersWithoutBody() throws {
        let recorder = Recorder()
        let server = try startServer { request in
            recorder.record(request)
            return .text(200, "twelve bytes")
        }
        defer { server.stop() }

        let result = try curl(["--head", url(server, "/health")])

        // With --head, curl writes the response headers to the output file, so a body would follow them.
        XCTAssertEqual(result.status, 200)
        XCTAssertTrue(result.text.hasSuffix("Content-Length: 12\r\n\r\n"), result.text)
        XCTAssertFalse(result.text.contains("twelve bytes"), result.text)
        XCTAssertEqual(recorder.requests.first?.method, "HEAD")
    }

    func testInvalidStatusBecomes500() throws {
        let server = try startServer { _ in .text(42, "not a status") }
        defer { server.stop() }

        let result = try curl([url(server, "/")])

        XCTAssertEqual(result.status, 500)
        XCTAssertTrue(result.text.contains("invalid status code"), result.text)
    }

    func testOtherMethodGets405() throws {
        let recorder = Recorder()
        let server = try startServer { request in
            recorder.record(request)
            return .text(200, "ok")
        }
        defer { server.stop() }

        let result = try curl(["--request", "DELETE", url(server, "/projections/orders")])

        XCTAssertEqual(result.status, 405)
        XCTAssertTrue(result.headers.contains("allow: GET, HEAD, POST"), "\(result.headers)")
        XCTAssertEqual(result.text, #"{"error":"method DELETE is not allowed"}"#)
        XCTAssertEqual(recorder.requests.count, 0, "the handler must not run for a rejected method")
    }

    // MARK: - Request bodies

    func testPostBodyIsDelivered() throws {
        let recorder = Recorder()
        let server = try startServer { request in
            recorder.record(request)
            return .text(200, String(request.body.count))
        }
        defer { server.stop() }
        // Large enough to arrive in several upload callbacks.
        let body = patternBytes(count: 300_000)

        let result = try curl(["--data-binary", "@" + writeFile(body), url(server, "/admin/reload")])

        XCTAssertEqual(result.status, 200)
        XCTAssertEqual(result.text, "300000")
        let request = try XCTUnwrap(recorder.requests.first)
        XCTAssertEqual(request.method, "POST")
        XCTAssertEqual(request.body.count, body.count)
        XCTAssertTrue(request.body == body, "the body differs from the bytes sent")
    }

    func testBodyAtLimitIsAccepted() throws {
        let server = try startServer { request in .text(200, String(request.body.count)) }
        defer { server.stop() }
        let file = try writeFile(patternBytes(count: HTTPServer.maxBodyBytes))

        let result = try curl(["--data-binary", "@" + file, url(server, "/")])

        XCTAssertEqual(result.status, 200)
        XCTAssertEqual(result.text, String(HTTPServer.maxBodyBytes))
    }

    func testBodyOverLimitGets413() throws {
        let recorder = Recorder()
        let server = try startServer { request in
            recorder.record(request)
            return .text(200, "ok")
        }
        defer { server.stop() }
        let file = try writeFile(patternBytes(count: HTTPServer.maxBodyBytes + 1))

        // With Content-Length the server rejects the request from its headers.
        let declared = try curl(["--data-binary", "@" + file, url(server, "/")])
        // A chunked body has no declared length, so the server counts the bytes as they arrive.
        let chunked = try curl(["--header", "Transfer-Encoding: chunked", "--data-binary", "@" + file,
                                url(server, "/")])

        XCTAssertEqual(declared.status, 413)
        XCTAssertEqual(declared.text, #"{"error":"request body is larger than 1048576 bytes"}"#)
        XCTAssertEqual(chunked.status, 413)
        XCTAssertEqual(chunked.text, #"{"error":"request body is larger than 1048576 bytes"}"#)
        XCTAssertEqual(recorder.requests.count, 0, "the handler must not run for an oversized body")
    }

    // MARK: - Threads

    func testSlowHandlerDoesNotBlockNewConnection() throws {
        let recorder = Recorder()
        let entered = DispatchSemaphore(value: 0)
        let server = try startServer(threads: 4) { request in
            recorder.record(request)
            entered.signal()
            usleep(300_000)
            return .text(200, "slow")
        }
        defer { server.stop() }

        // The second request starts once the first handler runs. A connection that arrives
        // before then may be accepted by the same worker and wait for it (see HTTPServer).
        let started = ContinuousClock.now
        let first = try launchCurl([url(server, "/first")])
        XCTAssertEqual(entered.wait(timeout: .now() + 5), .success, "the first handler never started")
        let second = try launchCurl([url(server, "/second")])
        let results = [finishCurl(first), finishCurl(second)]
        let elapsed = ContinuousClock.now - started

        XCTAssertEqual(results.map(\.status), [200, 200])
        XCTAssertLessThan(elapsed, .milliseconds(550), "two 300 ms handlers ran one after the other")
        XCTAssertEqual(Set(recorder.threads).count, 2, "both requests ran on one worker thread")
    }

    func testHandlerRunsOnPoolThreads() throws {
        let recorder = Recorder()
        let server = try startServer(threads: 2) { request in
            recorder.record(request)
            return .text(200, "ok")
        }
        defer { server.stop() }

        for index in 0..<12 {
            XCTAssertEqual(try curl([url(server, "/\(index)")]).status, 200)
        }

        let threads = Set(recorder.threads)
        XCTAssertEqual(recorder.threads.count, 12)
        XCTAssertLessThanOrEqual(threads.count, 2, "the handler ran outside the pool of 2 threads")
        XCTAssertFalse(threads.contains(UInt(pthread_self())), "the handler ran on the caller's thread")
    }

    // MARK: - Listening and stopping

    func testPortZeroBindsFreePort() throws {
        let server = try startServer { _ in .text(200, "ok") }
        defer { server.stop() }

        XCTAssertGreaterThan(server.port, 0)
        XCTAssertEqual(try curl([url(server, "/")]).status, 200)
    }

    func testPortInUseFailsWithMessage() throws {
        let first = try startServer { _ in .text(200, "ok") }
        defer { first.stop() }

        XCTAssertThrowsError(try startServer(port: first.port) { _ in .text(200, "ok") }) { error in
            XCTAssertEqual("\(error)", "cannot listen on 127.0.0.1:\(first.port) (test port): Address already in use")
        }
    }

    func testInvalidArgumentsAreRejected() {
        let handler: @Sendable (HTTPRequest) -> HTTPResponse = { _ in .text(200, "ok") }

        XCTAssertThrowsError(try HTTPServer(name: "health port", bindAddress: "localhost", port: 0, threads: 1,
                                            handler: handler)) { error in
            XCTAssertEqual("\(error)", #"invalid bind address "localhost" (health port): expected an IPv4 address such as 0.0.0.0 or 127.0.0.1"#)
        }
        XCTAssertThrowsError(try HTTPServer(name: "health port", bindAddress: "127.0.0.1", port: 70000, threads: 1,
                                            handler: handler)) { error in
            XCTAssertEqual("\(error)", #"invalid port "70000" (health port): expected 0 to 65535, where 0 picks a free port"#)
        }
        XCTAssertThrowsError(try HTTPServer(name: "health port", bindAddress: "127.0.0.1", port: 0, threads: 0,
                                            handler: handler)) { error in
            XCTAssertEqual("\(error)", #"invalid thread count "0" (health port): expected 1 to 1024"#)
        }
    }

    func testSingleThreadServerWorks() throws {
        let server = try startServer(threads: 1) { request in .text(200, request.path) }
        defer { server.stop() }

        XCTAssertEqual(try curl([url(server, "/one")]).text, "/one")
        XCTAssertEqual(try curl([url(server, "/two")]).text, "/two")
    }

    func testIdleConnectionIsClosedAfterTimeout() throws {
        let server = try HTTPServer(name: "test port", bindAddress: "127.0.0.1", port: 0, threads: 1,
                                    connectionTimeoutSeconds: 1) { _ in .text(200, "ok") }
        defer { server.stop() }
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(client, 0)
        defer { close(client) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(server.port).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(client, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        XCTAssertEqual(connected, 0, "connect failed with errno \(errno)")
        var receiveTimeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &receiveTimeout, socklen_t(MemoryLayout<timeval>.size))

        // The client sends nothing, so recv returns 0 once the server closes the connection.
        let started = ContinuousClock.now
        var byte: UInt8 = 0
        let received = recv(client, &byte, 1, 0)
        let elapsed = ContinuousClock.now - started

        XCTAssertEqual(received, 0, "the server did not close the idle connection")
        XCTAssertGreaterThanOrEqual(elapsed, .milliseconds(900))
        XCTAssertLessThan(elapsed, .seconds(3))
    }

    func testStopRefusesNewConnections() throws {
        let server = try startServer { _ in .text(200, "ok") }
        let address = url(server, "/")
        XCTAssertEqual(try curl([address]).status, 200)

        server.stop()
        server.stop()

        let result = try curl([address])
        XCTAssertEqual(result.exitCode, 7, "curl exit code 7 means the connection was refused")
    }

    func testStopAnswersRequestInFlight() throws {
        let entered = DispatchSemaphore(value: 0)
        let server = try startServer { _ in
            entered.signal()
            usleep(300_000)
            return .text(200, "finished")
        }

        let launched = try launchCurl([url(server, "/slow")])
        XCTAssertEqual(entered.wait(timeout: .now() + 5), .success, "the handler never started")
        server.stop()
        let result = finishCurl(launched)

        XCTAssertEqual(result.status, 200)
        XCTAssertEqual(result.text, "finished")
        XCTAssertEqual(server.openRequestCount, 0)
    }

    func testKeepAliveRequestsReleaseState() throws {
        let handled = Atomic<Int>(0)
        let server = try startServer { _ in
            handled.add(1, ordering: .relaxed)
            return .text(200, "ok")
        }
        defer { server.stop() }
        let requestCount = 1000
        // One curl process sends every request, reusing its connection where the server allows.
        var config = ""
        for index in 0..<requestCount {
            config += "url = \"\(url(server, "/ping?i=\(index)"))\"\noutput = \"/dev/null\"\n"
        }
        let configFile = try writeFile(Array(config.utf8))

        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        process.arguments = ["--silent", "--config", configFile, "--write-out", "%{http_code} %{num_connects}\n"]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        let lines = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .split(separator: "\n")
        process.waitUntilExit()

        XCTAssertEqual(lines.count, requestCount)
        XCTAssertTrue(lines.allSatisfy { $0.hasPrefix("200 ") }, "a request did not get 200")
        let connections = lines.compactMap { $0.split(separator: " ").last.flatMap { Int($0) } }.reduce(0, +)
        XCTAssertEqual(connections, 1, "curl opened more than one connection, so keep-alive was not used")
        XCTAssertEqual(handled.load(ordering: .relaxed), requestCount)

        // The request-completed callback may run just after curl has read the last response.
        let deadline = ContinuousClock.now + .seconds(2)
        while server.openRequestCount > 0 && ContinuousClock.now < deadline {
            usleep(5_000)
        }
        XCTAssertEqual(server.openRequestCount, 0, "per-request state was not released")
    }
}
