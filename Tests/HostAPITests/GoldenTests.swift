import Foundation
import XCTest

@testable import HostAPI

/// Runs the shipped sample events through the shipped projections and compares the effects with
/// the golden file. Run with UPDATE_GOLDEN=1 to rewrite the file after an intended change.
final class GoldenTests: XCTestCase {
    private let repository = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    private func effects(events: String, topic: String? = nil) throws -> String {
        var settings = HostSettings()
        settings.sortObjectKeys = true
        let loader = ProjectionLoader(folder: repository.appendingPathComponent("projections").path,
                                      settings: settings)
        let (set, report) = try loader.load(nowMs: 0)
        XCTAssertEqual(report.failures, [], "the shipped projections must load")

        let runner = try OfflineRunner(set: set, settings: settings, topic: topic)
        var lines = runner.initLines()
        let data = try Data(contentsOf: repository.appendingPathComponent(events))
        for (index, line) in data.split(separator: UInt8(ascii: "\n")).enumerated() {
            lines += runner.run(line: Array(line), number: index + 1)
        }
        XCTAssertEqual(runner.errorCount, 0)
        // Absolute paths differ between machines; the golden file keeps the folder-relative one.
        let root = repository.path + "/"
        return lines.map { $0.replacingOccurrences(of: root, with: "") + "\n" }.joined()
    }

    private func compare(_ actual: String, golden name: String) throws {
        let golden = repository.appendingPathComponent("Tests/HostAPITests/Golden/\(name)")
        if ProcessInfo.processInfo.environment["UPDATE_GOLDEN"] == "1" {
            try Data(actual.utf8).write(to: golden)
            return
        }
        let expected = try String(contentsOf: golden, encoding: .utf8)
        let actualLines = actual.split(separator: "\n")
        let expectedLines = expected.split(separator: "\n")
        for (number, (got, want)) in zip(actualLines, expectedLines).enumerated() where got != want {
            XCTFail("\(name) differs at output line \(number + 1):\n got: \(got)\nwant: \(want)")
            return
        }
        XCTAssertEqual(actualLines.count, expectedLines.count, "\(name): line count differs")
    }

    func testSampleEventsMatchGolden() throws {
        try compare(try effects(events: "examples/events/sample.jsonl"), golden: "sample.effects.jsonl")
    }

    func testOutputIsStableAcrossRuns() throws {
        let first = try effects(events: "examples/events/sample.jsonl")
        let second = try effects(events: "examples/events/sample.jsonl")
        XCTAssertEqual(first, second)
    }
}
