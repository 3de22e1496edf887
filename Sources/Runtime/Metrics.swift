import Synchronization

/// Labelled counters, gauges and histograms, rendered in the Prometheus text exposition format
/// 0.0.4 for the metrics endpoint.
///
/// Registering a family and looking up a child by label values take a lock. Updating a child
/// does not: each child keeps its values in atomics, so a worker thread keeps the child it looked
/// up once and updates it per event while the HTTP thread renders.
///
/// Misuse is a programming error and stops the process with the metric named. Misuse is an
/// invalid metric or label name, a counter name without `_total`, a second registration of one
/// name with another type, labels or buckets, or a wrong number of label values.
public final class MetricsRegistry: Sendable {
    private let families = Mutex<[String: any RenderableFamily]>([:])
    private let collectors = Mutex<[any MetricsCollector]>([])

    /// The Content-Type of `render()`'s output, for the HTTP response.
    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    public init() {}

    /// Returns the counter family `name`, registering it on the first call. `name` ends with
    /// `_total`, as Prometheus names counters.
    public func counter(name: String, help: String, labelNames: [String] = []) -> CounterFamily {
        precondition(name.hasSuffix("_total"), "counter \(name): a counter name ends with _total")
        return register(CounterFamily(name: name, help: help, labelNames: labelNames))
    }

    /// Returns the gauge family `name`, registering it on the first call.
    public func gauge(name: String, help: String, labelNames: [String] = []) -> GaugeFamily {
        register(GaugeFamily(name: name, help: help, labelNames: labelNames))
    }

    /// Returns the histogram family `name`, registering it on the first call. `buckets` are the
    /// upper bounds in increasing order, and the `+Inf` bucket is added after them.
    public func histogram(name: String, help: String, labelNames: [String] = [],
                          buckets: [Double] = Histogram.defaultBuckets) -> HistogramFamily {
        register(HistogramFamily(name: name, help: help, labelNames: labelNames, buckets: buckets))
    }

    /// Adds a source of metrics that `render()` appends after the registered families.
    public func register(_ collector: any MetricsCollector) {
        collectors.withLock { $0.append(collector) }
    }

    /// Renders every family that has at least one child, sorted by name, then the collectors.
    public func render() -> String {
        let sortedFamilies = families.withLock { families in
            families.values.sorted { $0.name < $1.name }
        }
        var output = ""
        for family in sortedFamilies {
            family.render(into: &output)
        }
        for collector in collectors.withLock({ $0 }) {
            collector.render(into: &output)
        }
        return output
    }

    /// Stores `family` unless one of that name exists, and returns the stored family.
    private func register<Family: RenderableFamily>(_ family: Family) -> Family {
        families.withLock { families in
            guard let existing = families[family.name] else {
                families[family.name] = family
                return family
            }
            guard let same = existing as? Family, same.isCompatible(with: family) else {
                preconditionFailure("metric \(family.name) is already registered with another type, "
                    + "other labels or other buckets")
            }
            return same
        }
    }
}

/// A source of metrics text outside the registry, such as `ProcessMetrics`.
public protocol MetricsCollector: Sendable {
    /// Appends complete metric families (`# HELP`, `# TYPE` and samples) in the text format.
    func render(into output: inout String)
}

// MARK: - Families

/// The part of a family that the registry renders.
protocol RenderableFamily: AnyObject, Sendable {
    var name: String { get }
    func render(into output: inout String)
    /// True when a second registration of this name may return `self`.
    func isCompatible(with other: Self) -> Bool
}

/// The children of one family by label values, created on first use.
final class LabelledChildren<Child: AnyObject & Sendable>: Sendable {
    let name: String
    let help: String
    let labelNames: [String]
    private let makeChild: @Sendable (_ renderedLabels: String) -> Child
    private let children = Mutex<[[String]: (labels: String, child: Child)]>([:])

    init(name: String, help: String, labelNames: [String],
         makeChild: @escaping @Sendable (_ renderedLabels: String) -> Child) {
        PrometheusText.validate(metricName: name, labelNames: labelNames)
        self.name = name
        self.help = help
        self.labelNames = labelNames
        self.makeChild = makeChild
        if labelNames.isEmpty {
            // A family without labels is exported as 0 before its first update.
            _ = child(for: [])
        }
    }

    func child(for values: [String]) -> Child {
        precondition(values.count == labelNames.count,
                     "metric \(name): \(values.count) label values for the labels \(labelNames)")
        return children.withLock { children in
            if let existing = children[values] {
                return existing.child
            }
            let labels = PrometheusText.labelPairs(names: labelNames, values: values)
            let child = makeChild(labels)
            children[values] = (labels, child)
            return child
        }
    }

    /// Returns the children sorted by label values, each with its rendered `name="value"` pairs.
    func snapshot() -> [(labels: String, child: Child)] {
        children.withLock { children in
            children.sorted { $0.key.lexicographicallyPrecedes($1.key) }.map(\.value)
        }
    }

    func renderHeader(type: String, into output: inout String) {
        PrometheusText.appendHeader(name: name, help: help, type: type, into: &output)
    }
}

public final class CounterFamily: RenderableFamily {
    private let children: LabelledChildren<Counter>

    init(name: String, help: String, labelNames: [String]) {
        children = LabelledChildren(name: name, help: help, labelNames: labelNames) { _ in Counter() }
    }

    public var name: String { children.name }

    /// Returns the counter of these label values, given in the order of the label names. Keep it
    /// for updates on a hot path, where the lookup would cost a lock and hashing per event.
    public func labels(_ values: String...) -> Counter {
        children.child(for: values)
    }

    public func labels(_ values: [String]) -> Counter {
        children.child(for: values)
    }

    func render(into output: inout String) {
        let snapshot = children.snapshot()
        guard !snapshot.isEmpty else { return }
        children.renderHeader(type: "counter", into: &output)
        for (labels, counter) in snapshot {
            PrometheusText.appendSample(name: name, labels: labels, value: counter.value, into: &output)
        }
    }

    func isCompatible(with other: CounterFamily) -> Bool {
        children.labelNames == other.children.labelNames
    }
}

public final class GaugeFamily: RenderableFamily {
    private let children: LabelledChildren<Gauge>

    init(name: String, help: String, labelNames: [String]) {
        children = LabelledChildren(name: name, help: help, labelNames: labelNames) { _ in Gauge() }
    }

    public var name: String { children.name }

    /// Returns the gauge of these label values, given in the order of the label names.
    public func labels(_ values: String...) -> Gauge {
        children.child(for: values)
    }

    public func labels(_ values: [String]) -> Gauge {
        children.child(for: values)
    }

    func render(into output: inout String) {
        let snapshot = children.snapshot()
        guard !snapshot.isEmpty else { return }
        children.renderHeader(type: "gauge", into: &output)
        for (labels, gauge) in snapshot {
            PrometheusText.appendSample(name: name, labels: labels, value: gauge.value, into: &output)
        }
    }

    func isCompatible(with other: GaugeFamily) -> Bool {
        children.labelNames == other.children.labelNames
    }
}

public final class HistogramFamily: RenderableFamily {
    private let children: LabelledChildren<Histogram>
    private let buckets: [Double]

    init(name: String, help: String, labelNames: [String], buckets: [Double]) {
        precondition(!labelNames.contains("le"), "histogram \(name): the label name le is reserved")
        precondition(buckets.allSatisfy(\.isFinite) && zip(buckets, buckets.dropFirst()).allSatisfy(<),
                     "histogram \(name): buckets must be finite and strictly increasing")
        self.buckets = buckets
        children = LabelledChildren(name: name, help: help, labelNames: labelNames) { labels in
            Histogram(upperBounds: buckets, renderedLabels: labels)
        }
    }

    public var name: String { children.name }

    /// Returns the histogram of these label values, given in the order of the label names.
    public func labels(_ values: String...) -> Histogram {
        children.child(for: values)
    }

    public func labels(_ values: [String]) -> Histogram {
        children.child(for: values)
    }

    func render(into output: inout String) {
        let snapshot = children.snapshot()
        guard !snapshot.isEmpty else { return }
        children.renderHeader(type: "histogram", into: &output)
        for (_, histogram) in snapshot {
            histogram.render(name: name, into: &output)
        }
    }

    func isCompatible(with other: HistogramFamily) -> Bool {
        children.labelNames == other.children.labelNames && buckets == other.buckets
    }
}

// MARK: - Children

/// A value that only goes up. The value is a Double's bit pattern in an atomic, updated by
/// compare-and-exchange, so concurrent increments are never lost.
public final class Counter: Sendable {
    private let bits = AtomicDouble()

    init() {}

    /// Adds `amount`, which must be zero or positive (a counter never goes down).
    public func inc(by amount: Double = 1) {
        precondition(amount >= 0, "a counter cannot be increased by \(amount)")
        bits.add(amount)
    }

    public var value: Double { bits.load() }
}

/// A value that goes up and down.
public final class Gauge: Sendable {
    private let bits = AtomicDouble()

    init() {}

    public func set(_ value: Double) {
        bits.store(value)
    }

    public func inc(by amount: Double = 1) {
        bits.add(amount)
    }

    public func dec(by amount: Double = 1) {
        bits.add(-amount)
    }

    public var value: Double { bits.load() }
}

/// Counts of observations per bucket and their sum.
///
/// Each bucket counts only the observations that fall into it. Rendering accumulates them, and
/// `_count` is the sum of all buckets, so `_count` always equals the `+Inf` bucket. `_sum` is
/// updated separately and may lag the counts by the observations in flight during a render.
public final class Histogram: Sendable {
    /// The default buckets of the Prometheus client libraries, in seconds: 5 ms to 10 s.
    public static let defaultBuckets: [Double] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

    private let upperBounds: [Double]
    /// One count per bucket of `upperBounds`, then the `+Inf` bucket.
    private let counts: [AtomicCount]
    private let sum = AtomicDouble()
    private let renderedLabels: String

    init(upperBounds: [Double], renderedLabels: String) {
        self.upperBounds = upperBounds
        self.counts = (0...upperBounds.count).map { _ in AtomicCount() }
        self.renderedLabels = renderedLabels
    }

    public func observe(_ value: Double) {
        let index = upperBounds.firstIndex { value <= $0 } ?? upperBounds.count
        counts[index].increment()
        sum.add(value)
    }

    /// Observes a duration in seconds, the base unit of time in Prometheus.
    public func observe(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        observe(Double(seconds) + Double(attoseconds) * 1e-18)
    }

    /// The number of observations.
    public var count: UInt64 {
        counts.reduce(0) { $0 + $1.load() }
    }

    public var sumOfObservations: Double { sum.load() }

    func render(name: String, into output: inout String) {
        let separator = renderedLabels.isEmpty ? "" : ","
        var cumulative: UInt64 = 0
        for (index, count) in counts.enumerated() {
            cumulative += count.load()
            let bound = index < upperBounds.count ? PrometheusText.format(upperBounds[index]) : "+Inf"
            let labels = "\(renderedLabels)\(separator)le=\"\(bound)\""
            PrometheusText.appendSample(name: name + "_bucket", labels: labels, value: Double(cumulative),
                                        into: &output)
        }
        PrometheusText.appendSample(name: name + "_sum", labels: renderedLabels, value: sum.load(),
                                    into: &output)
        PrometheusText.appendSample(name: name + "_count", labels: renderedLabels,
                                    value: Double(cumulative), into: &output)
    }
}

/// A Double kept as its bit pattern in an atomic.
final class AtomicDouble: Sendable {
    private let bits = Atomic<UInt64>(0)

    func load() -> Double {
        Double(bitPattern: bits.load(ordering: .relaxed))
    }

    func store(_ value: Double) {
        bits.store(value.bitPattern, ordering: .relaxed)
    }

    func add(_ amount: Double) {
        var current = bits.load(ordering: .relaxed)
        while true {
            let next = (Double(bitPattern: current) + amount).bitPattern
            let (exchanged, original) = bits.weakCompareExchange(
                expected: current, desired: next, ordering: .relaxed)
            if exchanged { return }
            current = original
        }
    }
}

/// One histogram bucket's count.
final class AtomicCount: Sendable {
    private let value = Atomic<UInt64>(0)

    func increment() {
        value.wrappingAdd(1, ordering: .relaxed)
    }

    func load() -> UInt64 {
        value.load(ordering: .relaxed)
    }
}

// MARK: - Text format

/// Writing the Prometheus text exposition format 0.0.4.
enum PrometheusText {
    static func appendHeader(name: String, help: String, type: String, into output: inout String) {
        output += "# HELP \(name) \(escapeHelp(help))\n# TYPE \(name) \(type)\n"
    }

    /// Appends `name{labels} value`, where `labels` are rendered pairs or empty.
    static func appendSample(name: String, labels: String, value: Double, into output: inout String) {
        output += name
        if !labels.isEmpty {
            output += "{\(labels)}"
        }
        output += " \(format(value))\n"
    }

    /// Renders `a="x",b="y"` with escaped values.
    static func labelPairs(names: [String], values: [String]) -> String {
        zip(names, values).map { "\($0)=\"\(escapeLabelValue($1))\"" }.joined(separator: ",")
    }

    /// Escapes a backslash, a double quote and a line feed, as the format requires.
    static func escapeLabelValue(_ value: String) -> String {
        var escaped = ""
        for character in value.unicodeScalars {
            switch character {
            case "\\": escaped += "\\\\"
            case "\"": escaped += "\\\""
            case "\n": escaped += "\\n"
            default: escaped.unicodeScalars.append(character)
            }
        }
        return escaped
    }

    /// Escapes a backslash and a line feed. A HELP line keeps its double quotes.
    static func escapeHelp(_ help: String) -> String {
        var escaped = ""
        for character in help.unicodeScalars {
            switch character {
            case "\\": escaped += "\\\\"
            case "\n": escaped += "\\n"
            default: escaped.unicodeScalars.append(character)
            }
        }
        return escaped
    }

    /// Formats a sample value: whole numbers without a fraction, `+Inf`, `-Inf` and `NaN` as
    /// the format spells them, and other values in Swift's shortest round-trip form.
    static func format(_ value: Double) -> String {
        if value.isNaN { return "NaN" }
        if value.isInfinite { return value > 0 ? "+Inf" : "-Inf" }
        if value == value.rounded(), abs(value) < 1e15 {
            return String(Int64(value))
        }
        return "\(value)"
    }

    static func validate(metricName name: String, labelNames: [String]) {
        precondition(name.wholeMatch(of: #/[a-zA-Z_:][a-zA-Z0-9_:]*/#) != nil,
                     "metric name '\(name)' is invalid")
        for label in labelNames {
            precondition(label.wholeMatch(of: #/[a-zA-Z_][a-zA-Z0-9_]*/#) != nil && !label.hasPrefix("__"),
                         "metric \(name): label name '\(label)' is invalid")
        }
        precondition(Set(labelNames).count == labelNames.count, "metric \(name): duplicate label names")
    }
}
