import Foundation

/// SIGHUP, SIGTERM and SIGINT, received synchronously with `sigtimedwait` on the thread that
/// calls `wait`, so no work runs inside a signal handler.
///
/// The signals are blocked before any other thread starts, so every thread inherits the mask
/// and only `sigtimedwait` receives them. A no-op handler is installed as well: as PID 1 in a
/// container, the kernel drops signals whose disposition is the default, and a handler makes
/// them count.
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
    /// `everySecond` runs on this thread about once a second between signals.
    func wait(control: RuntimeControl, reload: () -> Void, everySecond: () -> Void = {}) {
        var set = self.set
        var timeout = timespec(tv_sec: 1, tv_nsec: 0)
        while true {
            let received = sigtimedwait(&set, nil, &timeout)
            if received < 0 {
                if errno != EAGAIN && errno != EINTR {
                    Log.shared.error("sigtimedwait failed", ["error": .string(String(cString: strerror(errno)))])
                }
                everySecond()
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
