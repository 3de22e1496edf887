import XCTest

@testable import HostAPI

final class ProjectionLoaderTests: XCTestCase {
    private let counter = """
        return { topics = { "t" }, on_event = function(event, ctx) ctx.redis("INCR", "VERSION") end }
        """

    private func source(_ version: String) -> String {
        counter.replacingOccurrences(of: "VERSION", with: version)
    }

    private func entryKinds(_ report: ReloadReport) -> [String] {
        report.entries.map { entry in
            switch entry {
            case .loaded(let name, _, _, let previous): previous == nil ? "new \(name)" : "changed \(name)"
            case .unchanged(let name, _, _): "unchanged \(name)"
            case .failed(let failure, let kept): "failed \(failure.file) kept=\(kept != nil)"
            case .removed(let name, _, _): "removed \(name)"
            }
        }
    }

    func testReloadHandlesChangedBrokenRemovedAndNewFiles() throws {
        let folder = try ProjectionFolder()
        try folder.write("a.lua", source("a1"))
        try folder.write("b.lua", source("b1"))
        try folder.write("c.lua", source("c1"))
        let loader = ProjectionLoader(folder: folder.path)
        let (first, firstReport) = try loader.load(nowMs: 1)
        XCTAssertEqual(entryKinds(firstReport), ["new a", "new b", "new c"])
        XCTAssertEqual(first.generation, 1)

        try folder.write("a.lua", source("a2"))              // changed
        try folder.write("b.lua", "return { topics = ")      // broken
        try folder.remove("c.lua")                            // removed
        try folder.write("d.lua", source("d1"))              // new
        let (second, report) = try loader.load(previous: first, nowMs: 2)

        XCTAssertEqual(entryKinds(report), ["changed a", "failed \(folder.path)/b.lua kept=true", "new d", "removed c"])
        XCTAssertEqual(second.projections.map(\.name), ["a", "b", "d"])
        XCTAssertEqual(second.projection(named: "b"), first.projection(named: "b"), "broken file keeps its version")
        XCTAssertNotEqual(second.projection(named: "a")?.version, first.projection(named: "a")?.version)
        let failure = try XCTUnwrap(report.failures.first)
        XCTAssertEqual(failure.line, 1)
        XCTAssertEqual(failure.phase, .load)
    }

    func testUnchangedFileKeepsVersionAndLoadTime() throws {
        let folder = try ProjectionFolder()
        try folder.write("a.lua", source("a"))
        let loader = ProjectionLoader(folder: folder.path)
        let (first, _) = try loader.load(nowMs: 1)
        let (second, report) = try loader.load(previous: first, nowMs: 2)
        XCTAssertEqual(entryKinds(report), ["unchanged a"])
        XCTAssertEqual(second.projections.first?.loadedAtMs, 1)
    }

    func testLibraryChangeReloadsItsUsers() throws {
        let folder = try ProjectionFolder()
        try folder.write("lib/keys.lua", "return { prefix = 'v1' }")
        try folder.write("user.lua", """
            local keys = require("keys")
            return { topics = { "t" }, on_event = function(event, ctx) ctx.redis("SET", keys.prefix, 1) end }
            """)
        try folder.write("other.lua", source("other"))
        let loader = ProjectionLoader(folder: folder.path)
        let (first, _) = try loader.load(nowMs: 1)
        XCTAssertEqual(first.projection(named: "user")?.requiredLibraries, ["keys"])

        try folder.write("lib/keys.lua", "return { prefix = 'v2' }")
        let (_, report) = try loader.load(previous: first, nowMs: 2)
        XCTAssertEqual(entryKinds(report), ["unchanged other", "changed user"])
    }

    func testNewBrokenFileIsReportedAndNotLoaded() throws {
        let folder = try ProjectionFolder()
        try folder.write("good.lua", source("good"))
        try folder.write("bad.lua", handlerProjection("local x = ") )
        let (set, report) = try ProjectionLoader(folder: folder.path).load(nowMs: 1)
        XCTAssertEqual(set.projections.map(\.name), ["good"])
        XCTAssertEqual(set.unloadedFailures.count, 1)
        XCTAssertEqual(entryKinds(report), ["failed \(folder.path)/bad.lua kept=false", "new good"])
    }

    func testFailingInitKeepsPreviousVersion() throws {
        let folder = try ProjectionFolder()
        try folder.write("a.lua", source("a"))
        let loader = ProjectionLoader(folder: folder.path)
        let (first, _) = try loader.load(nowMs: 1)
        try folder.write("a.lua", """
            return { topics = { "t" }, on_event = function() end, init = function(ctx) error("no table") end }
            """)
        let (second, report) = try loader.load(previous: first, nowMs: 2)
        XCTAssertEqual(report.failures.first?.phase, .initialize)
        XCTAssertEqual(report.failures.first?.line, 1)
        XCTAssertEqual(second.projections, first.projections)
    }

    func testDuplicateNamesAreRejected() throws {
        let folder = try ProjectionFolder()
        try folder.write("a.lua", source("a"))
        try folder.write("b.lua", "return { name = 'a', topics = { 't' }, on_event = function() end }")
        let (set, report) = try ProjectionLoader(folder: folder.path).load(nowMs: 1)
        XCTAssertEqual(set.projections.map(\.code.stem), ["a"])
        XCTAssertTrue(report.failures.first?.message.contains("projection name 'a' is already used by") ?? false)
    }

    func testMissingFolderIsAClearError() {
        XCTAssertThrowsError(try ProjectionLoader(folder: "/nonexistent/projections").load(nowMs: 0)) { error in
            XCTAssertTrue("\(error)".contains("cannot read the projections folder /nonexistent/projections"), "\(error)")
        }
    }

    func testRunnerSwapsOnlyChangedProjectionsAndKeepsState() throws {
        let folder = try ProjectionFolder()
        try folder.write("a.lua", handlerProjection("""
            local n = (ctx.state.get("n") or 0) + 1
            ctx.state.put("n", n)
            ctx.redis("SET", "a", n)
            """))
        try folder.write("b.lua", source("b"))
        let loader = ProjectionLoader(folder: folder.path)
        let (first, _) = try loader.load(nowMs: 1)
        let runner = ProjectionRunner(set: first, settings: HostSettings())
        let store = InMemoryStateStore()
        XCTAssertEqual(runner.handle(message("{}"), store: store, nowMs: 0).count, 2)
        let untouched = runner.instance(named: "b")

        try folder.write("a.lua", handlerProjection("""
            local n = (ctx.state.get("n") or 0) + 1
            ctx.state.put("n", n)
            ctx.redis("SET", "a-v2", n)
            """))
        let (second, _) = try loader.load(previous: first, nowMs: 2)
        XCTAssertEqual(runner.swap(to: second).count, 0)
        XCTAssertTrue(runner.instance(named: "b") === untouched, "unchanged versions keep their state")

        let results = runner.handle(message("{}"), store: store, nowMs: 0)
        let effects = results.first { $0.projection == "a" }?.outcome.effects
        XCTAssertEqual(effects?.last, .redis(arguments: ["SET", "a-v2", "2"].map { Array($0.utf8) }),
                       "keyed state survives the reload")
    }
}
