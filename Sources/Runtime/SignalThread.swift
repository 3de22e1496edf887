import Foundation

/// SIGHUP, SIGTERM and SIGINT, received synchronously with `sigwait` on the thread that calls
/// `wait`, so no work runs inside a signal handler.
///
/// The signals are blocked before any other thread starts, so every thread inherits the mask
/// and only `sigwait` sees them. A no-op handler is installed as well: as PID 1 in a container,
/// the kernel drops signals whose disposition is the default, and a handler makes them count.
struct SignalThread {
    private var set = sigset_t()

    static let handled: [Int32] = [SIGHUP, SIGTERM, SIGINT]

    /// Blocks the handled signals in the calling thread (and the threads it creates later).
    static func blockHandledSignals() -> SignalThread {
        var thread = SignalThread()
        sigemptyset(&thread.set)
        for signal in handled {
            sigaddset(&thread.set, signal)
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { _ in }
            sigemptyset(&action.sa_mask)
            sigaction(signal, &action, nil)
        }
        pthread_sigmask(SIG_BLOCK, &thread.set, nil)
        return thread
    }

    /// Waits for signals: SIGHUP calls `reload`, SIGTERM and SIGINT stop the runtime and return.
    func wait(control: RuntimeControl, reload: () -> Void) {
        var set = self.set
        while true {
            var received: Int32 = 0
            let result = sigwait(&set, &received)
            if result != 0 {
                Log.shared.error("sigwait failed", ["error": .string(String(cString: strerror(result)))])
                continue
            }
            switch received {
            case SIGHUP:
                Log.shared.info("SIGHUP received: reloading projections")
                reload()
            default:
                Log.shared.info("signal received: stopping", ["signal": .int(received)])
                control.stop()
                return
            }
        }
    }
}
