import CMicroHTTPD
import Glibc
import HostAPI
import Synchronization

/// An HTTP request after libmicrohttpd has parsed and decoded it.
public struct HTTPRequest: Sendable {
    /// The method as sent: `GET`, `HEAD` or `POST`, because other methods get 405 before a
    /// handler runs.
    public var method: String
    /// The percent-decoded path without the query string, such as `/v1/orders`.
    public var path: String
    /// Query parameters, URL-decoded by libmicrohttpd. When a name repeats, the first value is
    /// kept. A name without `=` maps to the empty string.
    public var query: [String: String]
    /// Request headers with lower-cased names. The values of a repeated header are joined with
    /// ", ".
    public var headers: [String: String]
    /// The request body, at most `HTTPServer.maxBodyBytes` bytes.
    public var body: [UInt8]

    public init(method: String, path: String, query: [String: String] = [:],
                headers: [String: String] = [:], body: [UInt8] = [])
    {
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
    }
}

/// An HTTP response for libmicrohttpd to send. For HEAD requests it sends the headers only.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var contentType: String
    public var body: [UInt8]
    /// Extra headers, sent in this order after Content-Type.
    public var headers: [(String, String)]

    public init(status: Int, contentType: String, body: [UInt8], headers: [(String, String)] = []) {
        self.status = status
        self.contentType = contentType
        self.body = body
        self.headers = headers
    }

    /// Makes a response whose body is already encoded JSON.
    public static func json(_ status: Int, _ body: [UInt8], headers: [(String, String)] = [])
        -> HTTPResponse
    {
        HTTPResponse(status: status, contentType: "application/json", body: body, headers: headers)
    }

    public static func text(_ status: Int, _ body: String, headers: [(String, String)] = [])
        -> HTTPResponse
    {
        HTTPResponse(status: status, contentType: "text/plain; charset=utf-8", body: Array(body.utf8),
                     headers: headers)
    }
}

/// A reason `HTTPServer.init` failed.
public enum HTTPServerError: Error, Sendable, CustomStringConvertible {
    /// An argument is out of range, and `expected` describes the valid values.
    case invalidArgument(server: String, argument: String, value: String, expected: String)
    /// libmicrohttpd could not bind the address or start its threads. `errno` is the error code
    /// left by the failed call, or 0 when there was none.
    case listenFailed(server: String, address: String, port: Int, errno: Int32)

    public var description: String {
        switch self {
        case let .invalidArgument(server, argument, value, expected):
            return "invalid \(argument) \"\(value)\" (\(server)): expected \(expected)"
        case let .listenFailed(server, address, port, code) where code != 0:
            return "cannot listen on \(address):\(port) (\(server)): \(String(cString: strerror(code)))"
        case let .listenFailed(server, address, port, _):
            return "cannot listen on \(address):\(port) (\(server)): libmicrohttpd failed to "
                + "start without an error code; its log line before this one has the reason"
        }
    }
}

/// An HTTP/1.1 server on libmicrohttpd, which parses requests and runs a pool of worker threads.
///
/// Threads: the handler runs on the libmicrohttpd worker thread that accepted the connection,
/// one of `threads` threads that live as long as the server (the daemon's single internal
/// polling thread when `threads` is 1). A worker calls the handler for one request at a time, so
/// thread-local state such as a per-thread Lua query state needs no lock. While a handler is
/// slow, the other workers keep accepting and serving new connections.
///
/// NOTE: a connection stays on the worker that accepted it. A slow handler therefore delays
/// the keep-alive connections of its worker, and any connection that the worker accepted just
/// before the handler started. With curl starting two requests at once on a 2-core machine,
/// both landed on one worker in 3 of 15 runs. Running handlers on a separate pool through
/// MHD_suspend_connection would remove the delay, at the cost of a second set of threads.
public final class HTTPServer: Sendable {
    /// The largest request body accepted. A larger body gets 413 and never reaches the handler.
    public static let maxBodyBytes = 1 << 20

    /// The label used in logs and errors, such as "health port".
    public let name: String
    public let bindAddress: String
    /// The bound port, which differs from the requested one when that was 0.
    public let port: Int

    private let context: ServerContext
    /// The running daemon, or nil once `stop` has begun.
    private let daemon: Mutex<OpaquePointer?>

    /// Starts listening on `bindAddress:port` and returns once libmicrohttpd accepts
    /// connections. `bindAddress` is an IPv4 address such as "0.0.0.0" or "127.0.0.1", and port
    /// 0 picks a free port. A connection idle for `connectionTimeoutSeconds` is closed, and 0
    /// keeps idle connections open.
    public init(name: String, bindAddress: String, port: Int, threads: Int,
                connectionTimeoutSeconds: Int = 30,
                handler: @escaping @Sendable (HTTPRequest) -> HTTPResponse) throws(HTTPServerError)
    {
        try Self.validate(name: name, port: port, threads: threads,
                          connectionTimeoutSeconds: connectionTimeoutSeconds)
        var address = try Self.socketAddress(name: name, bindAddress: bindAddress, port: port)

        let context = ServerContext(name: name, handler: handler)
        errno = 0
        let started = Self.startDaemon(address: &address, threads: threads,
                                       connectionTimeoutSeconds: connectionTimeoutSeconds,
                                       context: Unmanaged.passUnretained(context).toOpaque())
        guard let started else {
            // NOTE: libmicrohttpd does not document errno after a failed start. Version 0.9.75
            // leaves the bind error there, which the tests check, and logDaemonMessage keeps it.
            let code = errno
            throw .listenFailed(server: name, address: bindAddress, port: port, errno: code)
        }

        self.name = name
        self.bindAddress = bindAddress
        self.context = context
        self.port = Int(cmhd_get_daemon_info(started, .DAEMON_INFO_BIND_PORT)?.pointee.port ?? 0)
        self.daemon = Mutex(started)
        Log.shared.info("HTTP server listening", [
            "server": .string(name), "address": .string(bindAddress), "port": .int(self.port),
            "threads": .int(threads),
        ])
    }

    deinit {
        stop()
    }

    /// Stops accepting connections, waits up to `drainTimeout` until the requests already received
    /// have their responses sent, then closes every connection and joins the worker threads. A client that
    /// connects during the wait is reset when it ends. Calling `stop` again does nothing. It must
    /// not be called from the handler, because it joins the thread that runs the handler.
    public func stop(drainTimeout: Duration = .seconds(5)) {
        let running = daemon.withLock { daemon in
            defer { daemon = nil }
            return daemon
        }
        guard let running else { return }

        // The daemon stops accepting but keeps serving open connections. MHD hands the listening
        // socket back, and it may be closed only after MHD_stop_daemon.
        let listenSocket = MHD_quiesce_daemon(running)
        let unanswered = waitForOpenRequests(timeout: drainTimeout)
        MHD_stop_daemon(running)
        if listenSocket >= 0 {
            close(listenSocket)
        }

        if unanswered > 0 {
            Log.shared.warn("HTTP server stopped with requests still open", [
                "server": .string(name), "port": .int(port), "requests": .int(unanswered),
            ])
        } else {
            Log.shared.info("HTTP server stopped", ["server": .string(name), "port": .int(port)])
        }
    }

    /// The number of requests whose headers have arrived and whose response has not yet been sent
    /// or abandoned.
    var openRequestCount: Int {
        context.openRequests.load(ordering: .relaxed)
    }

    /// Polls until no request is open or `timeout` has passed, and returns the number still open.
    private func waitForOpenRequests(timeout: Duration) -> Int {
        let deadline = ContinuousClock.now + timeout
        var open = openRequestCount
        while open > 0 && ContinuousClock.now < deadline {
            usleep(10_000)
            open = openRequestCount
        }
        return open
    }

    private static func validate(name: String, port: Int, threads: Int,
                                 connectionTimeoutSeconds: Int) throws(HTTPServerError)
    {
        guard (0...65535).contains(port) else {
            throw .invalidArgument(server: name, argument: "port", value: String(port),
                                   expected: "0 to 65535, where 0 picks a free port")
        }
        guard (1...1024).contains(threads) else {
            throw .invalidArgument(server: name, argument: "thread count", value: String(threads),
                                   expected: "1 to 1024")
        }
        guard connectionTimeoutSeconds >= 0 && connectionTimeoutSeconds <= Int(UInt32.max) else {
            throw .invalidArgument(server: name, argument: "connection timeout",
                                   value: String(connectionTimeoutSeconds),
                                   expected: "0 or more seconds, where 0 means no timeout")
        }
    }

    private static func socketAddress(name: String, bindAddress: String, port: Int)
        throws(HTTPServerError) -> sockaddr_in
    {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        guard inet_pton(AF_INET, bindAddress, &address.sin_addr) == 1 else {
            throw .invalidArgument(server: name, argument: "bind address", value: bindAddress,
                                   expected: "an IPv4 address such as 0.0.0.0 or 127.0.0.1")
        }
        return address
    }

    /// Calls MHD_start_daemon through the C wrapper and returns nil when it fails. The options
    /// array and the address it points to need to live only for this call.
    private static func startDaemon(address: inout sockaddr_in, threads: Int,
                                    connectionTimeoutSeconds: Int,
                                    context: UnsafeMutableRawPointer) -> OpaquePointer?
    {
        let port = UInt16(bigEndian: address.sin_port)
        return withUnsafeMutablePointer(to: &address) { addressPointer in
            var options = [
                MHD_OptionItem(option: .SOCK_ADDR, value: 0, ptr_value: addressPointer),
                MHD_OptionItem(option: .CONNECTION_TIMEOUT, value: connectionTimeoutSeconds,
                               ptr_value: nil),
            ]
            // libmicrohttpd 0.9.75 logs a warning for a pool size of 0 or 1, so one thread means
            // no pool option.
            if threads > 1 {
                options.append(MHD_OptionItem(option: .THREAD_POOL_SIZE, value: threads, ptr_value: nil))
            }
            options.append(MHD_OptionItem(option: .END, value: 0, ptr_value: nil))

            return cmhd_start_daemon(daemonFlags(), port, logDaemonMessage, context,
                                     handleAccess, context, handleRequestCompleted, context, options)
        }
    }

    /// Internal polling threads with epoll where libmicrohttpd was built with it, errors routed
    /// to the logger, and an inter-thread channel, which MHD_quiesce_daemon needs with a pool.
    private static func daemonFlags() -> UInt32 {
        var flags = MHD_USE_INTERNAL_POLLING_THREAD.rawValue | MHD_USE_ERROR_LOG.rawValue
            | MHD_USE_ITC.rawValue
        if MHD_is_feature_supported(.FEATURE_EPOLL) == .YES {
            flags |= MHD_USE_EPOLL.rawValue
        } else {
            flags |= MHD_USE_AUTO.rawValue
        }
        return flags
    }
}

/// The state libmicrohttpd's callbacks reach through their context pointer. The server keeps it
/// alive until MHD_stop_daemon has returned, so the pointer never dangles in a callback.
private final class ServerContext: Sendable {
    let name: String
    let handler: @Sendable (HTTPRequest) -> HTTPResponse
    /// Requests between their first access-handler call and their request-completed call.
    let openRequests = Atomic<Int>(0)

    init(name: String, handler: @escaping @Sendable (HTTPRequest) -> HTTPResponse) {
        self.name = name
        self.handler = handler
    }

    /// Calls the handler, or returns the rejection decided while the request arrived.
    func response(for pending: PendingRequest) -> HTTPResponse {
        if let rejection = pending.rejection {
            return rejection
        }
        let response = handler(pending.request)
        guard (100...599).contains(response.status) else {
            Log.shared.error("HTTP handler returned an invalid status code", [
                "server": .string(name), "path": .string(pending.request.path),
                "status": .int(response.status),
            ])
            return errorResponse(500, "internal error: the handler returned an invalid status code")
        }
        return response
    }

    /// Queues `response` on the connection. libmicrohttpd copies the body and headers, so the
    /// Swift values need to live only for this call.
    func queue(_ response: HTTPResponse, on connection: OpaquePointer) -> MHD_Result {
        let created = response.body.withUnsafeBytes { body in
            MHD_create_response_from_buffer(body.count, UnsafeMutableRawPointer(mutating: body.baseAddress),
                                            .RESPMEM_MUST_COPY)
        }
        guard let created else {
            Log.shared.error("libmicrohttpd failed to create a response", [
                "server": .string(name), "bytes": .int(response.body.count),
            ])
            return .NO
        }
        defer { MHD_destroy_response(created) }

        addHeader("Content-Type", response.contentType, to: created)
        for (headerName, value) in response.headers {
            addHeader(headerName, value, to: created)
        }
        return MHD_queue_response(connection, UInt32(response.status), created)
    }

    /// Adds one header. libmicrohttpd rejects names and values that contain line breaks or other
    /// characters HTTP forbids, and the response then goes out without that header.
    private func addHeader(_ headerName: String, _ value: String, to response: OpaquePointer) {
        if MHD_add_response_header(response, headerName, value) != .YES {
            Log.shared.warn("libmicrohttpd rejected a response header", [
                "server": .string(name), "header": .string(headerName),
            ])
        }
    }
}

/// One request while it arrives: created at its first access-handler call, released in the
/// request-completed callback. Only the worker thread that owns the connection touches it.
private final class PendingRequest {
    var request: HTTPRequest
    /// The response to send instead of calling the handler (405 or 413), once decided.
    var rejection: HTTPResponse?

    init(request: HTTPRequest) {
        self.request = request
        if !["GET", "HEAD", "POST"].contains(request.method) {
            rejection = errorResponse(405, "method \(request.method) is not allowed",
                                      headers: [("Allow", "GET, HEAD, POST")])
        } else if let length = request.headers["content-length"].flatMap({ Int($0) }),
                  length > HTTPServer.maxBodyBytes
        {
            rejection = Self.bodyTooLarge()
        }
    }

    /// Appends a piece of the body. Once the body passes the limit, the bytes read so far are
    /// dropped and the rest is read and discarded, because libmicrohttpd accepts no response
    /// while the upload is still arriving.
    func appendBody(_ bytes: UnsafeRawBufferPointer) {
        guard rejection == nil else { return }
        if request.body.count + bytes.count > HTTPServer.maxBodyBytes {
            request.body = []
            rejection = Self.bodyTooLarge()
            return
        }
        request.body.append(contentsOf: bytes)
    }

    private static func bodyTooLarge() -> HTTPResponse {
        errorResponse(413, "request body is larger than \(HTTPServer.maxBodyBytes) bytes")
    }
}

/// Makes a JSON error response with the body {"error": message}.
private func errorResponse(_ status: Int, _ message: String, headers: [(String, String)] = [])
    -> HTTPResponse
{
    var writer = JSONWriter()
    writer.beginObject()
    writer.field("error", first: true)
    writer.string(message)
    writer.endObject()
    return .json(status, writer.bytes, headers: headers)
}

// MARK: - libmicrohttpd callbacks

/// Handles one access-handler call. libmicrohttpd calls it on the worker thread that owns the
/// connection: once when the headers have arrived, once per piece of the body, and once more
/// when the whole request has arrived, which is when the response is queued.
private func handleAccess(
    context: UnsafeMutableRawPointer?, connection: OpaquePointer?, url: UnsafePointer<CChar>?,
    method: UnsafePointer<CChar>?, version: UnsafePointer<CChar>?,
    uploadData: UnsafePointer<CChar>?, uploadDataSize: UnsafeMutablePointer<Int>?,
    requestSlot: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
) -> MHD_Result {
    guard let context, let connection, let uploadDataSize, let requestSlot else { return .NO }
    let server = Unmanaged<ServerContext>.fromOpaque(context).takeUnretainedValue()

    guard let slot = requestSlot.pointee else {
        let request = HTTPRequest(
            method: method.map { String(cString: $0) } ?? "",
            path: url.map { String(cString: $0) } ?? "/",
            query: connectionValues(connection, kind: .GET_ARGUMENT_KIND),
            headers: connectionValues(connection, kind: .HEADER_KIND))
        let pending = PendingRequest(request: request)
        // The request-completed callback releases this reference and decrements the count.
        requestSlot.pointee = Unmanaged.passRetained(pending).toOpaque()
        server.openRequests.add(1, ordering: .relaxed)

        // A rejection known from the headers goes out at once. libmicrohttpd then discards any
        // body and closes the connection after the response.
        if let rejection = pending.rejection {
            return server.queue(rejection, on: connection)
        }
        return .YES
    }
    let pending = Unmanaged<PendingRequest>.fromOpaque(slot).takeUnretainedValue()

    if uploadDataSize.pointee > 0 {
        pending.appendBody(UnsafeRawBufferPointer(start: uploadData, count: uploadDataSize.pointee))
        uploadDataSize.pointee = 0
        return .YES
    }
    return server.queue(server.response(for: pending), on: connection)
}

/// Releases the request's state. libmicrohttpd calls it once for every request that reached
/// the access handler, whether the response was sent or the connection failed or timed out.
private func handleRequestCompleted(
    context: UnsafeMutableRawPointer?, connection: OpaquePointer?,
    requestSlot: UnsafeMutablePointer<UnsafeMutableRawPointer?>?,
    termination: MHD_RequestTerminationCode
) {
    guard let context, let requestSlot, let slot = requestSlot.pointee else { return }
    let server = Unmanaged<ServerContext>.fromOpaque(context).takeUnretainedValue()

    Unmanaged<PendingRequest>.fromOpaque(slot).release()
    requestSlot.pointee = nil
    server.openRequests.subtract(1, ordering: .relaxed)

    if termination != .REQUEST_TERMINATED_COMPLETED_OK {
        Log.shared.debug("HTTP request ended without a complete response", [
            "server": .string(server.name), "termination_code": .int(termination.rawValue),
        ])
    }
}

/// Formats one libmicrohttpd error message into the structured log. The message is cut at 511
/// bytes. errno is restored because the caller may read it after this returns, as
/// `HTTPServer.init` does when the daemon fails to start.
private func logDaemonMessage(
    context: UnsafeMutableRawPointer?, format: UnsafePointer<CChar>?, arguments: CVaListPointer?
) {
    let savedErrno = errno
    defer { errno = savedErrno }
    guard let context, let format, let arguments else { return }
    let server = Unmanaged<ServerContext>.fromOpaque(context).takeUnretainedValue()

    var buffer = [CChar](repeating: 0, count: 512)
    _ = vsnprintf(&buffer, buffer.count, format, arguments)
    var message = buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    while message.last?.isNewline == true {
        message.removeLast()
    }
    Log.shared.warn("libmicrohttpd reported an error", [
        "server": .string(server.name), "error": .string(message),
    ])
}

/// Collects the connection's headers or query arguments. Header names are lower-cased and the
/// values of a repeated header joined. For a repeated query argument the first value is kept.
private func connectionValues(_ connection: OpaquePointer, kind: MHD_ValueKind) -> [String: String] {
    var values: [String: String] = [:]
    withUnsafeMutablePointer(to: &values) { pointer in
        _ = MHD_get_connection_values(connection, kind, storeConnectionValue, pointer)
    }
    return values
}

private func storeConnectionValue(
    target: UnsafeMutableRawPointer?, kind: MHD_ValueKind, key: UnsafePointer<CChar>?,
    value: UnsafePointer<CChar>?
) -> MHD_Result {
    guard let target, let key else { return .YES }
    let values = target.assumingMemoryBound(to: [String: String].self)
    let text = value.map { String(cString: $0) } ?? ""

    if kind == .HEADER_KIND {
        let name = String(cString: key).lowercased()
        if let existing = values.pointee[name] {
            values.pointee[name] = existing + ", " + text
        } else {
            values.pointee[name] = text
        }
    } else {
        let name = String(cString: key)
        if values.pointee[name] == nil {
            values.pointee[name] = text
        }
    }
    return .YES
}
