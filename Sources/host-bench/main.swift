import Foundation
import HostAPI

// Prints the Lua host's own cost per event (JSON decode + handler + effects, no I/O) for the
// shipped projections, and the JSON decoder's throughput. Run: swift run -c release host-bench

let events = Int(ProcessInfo.processInfo.environment["BENCH_EVENTS"] ?? "") ?? 200_000
let instruments = 1_000
let folder = CommandLine.arguments.dropFirst().first ?? "projections"

/// A realistic 1m bar for instrument `index`, minute `minute`.
func barPayload(instrument index: Int, minute: Int) -> [UInt8] {
    let start = 1_764_799_980_000 + Int64(minute) * 60_000
    let close = 100.0 + Double(index % 97) + Double(minute % 13) * 0.25
    let text = #"{"tenant_id":"t\#(index % 4)","instrument_id":"INS\#(index)","timeframe":"1m","start_ms":\#(start),"end_ms":\#(start + 60_000),"open":\#(close - 0.5),"high":\#(close + 0.75),"low":\#(close - 1.25),"close":\#(close),"volume":\#(1000 + index),"trade_count":\#(10 + minute % 50),"vwap":\#(close - 0.1),"revision":0}"#
    return Array(text.utf8)
}

func messages(count: Int) -> [EventMessage] {
    (0..<count).map { index in
        let instrument = index % instruments
        let minute = index / instruments
        return EventMessage(topic: "aggregation.bars.v1", partition: Int32(instrument % 32),
                            offset: Int64(index), payload: barPayload(instrument: instrument, minute: minute))
    }
}

func seconds(_ body: () -> Void) -> Double {
    let start = DispatchTime.now().uptimeNanoseconds
    body()
    return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
}

func measureProjections(_ names: Set<String>, input: [EventMessage]) throws -> (perEvent: Double, effects: Int, peakLua: Int) {
    let (fullSet, report) = try ProjectionLoader(folder: folder).load(nowMs: 0)
    guard report.succeeded else {
        throw NSError(domain: "host-bench", code: 1, userInfo: [NSLocalizedDescriptionKey: "\(report.failures)"])
    }
    let set = ProjectionSet(generation: 1, projections: fullSet.projections.filter { names.contains($0.name) })
    let runner = ProjectionRunner(set: set, settings: HostSettings())
    let store = InMemoryStateStore()
    var effectCount = 0
    var failures = 0
    var firstFailure: ProjectionFailure?
    let elapsed = seconds {
        for message in input {
            for result in runner.handle(message, store: store, nowMs: 0) {
                switch result.outcome {
                case .handled(let effects): effectCount += effects.count
                case .failed(let failure):
                    failures += 1
                    firstFailure = firstFailure ?? failure
                }
            }
        }
    }
    if let firstFailure {
        print("error: \(failures) handler failures in the benchmark input, the first: \(firstFailure)")
        exit(1)
    }
    let peak = names.compactMap { runner.instance(named: $0)?.memoryPeak }.max() ?? 0
    return (elapsed / Double(input.count) * 1e6, effectCount, peak)
}

func measureDecoder(input: [EventMessage]) throws -> (perEvent: Double, megabytesPerSecond: Double) {
    let state = try LuaState(limits: LuaLimits(memoryBytes: 0, instructionsPerCall: 0))
    let limits = JSONLimits()
    let bytes = input.reduce(0) { $0 + $1.payload.count }
    var failed = false
    let elapsed = seconds {
        for message in input {
            do {
                try state.pushJSON(message.payload, limits: limits)
                state.pop()
            } catch {
                failed = true
            }
        }
    }
    precondition(!failed, "the decoder rejected benchmark input")
    return (elapsed / Double(input.count) * 1e6, Double(bytes) / elapsed / 1e6)
}

let input = messages(count: events)
print("host-bench: \(events) bar events over \(instruments) instruments, projections from \(folder)")
print("(one thread, no I/O: the cost of decode + handler + effect recording)")
print("")
print("case                                   us/event   events/s   effects/event   peak Lua MiB")

let decoder = try measureDecoder(input: input)
print("JSON decode only".padding(toLength: 38, withPad: " ", startingAt: 0)
      + String(format: " %9.3f %10.0f %15@ %14@", decoder.perEvent, 1e6 / decoder.perEvent, "-", "-"))
print(String(format: "  decoder throughput: %.1f MB/s", decoder.megabytesPerSecond))

let cases = [("latest_price", Set(["latest_price"])),
             ("latest_price + bar_rollups", Set(["latest_price", "bar_rollups"]))]
let only = ProcessInfo.processInfo.environment["BENCH_ONLY"]
for (label, names) in cases where only == nil || only == label {
    let result = try measureProjections(names, input: input)
    print(label.padding(toLength: 38, withPad: " ", startingAt: 0) + String(format: " %9.3f %10.0f %15.2f %14.2f", result.perEvent,
                 1e6 / result.perEvent, Double(result.effects) / Double(events),
                 Double(result.peakLua) / 1_048_576))
}
