import XCTest

@testable import HostAPI

final class ProjectionContractTests: XCTestCase {
    private func validationMessage(_ source: String, stem: String = "demo") -> String? {
        do {
            _ = try makeInstance(source, stem: stem)
            return nil
        } catch {
            return error.message
        }
    }

    func testNameDefaultsToFileStem() throws {
        let instance = try makeInstance(handlerProjection(""), stem: "volume_counter")
        XCTAssertEqual(instance.name, "volume_counter")
        XCTAssertEqual(instance.topics, ["t"])
        XCTAssertFalse(instance.hasInit)
    }

    func testTopicsComeFromSettings() throws {
        var settings = HostSettings(aggregatedTopic: "bars.staging")
        settings.projectionSettings["demo"] = ["lateness_ms": .integer(5)]
        let instance = try makeInstance("""
            assert(settings.lateness_ms == 5)
            return { topics = { settings.aggregated_topic, settings.invalidation_topic },
                     on_event = function() end }
            """, settings: settings)
        XCTAssertEqual(instance.topics, ["bars.staging", "projection.invalidation.v1"])
    }

    func testContractViolationsAreReported() {
        let cases: [(String, String)] = [
            ("return 42", "the file must return a projection table, but it returned number"),
            ("return { topics = {}, on_event = function() end }", "topics[1] must be a non-empty topic name (topics must be a non-empty array)"),
            ("return { topics = { 't' } }", "on_event must be a function(event, ctx)"),
            ("return { topics = { 't' }, on_event = function() end, init = 1 }", "init must be a function(ctx) or absent"),
            ("return { topics = { 't' }, on_event = function() end, name = 'Bad-Name' }", "invalid projection name 'Bad-Name'"),
            ("return { topics = { 't' }, on_event = function() end, on_evnt = 1 }", "unknown field 'on_evnt' in the projection table"),
            ("return { topics = { 't' }, on_event = function() end, queries = { x = 1 } }", "queries.x must be a function(params, ctx)"),
            ("return { topics = { 't' }, on_event = function() end, scripts = { s = '' } }", "scripts must map names to non-empty Redis Lua sources"),
        ]
        for (source, expected) in cases {
            let message = validationMessage(source)
            XCTAssertTrue(message?.hasPrefix(expected) ?? false, "\(source): \(message ?? "no error")")
        }
    }

    func testSyntaxErrorNamesFileAndLine() throws {
        do {
            _ = try makeInstance("return {\n  topics = { 't' },\n  on_event = function( end,\n}")
            XCTFail("expected a load failure")
        } catch {
            XCTAssertEqual(error.phase, .load)
            XCTAssertEqual(error.file, "projections/demo.lua")
            XCTAssertEqual(error.line, 3)
            XCTAssertTrue(error.message.contains("near 'end'"), error.message)
        }
    }

    func testEventContextFields() throws {
        let instance = try makeInstance(handlerProjection("""
            ctx.redis("SET", "meta", ctx.projection, ctx.topic, ctx.partition, ctx.offset,
                      ctx.key, ctx.timestamp_ms, ctx.headers.source)
            """))
        var event = message("{}", partition: 3, offset: 42)
        event.key = Array("t1:AAPL".utf8)
        event.timestampMs = 1_764_800_060_000
        event.headers = [("source", Array("replay".utf8))]
        let effects = try XCTUnwrap(instance.handle(event, store: InMemoryStateStore(), nowMs: 0).effects)
        let expected = ["SET", "meta", "demo", "t", "3", "42", "t1:AAPL", "1764800060000", "replay"]
        XCTAssertEqual(effects, [.redis(arguments: expected.map { Array($0.utf8) })])
    }

    func testRedisArgumentsKeepIntegersExact() throws {
        let effects = try XCTUnwrap(try runHandler(
            "ctx.redis('set', 'k', event.id, event.px, 2.0)",
            payload: #"{"id": 9007199254740993, "px": 0.1}"#).effects)
        XCTAssertEqual(effects, [.redis(arguments: ["SET", "k", "9007199254740993", "0.1", "2.0"].map { Array($0.utf8) })])
    }

    func testRedisReadCommandsAreRejectedInHandlers() throws {
        let failure = try XCTUnwrap(try runHandler("ctx.redis('GET', 'k')").failure)
        XCTAssertTrue(failure.message.contains("GET is not a write command allowed here"), failure.message)
        let badArgument = try XCTUnwrap(try runHandler("ctx.redis('SET', 'k', {})").failure)
        XCTAssertTrue(badArgument.message.contains("argument 2 of SET must be a string or a finite number, got table"),
                      badArgument.message)
    }

    func testRedisWriteOfWrongArityFails() throws {
        let tooFew = try XCTUnwrap(try runHandler("ctx.redis('hset', 'k', 'field')").failure)
        XCTAssertTrue(tooFew.message.contains("HSET takes at least 3 arguments after the command name, got 2"),
                      tooFew.message)
        let tooMany = try XCTUnwrap(try runHandler("ctx.redis('INCR', 'k', 1)").failure)
        XCTAssertTrue(tooMany.message.contains("INCR takes 1 argument after the command name, got 2"),
                      tooMany.message)
        let oddPairs = try XCTUnwrap(try runHandler("ctx.redis('HSET', 'k', 'f', 'v', 'f2')").failure)
        XCTAssertTrue(oddPairs.message.contains("HSET takes field/value pairs after the key, got 3 arguments there"),
                      oddPairs.message)
        let oddKeys = try XCTUnwrap(try runHandler("ctx.redis('MSET', 'k', 'v', 'k2')").failure)
        XCTAssertTrue(oddKeys.message.contains("MSET takes key/value pairs, got 3 arguments there"), oddKeys.message)
        let tooManyForPop = try XCTUnwrap(try runHandler("ctx.redis('LPOP', 'k', 1, 'x')").failure)
        XCTAssertTrue(tooManyForPop.message.contains("LPOP takes at most 2 arguments after the command name, got 3"),
                      tooManyForPop.message)
        XCTAssertNotNil(try runHandler("ctx.redis('DEL', 'a', 'b', 'c')").effects)
        XCTAssertNotNil(try runHandler("ctx.redis('HSET', 'k', 'f', 'v', 'f2', 'v2')").effects)
        XCTAssertNotNil(try runHandler("ctx.redis('LPOP', 'k', 2)").effects)
    }

    func testRedisScriptUsesDeclaredSha() throws {
        let source = "return redis.call('SET', KEYS[1], ARGV[1])"
        let instance = try makeInstance("""
            return {
              topics = { "t" },
              scripts = { set_value = [[\(source)]] },
              on_event = function(event, ctx) ctx.redis_script("set_value", { "k" }, { 1 }) end,
            }
            """)
        let effects = instance.handle(message("{}"), store: InMemoryStateStore(), nowMs: 0).effects
        // SHA-1 of the script source, as `redis-cli SCRIPT LOAD` returns it.
        let sha = Digest.sha1Hex(Array(source.utf8))
        XCTAssertEqual(sha.count, 40)
        XCTAssertEqual(effects, [.redisScript(name: "set_value", sha1: sha, keys: [Array("k".utf8)], arguments: [Array("1".utf8)])])
        XCTAssertEqual(Digest.sha1Hex(Array("abc".utf8)), "a9993e364706816aba3e25717850c26c9cd0d89d")

        let undeclared = try XCTUnwrap(try runHandler("ctx.redis_script('nope', {}, {})").failure)
        XCTAssertTrue(undeclared.message.contains("no script 'nope'"), undeclared.message)
    }

    func testInsertEncodesRowAsJSONObject() throws {
        let effects = try XCTUnwrap(try runHandler(
            "ctx.insert('bars', { ts = event.ts, px = 2.0, tags = json.array() })",
            payload: #"{"ts": 1764800060000}"#).effects)
        XCTAssertEqual(effects, [.insert(table: "bars", row: Array(#"{"px":2.0,"tags":[],"ts":1764800060000}"#.utf8))])
        XCTAssertNotNil(try runHandler("ctx.insert('bad table', {})").failure)
        XCTAssertNotNil(try runHandler("ctx.insert('t', { 1, 2 })").failure)
    }

    func testStateReadsOwnWritesAndPersistsAcrossEvents() throws {
        let instance = try makeInstance(handlerProjection("""
            local n = ctx.state.get("n") or 0
            ctx.state.put("n", n + 1)
            assert(ctx.state.get("n") == n + 1, "reads see this call's writes")
            ctx.state.put("obj", { last = event.v, list = json.array() }, 60000)
            if event.fail then error("after writes") end
            """))
        let store = InMemoryStateStore()
        let scope = StateScope(projection: "demo", topic: "t", partition: 0)
        _ = instance.handle(message(#"{"v": 1}"#), store: store, nowMs: 0)
        _ = instance.handle(message(#"{"v": 2}"#), store: store, nowMs: 0)
        XCTAssertEqual(store.value(scope: scope, key: Array("n".utf8), nowMs: 0).map(text), "2")

        // A failing handler's writes are discarded.
        XCTAssertNotNil(instance.handle(message(#"{"v": 3, "fail": true}"#), store: store, nowMs: 0).failure)
        XCTAssertEqual(store.value(scope: scope, key: Array("n".utf8), nowMs: 0).map(text), "2")
        XCTAssertEqual(store.value(scope: scope, key: Array("obj".utf8), nowMs: 0).map(text), #"{"last":2,"list":[]}"#)

        // The TTL counts from when the change was applied.
        XCTAssertNil(store.value(scope: scope, key: Array("obj".utf8), nowMs: 60_000))
    }

    func testStateIsScopedByPartition() throws {
        let instance = try makeInstance(handlerProjection("""
            local seen = ctx.state.get("seen")
            ctx.redis("SET", "seen", seen and "yes" or "no")
            ctx.state.put("seen", true)
            """))
        let store = InMemoryStateStore()
        let first = instance.handle(message("{}", partition: 0), store: store, nowMs: 0).effects
        let otherPartition = instance.handle(message("{}", partition: 1), store: store, nowMs: 0).effects
        let again = instance.handle(message("{}", partition: 0), store: store, nowMs: 0).effects
        XCTAssertEqual(first?.first, .redis(arguments: ["SET", "seen", "no"].map { Array($0.utf8) }))
        XCTAssertEqual(otherPartition?.first, .redis(arguments: ["SET", "seen", "no"].map { Array($0.utf8) }))
        XCTAssertEqual(again?.first, .redis(arguments: ["SET", "seen", "yes"].map { Array($0.utf8) }))
    }

    func testLogAndCountEffects() throws {
        let effects = try XCTUnwrap(try runHandler("""
            ctx.log("warn", "late bar", { instrument = "AAPL", lag_ms = 5 })
            ctx.count("late_minutes")
            ctx.count("volume_total", 2.5, { tenant = "t1" })
            """).effects)
        XCTAssertEqual(effects, [
            .log(level: .warn, message: "late bar", fields: Array(#"{"instrument":"AAPL","lag_ms":5}"#.utf8)),
            .count(name: "late_minutes", by: 1, labels: []),
            .count(name: "volume_total", by: 2.5, labels: Array(#"{"tenant":"t1"}"#.utf8)),
        ])
        XCTAssertNotNil(try runHandler("ctx.count('Bad-Name')").failure)
        XCTAssertNotNil(try runHandler("ctx.log('loud', 'x')").failure)
    }

    func testMalformedPayloadFailsInDecodePhase() throws {
        let failure = try XCTUnwrap(try runHandler("", payload: #"{"a": 1,}"#).failure)
        XCTAssertEqual(failure.phase, .decode)
        XCTAssertTrue(failure.message.hasPrefix("invalid event payload: invalid JSON at byte"), failure.message)
    }

    func testInitQueuesClickHouseStatements() throws {
        let instance = try makeInstance("""
            return {
              topics = { "t" },
              on_event = function() end,
              init = function(ctx)
                ctx.clickhouse("CREATE TABLE IF NOT EXISTS x (a Int64) ENGINE = Memory")
                ctx.log("info", "ready")
              end,
            }
            """)
        XCTAssertEqual(try instance.runInit(nowMs: 0), [
            .clickhouseStatement(sql: "CREATE TABLE IF NOT EXISTS x (a Int64) ENGINE = Memory"),
            .log(level: .info, message: "ready", fields: []),
        ])
    }

    func testQueryResultsMapToOutcomes() throws {
        let instance = try makeInstance("""
            return {
              topics = { "t" },
              on_event = function() end,
              queries = {
                default = function(params, ctx)
                  if params.id == nil then return nil, "missing parameter id" end
                  if params.id == "none" then return nil end
                  local reply = ctx.redis("HGET", "k", params.id)
                  return { id = params.id, value = reply, quoted = ctx.clickhouse_quote("it's") }
                end,
              },
            }
            """)
        let backend = FakeBackend()
        XCTAssertEqual(instance.query("default", parameters: [:], backend: backend, nowMs: 0),
                       .badRequest("missing parameter id"))
        XCTAssertEqual(instance.query("default", parameters: ["id": "none"], backend: backend, nowMs: 0), .notFound)
        XCTAssertEqual(instance.query("default", parameters: ["id": "a"], backend: backend, nowMs: 0),
                       .found(Array(#"{"id":"a","quoted":"'it\\'s'","value":"HGET k a"}"#.utf8)))
        XCTAssertEqual(backend.commands, [["HGET", "k", "a"]])
        XCTAssertEqual(instance.query("nope", parameters: [:], backend: backend, nowMs: 0),
                       .unknownQuery(available: ["default"]))
    }

    func testQueryCannotWrite() throws {
        let instance = try makeInstance("""
            return { topics = { "t" }, on_event = function() end,
                     queries = { default = function(params, ctx) ctx.redis("SET", "k", "v") end } }
            """)
        guard case .failed(let failure) = instance.query("default", parameters: [:], backend: FakeBackend(), nowMs: 0) else {
            return XCTFail("expected a failure")
        }
        XCTAssertTrue(failure.message.contains("SET is not a read command allowed here"), failure.message)
    }
}

/// Answers every Redis read with its own arguments joined, and records them.
final class FakeBackend: QueryBackend {
    var commands: [[String]] = []

    func redis(_ arguments: [[UInt8]]) -> QueryReply {
        let words = arguments.map(text)
        commands.append(words)
        return .bytes(Array(words.joined(separator: " ").utf8))
    }

    func clickhouse(_ sql: String) -> QueryReply {
        .json(Array(#"[{"sql":1}]"#.utf8))
    }
}
