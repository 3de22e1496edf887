import XCTest

@testable import HostAPI

final class SandboxTests: XCTestCase {
    /// Runs `expression` inside a handler and returns the error message it raised, if any.
    private func errorOf(_ statement: String) throws -> String? {
        try runHandler(statement).failure?.message
    }

    func testMissingLibrariesAreAbsent() throws {
        for name in ["io", "debug", "package", "dofile", "loadfile", "coroutine", "require_native"] {
            let message = try errorOf("local x = \(name)")
            XCTAssertEqual(message, "unknown global '\(name)' (declare it local or use ctx)", name)
        }
    }

    func testOsHasOnlyTimeClockDate() throws {
        XCTAssertNil(try errorOf("assert(os.time() > 0); assert(os.clock() >= 0); assert(os.date('!%Y', 0) == '1970')"))
        for name in ["execute", "exit", "getenv", "remove", "rename", "tmpname"] {
            let message = try errorOf("assert(os.\(name) == nil, 'os.\(name) is present')")
            XCTAssertNil(message, name)
        }
    }

    func testStringDumpIsRemovedEvenThroughMetatable() throws {
        XCTAssertNil(try errorOf("assert(string.dump == nil); assert(('x').dump == nil)"))
        XCTAssertNil(try errorOf("assert(getmetatable('') == 'the string metatable is protected')"))
    }

    func testLoadRejectsBinaryChunks() throws {
        let message = try errorOf("load('return 1', 'x', 'b')")
        XCTAssertTrue(message?.contains("binary chunks are not allowed") ?? false, message ?? "no error")
        let binary = try errorOf("local f, err = load('\\27Lua', 'x'); assert(f == nil); error(err)")
        XCTAssertTrue(binary?.contains("attempt to load a binary chunk") ?? false, binary ?? "no error")
        XCTAssertNil(try errorOf("assert(load('return 1 + 1')() == 2)"))
    }

    func testUnknownGlobalReadAndWriteRaise() throws {
        XCTAssertEqual(try errorOf("local x = undefined_name"),
                       "unknown global 'undefined_name' (declare it local or use ctx)")
        XCTAssertEqual(try errorOf("leaked = 1"),
                       "assignment to undeclared global 'leaked' (declare it local)")
    }

    func testSettingsAreReadOnly() throws {
        XCTAssertNil(try errorOf("assert(settings.aggregated_topic == 'aggregation.bars.v1')"))
        let message = try errorOf("settings.aggregated_topic = 'x'")
        XCTAssertEqual(message, "settings is read-only (assignment to 'aggregated_topic')")
    }

    func testGcMetamethodsAreRejected() throws {
        let message = try errorOf("setmetatable({}, { __gc = function() end })")
        XCTAssertEqual(message, "__gc metamethods are not allowed in projections")
    }

    func testCollectGarbageAllowsOnlyCount() throws {
        XCTAssertNil(try errorOf("assert(collectgarbage('count') > 0)"))
        XCTAssertNotNil(try errorOf("collectgarbage('collect')"))
    }

    func testRequireLoadsOnlyFromLibraryFolder() throws {
        let instance = try makeInstance("""
            local util = require("util")
            local again = require("util")
            assert(util == again, "modules load once")
            return { topics = { "t" }, on_event = function(event, ctx) ctx.redis("SET", util.key, 1) end }
            """, libraries: ["util": "return { key = 'from-lib' }"])
        XCTAssertEqual(instance.requiredLibraries, ["util"])
        let effects = instance.handle(message("{}"), store: InMemoryStateStore(), nowMs: 0).effects
        XCTAssertEqual(effects, [.redis(arguments: [Array("SET".utf8), Array("from-lib".utf8), Array("1".utf8)])])

        XCTAssertThrowsError(try makeInstance("require('missing')")) { error in
            XCTAssertTrue("\(error)".contains("module 'missing' not found in projections/lib"), "\(error)")
        }
        XCTAssertThrowsError(try makeInstance("require('../secret')")) { error in
            XCTAssertTrue("\(error)".contains("invalid module name '../secret'"), "\(error)")
        }
    }

    func testRunawayLoopEndsWithBudgetError() throws {
        let limits = LuaLimits(instructionsPerCall: 100_000)
        let outcome = try runHandler("while true do end", limits: limits)
        let failure = try XCTUnwrap(outcome.failure)
        XCTAssertEqual(failure.projection, "demo")
        XCTAssertEqual(failure.phase, .onEvent)
        XCTAssertTrue(failure.message.contains("instruction budget exceeded"), failure.message)
    }

    func testPcallCannotSwallowBudgetError() throws {
        let limits = LuaLimits(instructionsPerCall: 100_000)
        let body = """
            for _ = 1, 100 do
              pcall(function() while true do end end)
            end
            ctx.redis("SET", "escaped", 1)
            """
        let outcome = try runHandler(body, limits: limits)
        XCTAssertTrue(outcome.failure?.message.contains("instruction budget exceeded") ?? false)
    }

    func testBudgetIsRestoredForNextCall() throws {
        let limits = LuaLimits(instructionsPerCall: 100_000)
        let instance = try makeInstance(handlerProjection("""
            if event.spin then while true do end end
            ctx.redis("SET", "ok", 1)
            """), limits: limits)
        let store = InMemoryStateStore()
        XCTAssertNotNil(instance.handle(message(#"{"spin":true}"#), store: store, nowMs: 0).failure)
        XCTAssertEqual(instance.handle(message("{}"), store: store, nowMs: 0).effects?.count, 1)
    }

    func testMemoryCapStopsProjectionNotHost() throws {
        let limits = LuaLimits(memoryBytes: 4 << 20)
        let instance = try makeInstance(handlerProjection("""
            if event.grow then
              local t = {}
              for i = 1, 1e9 do t[i] = string.rep("x", 64) .. i end
            end
            ctx.redis("SET", "ok", 1)
            """), limits: limits)
        let store = InMemoryStateStore()
        let failure = try XCTUnwrap(instance.handle(message(#"{"grow":true}"#), store: store, nowMs: 0).failure)
        XCTAssertTrue(failure.message.contains("memory limit exceeded"), failure.message)
        XCTAssertLessThanOrEqual(instance.memoryPeak, 4 << 20)
        // The same state handles the next event once the garbage is collected.
        XCTAssertEqual(instance.handle(message("{}"), store: store, nowMs: 0).effects?.count, 1)
    }

    func testErrorCarriesFileLineAndTraceback() throws {
        let failure = try XCTUnwrap(try runHandler("local t = nil\n    return t.field").failure)
        XCTAssertEqual(failure.file, "projections/demo.lua")
        XCTAssertEqual(failure.line, 5)
        XCTAssertTrue(failure.message.contains("attempt to index a nil value"), failure.message)
        XCTAssertTrue(failure.traceback.contains("projections/demo.lua:5"), failure.traceback)
        XCTAssertEqual(failure.description.prefix(46), "projections/demo.lua:5: projection demo, on_ev")
    }

    func testPrintBecomesLogEffect() throws {
        let effects = try runHandler("print('hello', 42)").effects
        XCTAssertEqual(effects, [.log(level: .info, message: "hello\t42", fields: [])])
    }

    func testContextIsReadOnlyAcrossEvents() throws {
        let instance = try makeInstance(handlerProjection("""
            assert(ctx.headers.injected == nil, "a write leaked from an earlier event")
            local ok, err = pcall(function() ctx.headers.injected = "x" end)
            assert(not ok and err:find("ctx.headers is read%-only"), tostring(err))
            ok, err = pcall(function() ctx.mine = 1 end)
            assert(not ok and err:find("ctx is read%-only"), tostring(err))
            ok, err = pcall(function() ctx.state.get = nil end)
            assert(not ok and err:find("ctx.state is read%-only"), tostring(err))
            """))
        let store = InMemoryStateStore()
        XCTAssertNotNil(instance.handle(message("{}"), store: store, nowMs: 0).effects)
        XCTAssertNotNil(instance.handle(message("{}"), store: store, nowMs: 0).effects)
    }

    func testTableErrorObjectIsNamedByType() throws {
        let failure = try XCTUnwrap(try runHandler("error({ code = 1 })").failure)
        XCTAssertEqual(failure.message, "(error object is a table value)")
    }
}
