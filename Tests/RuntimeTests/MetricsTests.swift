import Foundation
import Runtime
import Synchronization
import XCTest

final class MetricsTests: XCTestCase {
    func testExpositionTextExact() {
        let registry = MetricsRegistry()
        let events = registry.counter(name: "projection_events_total", help: "Events handled.",
                                      labelNames: ["projection", "outcome"])
        events.labels("latest_price", "ok").inc()
        events.labels("latest_price", "ok").inc(by: 2)
        events.labels("bar_rollups", "error").inc()
        let lag = registry.gauge(name: "kafka_consumer_lag", help: "Messages behind the end.",
                                 labelNames: ["partition"])
        lag.labels("0").set(12)
        lag.labels("1").set(0.5)
        let batch = registry.histogram(name: "batch_commit_duration_seconds", help: "Commit time.",
                                       buckets: [0.1, 1])
        batch.labels().observe(0.05)
        batch.labels().observe(0.5)
        batch.labels().observe(3)
        let uptime = registry.gauge(name: "runtime_up", help: "1 while running.")
        uptime.labels().set(1)

        XCTAssertEqual(registry.render(), """
            # HELP batch_commit_duration_seconds Commit time.
            # TYPE batch_commit_duration_seconds histogram
            batch_commit_duration_seconds_bucket{le="0.1"} 1
            batch_commit_duration_seconds_bucket{le="1"} 2
            batch_commit_duration_seconds_bucket{le="+Inf"} 3
            batch_commit_duration_seconds_sum 3.55
            batch_commit_duration_seconds_count 3
            # HELP kafka_consumer_lag Messages behind the end.
            # TYPE kafka_consumer_lag gauge
            kafka_consumer_lag{partition="0"} 12
            kafka_consumer_lag{partition="1"} 0.5
            # HELP projection_events_total Events handled.
            # TYPE projection_events_total counter
            projection_events_total{projection="bar_rollups",outcome="error"} 1
            projection_events_total{projection="latest_price",outcome="ok"} 3
            # HELP runtime_up 1 while running.
            # TYPE runtime_up gauge
            runtime_up 1

            """)
    }

    func testLabelValueAndHelpEscaping() {
        let registry = MetricsRegistry()
        let errors = registry.counter(name: "errors_total", help: "Errors by \"message\"\nwith C:\\path.",
                                      labelNames: ["message"])
        errors.labels("bad \"quote\" in C:\\dir\nnext line").inc()

        XCTAssertEqual(registry.render(), """
            # HELP errors_total Errors by "message"\\nwith C:\\\\path.
            # TYPE errors_total counter
            errors_total{message="bad \\"quote\\" in C:\\\\dir\\nnext line"} 1

            """)
    }

    func testHistogramBucketsCumulative() {
        let registry = MetricsRegistry()
        let family = registry.histogram(name: "event_size_bytes", help: "Payload size.",
                                        labelNames: ["topic"], buckets: [10, 100, 1000])
        let histogram = family.labels("bars")
        for size in [5.0, 10, 50, 99, 100, 500, 5000, 7000] {
            histogram.observe(size)
        }

        let lines = registry.render().split(separator: "\n").map(String.init)

        XCTAssertTrue(lines.contains(#"event_size_bytes_bucket{topic="bars",le="10"} 2"#), "\(lines)")
        XCTAssertTrue(lines.contains(#"event_size_bytes_bucket{topic="bars",le="100"} 5"#), "\(lines)")
        XCTAssertTrue(lines.contains(#"event_size_bytes_bucket{topic="bars",le="1000"} 6"#), "\(lines)")
        XCTAssertTrue(lines.contains(#"event_size_bytes_bucket{topic="bars",le="+Inf"} 8"#), "\(lines)")
        XCTAssertTrue(lines.contains(#"event_size_bytes_sum{topic="bars"} 12764"#), "\(lines)")
        XCTAssertTrue(lines.contains(#"event_size_bytes_count{topic="bars"} 8"#), "\(lines)")
        XCTAssertEqual(histogram.count, 8)
    }

    func testHistogramObservesDurationInSeconds() {
        let histogram = MetricsRegistry().histogram(name: "wait_seconds", help: "Wait.").labels()

        histogram.observe(Duration.milliseconds(250))

        XCTAssertEqual(histogram.sumOfObservations, 0.25, accuracy: 1e-12)
    }

    func testLabelsReturnSameChild() {
        let family = MetricsRegistry().counter(name: "hits_total", help: "Hits.", labelNames: ["route"])

        XCTAssertTrue(family.labels("a") === family.labels("a"))
        XCTAssertFalse(family.labels("a") === family.labels("b"))
    }

    func testRegisteringTwiceReturnsSameFamily() {
        let registry = MetricsRegistry()
        let first = registry.counter(name: "hits_total", help: "Hits.", labelNames: ["route"])
        let second = registry.counter(name: "hits_total", help: "Hits.", labelNames: ["route"])

        first.labels("a").inc()

        XCTAssertTrue(first === second)
        XCTAssertEqual(second.labels("a").value, 1)
    }

    func testLabelledFamilyWithoutChildrenOmitted() {
        let registry = MetricsRegistry()
        _ = registry.counter(name: "unused_total", help: "Never incremented.", labelNames: ["kind"])
        _ = registry.counter(name: "plain_total", help: "Exported as 0 before any increment.")

        XCTAssertEqual(registry.render(), """
            # HELP plain_total Exported as 0 before any increment.
            # TYPE plain_total counter
            plain_total 0

            """)
    }

    func testGaugeMovesBothWays() {
        let gauge = MetricsRegistry().gauge(name: "in_flight", help: "In flight.").labels()

        gauge.inc(by: 5)
        gauge.dec(by: 2)
        gauge.dec()

        XCTAssertEqual(gauge.value, 2)
    }

    func testSpecialValuesFormatted() {
        let registry = MetricsRegistry()
        let gauge = registry.gauge(name: "values", help: "Values.", labelNames: ["case"])
        gauge.labels("big").set(1e20)
        gauge.labels("inf").set(.infinity)
        gauge.labels("minus_inf").set(-.infinity)
        gauge.labels("nan").set(.nan)
        gauge.labels("negative").set(-7)

        let lines = registry.render().split(separator: "\n").map(String.init)

        XCTAssertTrue(lines.contains(#"values{case="big"} 1e+20"#), "\(lines)")
        XCTAssertTrue(lines.contains(#"values{case="inf"} +Inf"#), "\(lines)")
        XCTAssertTrue(lines.contains(#"values{case="minus_inf"} -Inf"#), "\(lines)")
        XCTAssertTrue(lines.contains(#"values{case="nan"} NaN"#), "\(lines)")
        XCTAssertTrue(lines.contains(#"values{case="negative"} -7"#), "\(lines)")
    }

    func testConcurrentIncrementsNotLost() {
        let registry = MetricsRegistry()
        let counter = registry.counter(name: "events_total", help: "Events.").labels()
        let histogram = registry.histogram(name: "latency_seconds", help: "Latency.", buckets: [1]).labels()
        let threads = 4
        let perThread = 50_000

        DispatchQueue.concurrentPerform(iterations: threads) { _ in
            for _ in 0..<perThread {
                counter.inc()
                histogram.observe(0.5)
            }
        }

        XCTAssertEqual(counter.value, Double(threads * perThread))
        XCTAssertEqual(histogram.count, UInt64(threads * perThread))
        XCTAssertEqual(histogram.sumOfObservations, Double(threads * perThread) * 0.5)
    }

    func testRenderWhileUpdating() {
        let registry = MetricsRegistry()
        let family = registry.counter(name: "events_total", help: "Events.", labelNames: ["n"])
        let done = Atomic(false)

        DispatchQueue.concurrentPerform(iterations: 2) { worker in
            if worker == 0 {
                for index in 0..<20_000 {
                    family.labels(String(index % 50)).inc()
                }
                done.store(true, ordering: .releasing)
            } else {
                while !done.load(ordering: .acquiring) {
                    let text = registry.render()
                    XCTAssertTrue(text.isEmpty || text.hasPrefix("# HELP events_total"), text)
                }
            }
        }

        XCTAssertEqual(registry.render().split(separator: "\n").count, 52)
    }

    // MARK: - Process metrics

    func testProcessMetricsPlausible() throws {
        let sample = ProcessMetrics().sample()

        XCTAssertEqual(sample.failures, [])
        let resident = try XCTUnwrap(sample.residentMemoryBytes)
        let virtual = try XCTUnwrap(sample.virtualMemoryBytes)
        XCTAssertGreaterThan(resident, 0)
        XCTAssertGreaterThanOrEqual(virtual, resident)
        XCTAssertGreaterThanOrEqual(try XCTUnwrap(sample.cpuSeconds), 0)
        XCTAssertGreaterThan(try XCTUnwrap(sample.openFileDescriptors), 0)
        XCTAssertGreaterThanOrEqual(try XCTUnwrap(sample.maxFileDescriptors),
                                    try XCTUnwrap(sample.openFileDescriptors))
        let started = try XCTUnwrap(sample.startTimeSeconds)
        let now = Date().timeIntervalSince1970
        XCTAssertLessThanOrEqual(started, now + 1)
        XCTAssertGreaterThan(started, now - 3600, "the test process started within the last hour")
    }

    func testProcessMetricsCountOpenedDescriptor() throws {
        let before = try XCTUnwrap(ProcessMetrics().sample().openFileDescriptors)
        let descriptor = open("/dev/null", O_RDONLY)
        XCTAssertGreaterThanOrEqual(descriptor, 0)
        defer { close(descriptor) }

        let after = try XCTUnwrap(ProcessMetrics().sample().openFileDescriptors)

        XCTAssertEqual(after, before + 1)
    }

    func testProcessMetricsRenderedByRegistry() {
        let registry = MetricsRegistry()
        registry.register(ProcessMetrics())

        let text = registry.render()

        for name in ["process_resident_memory_bytes", "process_virtual_memory_bytes", "process_cpu_seconds_total",
                     "process_open_fds", "process_max_fds", "process_start_time_seconds"] {
            XCTAssertTrue(text.contains("# TYPE \(name) "), "missing \(name) in:\n\(text)")
            let sample = text.split(separator: "\n").first { $0.hasPrefix(name + " ") }
            XCTAssertNotNil(sample.flatMap { Double($0.split(separator: " ")[1]) }, "no value for \(name)")
        }
        XCTAssertTrue(text.contains("# TYPE process_cpu_seconds_total counter"), text)
    }
}
