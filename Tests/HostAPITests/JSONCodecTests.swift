import CLua
import CLuaJSON
import Foundation
import XCTest

/// Tests of the C JSON codec (Sources/CLuaJSON) through its C interface, on a plain Lua state
/// that also has the `json` library as a global for checks written in Lua.
final class JSONCodecTests: XCTestCase {
    private var L: OpaquePointer!

    override func setUp() {
        super.setUp()
        L = luaL_newstate()
        luaL_openlibs(L)
        luaL_requiref(L, "json", cljson_open, 1)
        lua_settop(L, 0)
    }

    override func tearDown() {
        lua_close(L)
        L = nil
        super.tearDown()
    }

    // MARK: Helpers

    /// Decodes `bytes` with cljson_decode. On success the value is left at the top of the stack
    /// and the result is nil. On failure the result is the error message, and the stack must be
    /// as it was.
    private func decode(_ bytes: [UInt8], maxDepth: Int = 0, maxBytes: Int = 0,
                        file: StaticString = #filePath, line: UInt = #line) -> String? {
        let top = lua_gettop(L)
        var limits = cljson_limits(max_depth: maxDepth, max_bytes: maxBytes)
        var error = [CChar](repeating: 0, count: 256)
        let ok = bytes.withUnsafeBytes { raw in
            cljson_decode(L, raw.baseAddress?.assumingMemoryBound(to: CChar.self), raw.count,
                          &limits, &error, error.count)
        }
        if ok == 1 {
            XCTAssertEqual(lua_gettop(L), top + 1, "a decode pushes one value", file: file, line: line)
            return nil
        }
        XCTAssertEqual(lua_gettop(L), top, "a failed decode leaves the stack as it was",
                       file: file, line: line)
        return message(error)
    }

    private func decode(_ text: String, maxDepth: Int = 0, maxBytes: Int = 0,
                        file: StaticString = #filePath, line: UInt = #line) -> String? {
        decode(Array(text.utf8), maxDepth: maxDepth, maxBytes: maxBytes, file: file, line: line)
    }

    /// Decodes `text` into the Lua global `v`, failing the test if the decode fails.
    private func decodeGlobal(_ text: String, file: StaticString = #filePath, line: UInt = #line) {
        if let error = decode(text, file: file, line: line) {
            XCTFail("decode of \(text) failed: \(error)", file: file, line: line)
            lua_pushnil(L)
        }
        lua_setglobal(L, "v")
    }

    /// Runs `source` as a Lua chunk and returns the error it raised, or nil.
    private func runLua(_ source: String) -> String? {
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        let loaded = source.withCString { clua_loadbuffer_text(L, $0, strlen($0), "=test") }
        if loaded != LUA_OK || clua_pcall(L, 0, 0, 0) != LUA_OK {
            return clua_tostring(L, -1).map { String(cString: $0) } ?? "error without message"
        }
        return nil
    }

    /// Encodes the value at the top of the stack, pops it, and returns the text or the error.
    private func encodeTop(flags: Int32, maxDepth: Int) -> (text: String?, error: String?) {
        var buffer = cljson_buffer()
        defer { cljson_buffer_free(&buffer) }
        var error = [CChar](repeating: 0, count: 512)
        let top = lua_gettop(L)
        let ok = cljson_encode(L, -1, &buffer, flags, maxDepth, &error, error.count)
        XCTAssertEqual(lua_gettop(L), top, "encode leaves the stack as it was")
        clua_pop(L, 1)
        if ok == 1 {
            let bytes = UnsafeRawBufferPointer(start: buffer.data, count: buffer.length)
            return (String(decoding: bytes, as: UTF8.self), nil)
        }
        XCTAssertEqual(buffer.length, 0, "a failed encode appends nothing")
        return (nil, message(error))
    }

    /// Evaluates the Lua expression and encodes its value, by default with sorted keys.
    private func encode(_ expression: String, flags: Int32 = Int32(CLJSON_SORT_KEYS),
                        maxDepth: Int = 0) -> (text: String?, error: String?) {
        let source = "return " + expression
        let loaded = source.withCString { clua_loadbuffer_text(L, $0, strlen($0), "=expression") }
        guard loaded == LUA_OK, clua_pcall(L, 0, 1, 0) == LUA_OK else {
            let message = clua_tostring(L, -1).map { String(cString: $0) } ?? "?"
            clua_pop(L, 1)
            return (nil, "Lua error: " + message)
        }
        return encodeTop(flags: flags, maxDepth: maxDepth)
    }

    private func encodedText(_ expression: String, file: StaticString = #filePath,
                             line: UInt = #line) -> String? {
        let outcome = encode(expression)
        if let error = outcome.error {
            XCTFail("encode of \(expression) failed: \(error)", file: file, line: line)
        }
        return outcome.text
    }

    /// Decodes and re-encodes `text` with sorted keys.
    private func roundTrip(_ text: String, file: StaticString = #filePath, line: UInt = #line) -> String? {
        if let error = decode(text, file: file, line: line) {
            XCTFail("decode of \(text) failed: \(error)", file: file, line: line)
            return nil
        }
        return encodeTop(flags: Int32(CLJSON_SORT_KEYS), maxDepth: 0).text
    }

    /// Returns the NUL-terminated message that the codec wrote into `error`.
    private func message(_ error: [CChar]) -> String {
        String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Formats with glibc's %.<precision>g, the reference for the float format.
    private func formatG(_ value: Double, precision: Int) -> String {
        var text = [CChar](repeating: 0, count: 64)
        _ = withVaList([value]) { vsnprintf(&text, text.count, "%.\(precision)g", $0) }
        return message(text)
    }

    // MARK: Decoding values

    func testObjectDecodesToPlainTable() {
        decodeGlobal(#"{"a": 1, "b c": "x", "": true}"#)
        XCTAssertNil(runLua("""
            assert(type(v) == 'table')
            assert(v.a == 1 and v['b c'] == 'x' and v[''] == true)
            assert(getmetatable(v) == nil, 'objects have no metatable')
            assert(not json.is_array(v))
            """))
    }

    func testArraysShareOneTaggedMetatable() {
        XCTAssertNil(decode("[1, 2, 3]"))
        XCTAssertNil(decode(#"{"inner": []}"#))
        lua_getfield(L, -1, "inner")
        XCTAssertEqual(lua_getmetatable(L, 1), 1, "a decoded array has a metatable")
        XCTAssertEqual(lua_getmetatable(L, 3), 1, "a nested decoded array has a metatable")
        XCTAssertEqual(lua_rawequal(L, -1, -2), 1, "all arrays share one metatable")
        lua_settop(L, 1)
        lua_setglobal(L, "v")
        XCTAssertNil(runLua("""
            assert(#v == 3 and v[1] == 1 and v[3] == 3)
            assert(json.is_array(v))
            assert(getmetatable(v) == 'json.array', 'the metatable is protected')
            assert(not pcall(setmetatable, v, {}), 'the shared metatable cannot be replaced')
            """))
    }

    func testEmptyArrayAndObjectRoundTrip() {
        XCTAssertEqual(roundTrip("[]"), "[]")
        XCTAssertEqual(roundTrip("{}"), "{}")
        XCTAssertEqual(roundTrip(#"{"a":[],"b":{},"c":[[],{}]}"#), #"{"a":[],"b":{},"c":[[],{}]}"#)
    }

    func testInt64BoundsDecodeExactly() {
        let cases: [(String, Int64)] = [
            ("9223372036854775807", Int64.max),
            ("-9223372036854775808", Int64.min),
            ("9007199254740993", 9_007_199_254_740_993),   // 2^53 + 1, not representable as a double
            ("-9007199254740993", -9_007_199_254_740_993),
            ("1764800060000", 1_764_800_060_000),
            ("0", 0),
            ("-0", 0),
        ]
        for (text, expected) in cases {
            XCTAssertNil(decode(text), text)
            XCTAssertEqual(lua_isinteger(L, -1), 1, "\(text) is a Lua integer")
            XCTAssertEqual(clua_tointegerx(L, -1, nil), expected, text)
            clua_pop(L, 1)
        }
        XCTAssertEqual(roundTrip("[9223372036854775807,-9223372036854775808,9007199254740993]"),
                       "[9223372036854775807,-9223372036854775808,9007199254740993]")
        XCTAssertEqual(roundTrip(#"{"end_ms":1764800060000}"#), #"{"end_ms":1764800060000}"#)
    }

    func testIntegersBeyondInt64DecodeAsFloats() {
        let cases: [(String, Double)] = [
            ("9223372036854775808", 9_223_372_036_854_775_808.0),
            ("-9223372036854775809", -9_223_372_036_854_775_809.0),
            ("18446744073709551616", 18_446_744_073_709_551_616.0),
            ("123456789012345678901234567890", 1.2345678901234568e29),
        ]
        for (text, expected) in cases {
            XCTAssertNil(decode(text), text)
            XCTAssertEqual(lua_isinteger(L, -1), 0, "\(text) is a float")
            XCTAssertEqual(clua_tonumberx(L, -1, nil), expected, text)
            clua_pop(L, 1)
        }
    }

    func testFractionOrExponentDecodesAsFloat() {
        let cases: [(String, Double)] = [
            ("1.0", 1.0), ("2.5e3", 2500.0), ("1E2", 100.0), ("1e-2", 0.01), ("-0.0", -0.0),
            ("101.25", 101.25), ("0.1", 0.1), ("1e-400", 0.0), ("4.9406564584124654e-324", Double.leastNonzeroMagnitude),
        ]
        for (text, expected) in cases {
            XCTAssertNil(decode(text), text)
            XCTAssertEqual(lua_isinteger(L, -1), 0, "\(text) is a float")
            let value = clua_tonumberx(L, -1, nil)
            XCTAssertEqual(value, expected, text)
            XCTAssertEqual(value.sign, expected.sign, "sign of \(text)")
            clua_pop(L, 1)
        }
        XCTAssertEqual(roundTrip("[1.0,2.5e3,-0.0]"), "[1.0,2500.0,-0.0]")
    }

    func testFloatDecodingIsCorrectlyRounded() {
        var random = SplitMix64(seed: 42)
        var texts: [String] = ["0.30000000000000004", "9007199254740993.0", "2.2250738585072011e-308",
                               "1.7976931348623157e308", "123456789012345678.5", "0.000001"]
        for _ in 0..<3000 {
            let digits = String(random.next() % 10_000_000_000_000_000_000)
            let fraction = String(random.next() % 1_000_000)
            let exponent = Int(random.next() % 580) - 300   // keeps every value finite
            texts.append("\(digits).\(fraction)e\(exponent)")
            texts.append("\(random.next() % 100_000).\(random.next() % 10_000)")
            texts.append("-\(random.next() % 1_000_000_000_000_000)e-\(random.next() % 25)")
        }
        for text in texts {
            if let error = decode(text) {
                XCTFail(error)
                continue
            }
            XCTAssertEqual(clua_tonumberx(L, -1, nil), Double(text)!, text)
            clua_pop(L, 1)
        }
    }

    func testNullIsDistinctSentinel() {
        decodeGlobal("[1, null, 3]")
        XCTAssertNil(runLua("""
            assert(#v == 3, 'nulls keep the array length')
            assert(v[2] == json.null and v[2] ~= nil)
            assert(type(json.null) == 'userdata')
            """))
        XCTAssertNil(decode("null"))
        cljson_push_null(L)
        XCTAssertEqual(lua_type(L, -2), LUA_TLIGHTUSERDATA)
        XCTAssertEqual(lua_rawequal(L, -1, -2), 1, "cljson_push_null pushes the decoded null")
        lua_settop(L, 0)
        XCTAssertEqual(roundTrip("[null,1,null]"), "[null,1,null]")
        XCTAssertEqual(roundTrip(#"{"a":null}"#), #"{"a":null}"#)
    }

    func testBooleansDecode() {
        decodeGlobal("[true, false]")
        XCTAssertNil(runLua("assert(v[1] == true and v[2] == false)"))
    }

    func testNestedDocumentRoundTrips() {
        let text = #"{"a":{"b":[1,2.5,"x",{"c":[true,false,null]}],"d":{}},"e":[[[]]],"f":-7}"#
        XCTAssertEqual(roundTrip(text), text)
        let withWhitespace = " {\n\t\"f\" : -7 ,\r\n \"e\" : [ [ [ ] ] ] } "
        XCTAssertEqual(roundTrip(withWhitespace), #"{"e":[[[]]],"f":-7}"#)
    }

    func testLargeContainersDecodeCompletely() {
        let elements = (1...1000).map(String.init).joined(separator: ",")
        let members = (1...100).map { "\"k\($0)\":\($0)" }.joined(separator: ",")
        decodeGlobal("[\(elements)]")
        XCTAssertNil(runLua("""
            assert(#v == 1000 and json.is_array(v))
            for i = 1, 1000 do assert(v[i] == i, i) end
            """))
        decodeGlobal("{\(members)}")
        XCTAssertNil(runLua("""
            local count = 0
            for k, value in pairs(v) do count = count + 1; assert(k == 'k' .. value) end
            assert(count == 100)
            """))
    }

    func testDuplicateKeysKeepLastValue() {
        decodeGlobal(#"{"a":1,"b":2,"a":3}"#)
        XCTAssertNil(runLua("assert(v.a == 3 and v.b == 2)"))
        // Past 32 members the table is filled while parsing, so check a repeat across that point.
        let members = (1...40).map { "\"k\($0)\":\($0)" }.joined(separator: ",")
        decodeGlobal("{\(members),\"k5\":\"last\",\"k39\":\"later\"}")
        XCTAssertNil(runLua("assert(v.k5 == 'last' and v.k39 == 'later' and v.k40 == 40)"))
    }

    // MARK: Decoding strings

    func testStringEscapesDecode() {
        decodeGlobal(#"["a\"b\\c\/d", "\b\f\n\r\t", "\u00e9\u20AC", "\ud83d\ude00", "x\u0000y"]"#)
        XCTAssertNil(runLua("""
            assert(v[1] == 'a"b\\\\c/d')
            assert(v[2] == '\\b\\f\\n\\r\\t')
            assert(v[3] == '\\xC3\\xA9\\xE2\\x82\\xAC')
            assert(v[4] == '\\xF0\\x9F\\x98\\x80', 'a surrogate pair is one code point')
            assert(v[5] == 'x\\0y' and #v[5] == 3)
            """))
    }

    func testRawUTF8Decodes() {
        decodeGlobal("[\"é€😀\u{7F}\"]")
        XCTAssertNil(runLua("assert(v[1] == '\\xC3\\xA9\\xE2\\x82\\xAC\\xF0\\x9F\\x98\\x80\\x7F')"))
    }

    func testInvalidUTF8IsRejected() {
        let cases: [(String, [UInt8])] = [
            ("overlong two-byte", [0xC0, 0xAF]),
            ("overlong two-byte C1", [0xC1, 0xBF]),
            ("overlong three-byte", [0xE0, 0x80, 0xAF]),
            ("overlong four-byte", [0xF0, 0x80, 0x80, 0xAF]),
            ("encoded surrogate", [0xED, 0xA0, 0x80]),
            ("above U+10FFFF", [0xF4, 0x90, 0x80, 0x80]),
            ("lead byte F5", [0xF5, 0x80, 0x80, 0x80]),
            ("byte FF", [0xFF]),
            ("stray continuation", [0x80]),
            ("truncated three-byte", [0xE2, 0x82]),
            ("truncated four-byte", [0xF0, 0x9F, 0x98]),
            ("bad continuation", [0xC3, 0x28]),
        ]
        for (name, sequence) in cases {
            let input = Array("[\"ab".utf8) + sequence + Array("\"]".utf8)
            XCTAssertEqual(decode(input), "invalid JSON at byte 4: invalid UTF-8 sequence in string", name)
        }
        let truncatedAtEnd = Array("\"ab".utf8) + [0xE2, 0x82]
        XCTAssertEqual(decode(truncatedAtEnd), "invalid JSON at byte 3: invalid UTF-8 sequence in string")
        XCTAssertEqual(decode(Array("{\"k".utf8) + [0xFF] + Array("\":1}".utf8)),
                       "invalid JSON at byte 3: invalid UTF-8 sequence in string", "in a key")
    }

    func testUnpairedSurrogatesAreRejected() {
        XCTAssertEqual(decode(#""\ud83d""#), "invalid JSON at byte 1: unpaired surrogate \\uD83D: "
                       + "a low surrogate \\uDC00..\\uDFFF must follow it")
        XCTAssertEqual(decode(#""\ude00""#), "invalid JSON at byte 1: unpaired surrogate \\uDE00: "
                       + "a low surrogate must follow a high one")
        for text in [#""\ud83dx""#, #""\ud83d\u0041""#, #""\ud83d\ud83d""#, #""a\ud800\n""#] {
            XCTAssertTrue(decode(text)?.contains("unpaired surrogate") ?? false, text)
        }
    }

    func testRawControlCharactersAreRejected() {
        XCTAssertEqual(decode("[\"a\nb\"]"),
                       "invalid JSON at byte 3: control character 0x0A in string must be escaped")
        for byte: UInt8 in [0x00, 0x09, 0x1F] {
            let input = Array("\"a".utf8) + [byte] + Array("\"".utf8)
            XCTAssertEqual(decode(input), String(format: "invalid JSON at byte 2: control character "
                                                 + "0x%02X in string must be escaped", byte))
        }
        XCTAssertNotNil(decode("\"a\\nb\tc\""), "after an escape too")
    }

    func testMalformedStringsAreRejected() {
        XCTAssertEqual(decode(#""abc"#), "invalid JSON at byte 0: string is not terminated")
        XCTAssertEqual(decode(#""ab\"#), "invalid JSON at byte 3: string is not terminated")
        XCTAssertEqual(decode(#""a\x""#),
                       "invalid JSON at byte 2: invalid escape sequence: backslash followed by character 'x'")
        XCTAssertEqual(decode(#""\u12""#), "invalid JSON at byte 1: invalid \\u escape: expected 4 hex digits")
        XCTAssertEqual(decode(#""\u12G4""#), "invalid JSON at byte 1: invalid \\u escape: expected 4 hex digits")
    }

    // MARK: Decoding errors

    func testInvalidNumbersAreRejected() {
        let cases: [(String, String)] = [
            ("01", "invalid JSON at byte 0: invalid number: leading zeros are not allowed"),
            ("-01", "invalid JSON at byte 0: invalid number: leading zeros are not allowed"),
            ("1.", "invalid JSON at byte 0: invalid number: expected a digit after '.'"),
            ("1.e5", "invalid JSON at byte 0: invalid number: expected a digit after '.'"),
            (".5", "invalid JSON at byte 0: unexpected character '.', expected a value"),
            ("-", "invalid JSON at byte 0: invalid number: expected a digit after '-'"),
            ("--1", "invalid JSON at byte 0: invalid number: expected a digit after '-'"),
            ("+1", "invalid JSON at byte 0: unexpected character '+', expected a value"),
            ("NaN", "invalid JSON at byte 0: unexpected character 'N', expected a value"),
            ("-Infinity", "invalid JSON at byte 0: invalid number: expected a digit after '-'"),
            ("Infinity", "invalid JSON at byte 0: unexpected character 'I', expected a value"),
            ("1e", "invalid JSON at byte 0: invalid number: expected a digit in the exponent"),
            ("1e+", "invalid JSON at byte 0: invalid number: expected a digit in the exponent"),
            ("[1, 2e-]", "invalid JSON at byte 4: invalid number: expected a digit in the exponent"),
            ("0x10", "invalid JSON at byte 1: unexpected character 'x' after the JSON value"),
            ("1e400", "invalid JSON at byte 0: number 1e400 is out of range for a 64-bit float"),
        ]
        for (text, message) in cases {
            XCTAssertEqual(decode(text), message, text)
        }
    }

    func testTrailingBytesAreRejected() {
        XCTAssertEqual(decode("[1] x"), "invalid JSON at byte 4: unexpected character 'x' after the JSON value")
        XCTAssertEqual(decode("1 2"), "invalid JSON at byte 2: unexpected character '2' after the JSON value")
        XCTAssertEqual(decode("{}}"), "invalid JSON at byte 2: unexpected character '}' after the JSON value")
        XCTAssertEqual(decode("nullx"), "invalid JSON at byte 4: unexpected character 'x' after the JSON value")
        XCTAssertEqual(decode(Array("{} ".utf8) + [0]),
                       "invalid JSON at byte 3: unexpected byte 0x00 after the JSON value")
        XCTAssertNil(decode(" [1] \n\t\r "), "trailing whitespace is allowed")
    }

    func testSyntaxErrorsNameWhatAndWhere() {
        let cases: [(String, String)] = [
            (#"{"a":1 "b":2}"#, "invalid JSON at byte 7: expected ',' or '}' after object member, found character '\"'"),
            ("[1 2]", "invalid JSON at byte 3: expected ',' or ']' after array element, found character '2'"),
            ("[1,]", "invalid JSON at byte 3: unexpected character ']', expected a value"),
            (#"{"a":1,}"#, "invalid JSON at byte 7: expected '\"' to start an object key, found character '}'"),
            ("{1:2}", "invalid JSON at byte 1: expected '\"' to start an object key, found character '1'"),
            (#"{"a" 1}"#, "invalid JSON at byte 5: expected ':' after object key, found character '1'"),
            (#"{"a":"#, "invalid JSON at byte 5: unexpected end of input, expected a value"),
            ("[1,", "invalid JSON at byte 3: unexpected end of input, expected a value"),
            ("[1", "invalid JSON at byte 2: expected ',' or ']' after array element, found end of input"),
            ("", "invalid JSON at byte 0: unexpected end of input, expected a value"),
            ("  ", "invalid JSON at byte 2: unexpected end of input, expected a value"),
            ("tru", "invalid JSON at byte 0: invalid literal, expected 'true'"),
            ("[nul]", "invalid JSON at byte 1: invalid literal, expected 'null'"),
            ("falsy", "invalid JSON at byte 0: invalid literal, expected 'false'"),
            ("'a'", "invalid JSON at byte 0: unexpected character ''', expected a value"),
        ]
        for (text, message) in cases {
            XCTAssertEqual(decode(text), message, text)
        }
        XCTAssertEqual(decode([0xEF, 0xBB, 0xBF] + Array("{}".utf8)),
                       "invalid JSON at byte 0: unexpected byte 0xEF, expected a value", "a byte order mark")
    }

    func testDepthLimitIsEnforced() {
        func nested(_ depth: Int) -> String {
            String(repeating: "[", count: depth) + String(repeating: "]", count: depth)
        }
        XCTAssertNil(decode(nested(64)), "64 levels fit the default limit")
        clua_pop(L, 1)
        XCTAssertEqual(decode(nested(65)),
                       "invalid JSON at byte 64: nesting is deeper than the limit of 64 levels")
        XCTAssertEqual(decode(#"{"a":{"b":[1]}}"#, maxDepth: 2),
                       "invalid JSON at byte 10: nesting is deeper than the limit of 2 levels")
        XCTAssertNil(decode(#"{"a":{"b":1}}"#, maxDepth: 2))
        clua_pop(L, 1)

        // Beyond 64 open containers the decoder keeps their records in a userdata.
        XCTAssertNil(decode(nested(5000), maxDepth: 10000))
        let outcome = encodeTop(flags: 0, maxDepth: 10000)
        XCTAssertEqual(outcome.text, nested(5000))
    }

    func testSizeLimitIsCheckedBeforeParsing() {
        XCTAssertEqual(decode("[1,2,3,4,5]", maxBytes: 10),
                       "JSON input of 11 bytes is larger than the limit of 10 bytes")
        XCTAssertEqual(decode("not json at all", maxBytes: 4),
                       "JSON input of 15 bytes is larger than the limit of 4 bytes")
        XCTAssertNil(decode("[1,2,3,4]", maxBytes: 9), "input of exactly the limit is accepted")
    }

    func testMemoryCapFailureBecomesError() {
        let limits = UnsafeMutablePointer<clua_limits>.allocate(capacity: 1)
        limits.initialize(to: clua_limits())
        defer { limits.deallocate() }
        guard let capped = clua_newstate(limits) else {
            return XCTFail("clua_newstate failed")
        }
        defer { lua_close(capped) }
        limits.pointee.memory_limit = limits.pointee.memory_used + 64 * 1024
        limits.pointee.enforce_memory_limit = 1

        let big = "[" + Array(repeating: "\"abcdefghijklmnop\"", count: 20000).joined(separator: ",") + "]"
        var error = [CChar](repeating: 0, count: 256)
        let top = lua_gettop(capped)
        let ok = big.withCString { cljson_decode(capped, $0, strlen($0), nil, &error, error.count) }
        XCTAssertEqual(ok, 0)
        XCTAssertEqual(message(error), "JSON decode failed: not enough memory")
        XCTAssertEqual(lua_gettop(capped), top, "the stack is as it was")
        XCTAssertEqual(limits.pointee.memory_exceeded, 1)

        limits.pointee.memory_limit = 0
        let small = "[1,2]"
        XCTAssertEqual(small.withCString { cljson_decode(capped, $0, strlen($0), nil, &error, error.count) }, 1,
                       "the state still works after the failure")
    }

    func testLuaDecodeRaisesErrors() {
        XCTAssertNil(runLua("""
            local ok, message = pcall(json.decode, '[1,')
            assert(not ok)
            assert(message == 'invalid JSON at byte 3: unexpected end of input, expected a value', message)
            local deep = string.rep('[', 65) .. string.rep(']', 65)
            ok, message = pcall(json.decode, deep)
            assert(not ok and message:find('limit of 64 levels', 1, true), message)
            assert(not pcall(json.decode, 5), 'only strings are decoded')
            assert(json.decode('{"a":[1,2]}').a[2] == 2)
            """))
    }

    // MARK: Encoding values

    func testScalarsEncode() {
        XCTAssertEqual(encodedText("nil"), "null")
        XCTAssertEqual(encodedText("json.null"), "null")
        XCTAssertEqual(encodedText("true"), "true")
        XCTAssertEqual(encodedText("false"), "false")
        XCTAssertEqual(encodedText("0"), "0")
        XCTAssertEqual(encodedText("-42"), "-42")
        XCTAssertEqual(encodedText("math.maxinteger"), "9223372036854775807")
        XCTAssertEqual(encodedText("math.mininteger"), "-9223372036854775808")
        XCTAssertEqual(encodedText("'text'"), #""text""#)
    }

    func testFloatsEncodeShortestRoundTripForm() {
        let cases: [(String, String)] = [
            ("0.1", "0.1"), ("1/3", "0.3333333333333333"), ("0.1 + 0.2", "0.30000000000000004"),
            ("2.0", "2.0"), ("-2.0", "-2.0"), ("1e300", "1e+300"), ("-0.0", "-0.0"), ("0.0", "0.0"),
            ("2^53", "9007199254740992.0"), ("1e15", "1e+15"), ("1e14", "100000000000000.0"),
            ("1e-5", "1e-05"), ("0.0001", "0.0001"), ("123456.789", "123456.789"), ("101.25", "101.25"),
            ("5e-324", "4.94065645841247e-324"), ("1.7976931348623157e308", "1.7976931348623157e+308"),
        ]
        for (expression, expected) in cases {
            XCTAssertEqual(encodedText(expression), expected, expression)
        }
    }

    func testFloatFormatMatchesPrintfProcedure() {
        var random = SplitMix64(seed: 7)
        var values: [Double] = []
        for _ in 0..<5000 {
            let bits = Double(bitPattern: random.next())
            if bits.isFinite {
                values.append(bits)
            }
            values.append(Double(Int64(random.next() % 10_000_000_000)) / pow(10, Double(random.next() % 12)))
            values.append(Double(random.next() % 1_000_000) * pow(10, Double(Int(random.next() % 40) - 20)))
        }
        for value in values {
            var expected = formatG(value, precision: 15)
            if Double(expected) != value {
                expected = formatG(value, precision: 16)
                if Double(expected) != value {
                    expected = formatG(value, precision: 17)
                }
            }
            if !expected.contains(".") && !expected.contains("e") {
                expected += ".0"
            }
            lua_pushnumber(L, value)
            let text = encodeTop(flags: 0, maxDepth: 0).text
            XCTAssertEqual(text, expected, "\(value)")
            XCTAssertEqual(text.flatMap(Double.init), value, "\(value) reads back")
        }
    }

    func testNaNAndInfinityAreRejected() {
        XCTAssertEqual(encode("{ rows = { { price = 1 }, { price = 2 }, { price = 0/0 } } }").error,
                       "cannot encode number at $.rows[3].price: NaN has no JSON representation")
        XCTAssertEqual(encode("{ 1, math.huge }").error,
                       "cannot encode number at $[2]: infinity has no JSON representation")
        XCTAssertEqual(encode("-math.huge").error, "cannot encode number at $: infinity has no JSON representation")
    }

    func testStringsAreEscaped() {
        XCTAssertEqual(encodedText(#"'q"b\\s\n\t\r\b\f\1\31\127/é'"#),
                       #""q\"b\\s\n\t\r\b\f\u0001\u001F"# + "\u{7F}/é\"")
        XCTAssertEqual(encodedText(#"'x\0y'"#), #""x\u0000y""#)
        XCTAssertEqual(encodedText(#"{ ['k"\n'] = 1 }"#), #"{"k\"\n":1}"#)
    }

    func testInvalidUTF8EncodeNamesPath() {
        XCTAssertEqual(encode(#"{ name = 'ab\xff' }"#).error,
                       "cannot encode string at $.name: invalid UTF-8 at byte 2 of the string")
        XCTAssertEqual(encode(#"{ 'ok', '\xc0\xaf' }"#).error,
                       "cannot encode string at $[2]: invalid UTF-8 at byte 0 of the string")
        XCTAssertEqual(encode(#"'\xed\xa0\x80'"#).error,
                       "cannot encode string at $: invalid UTF-8 at byte 0 of the string")
        XCTAssertEqual(encode(#"{ ['k\xff'] = 1 }"#).error,
                       #"cannot encode object key at $["k\xFF"]: invalid UTF-8 at byte 1 of the key"#)
    }

    func testTablesEncodeAsArraysOrObjects() {
        XCTAssertEqual(encodedText("{ 1, 2, 3 }"), "[1,2,3]")
        XCTAssertEqual(encodedText("{ a = 1 }"), #"{"a":1}"#)
        XCTAssertEqual(encodedText("{}"), "{}")
        XCTAssertEqual(encodedText("json.array()"), "[]")
        XCTAssertEqual(encodedText("json.array({ 'x' })"), #"["x"]"#)
        XCTAssertEqual(encodedText("json.object(json.decode('[]'))"), "{}")
        XCTAssertEqual(encodedText("json.object()"), "{}")
        XCTAssertEqual(encodedText("{ [1] = 'a', [2] = 'b' }"), #"["a","b"]"#)
        XCTAssertEqual(encodedText("setmetatable({ 1 }, { __index = function() return 1 end })"), "[1]",
                       "other metatables are ignored")
    }

    func testAmbiguousTablesAreRejectedWithPath() {
        let cases: [(String, String)] = [
            ("{ 1, 2, x = 3 }",
             #"cannot encode table at $: it mixes the sequence keys 1..2 with key "x", so it is neither an array nor an object"#),
            ("{ a = { 1, nil, 3 } }",
             "cannot encode table at $.a: the sequence 1..3 has holes: only 2 of its keys are present (sparse array)"),
            ("{ [1] = 1, [5] = 5 }",
             "cannot encode table at $: key 5 is outside the sequence 1..1 (sparse array)"),
            ("{ [2] = 'x' }",
             "cannot encode table at $: key 2 is not a string, and the table has no key 1, so it is not an array either (sparse array)"),
            ("{ [1.5] = 1 }",
             "cannot encode table at $: key 1.5 is not a string, and object keys must be strings"),
            ("{ x = { [true] = 1 } }",
             "cannot encode table at $.x: key true is not a string, and object keys must be strings"),
            ("(function() local t = json.array({ 1 }); t.x = 2; return t end)()",
             #"cannot encode table at $: it is tagged as an array but has key "x" outside 1..1"#),
        ]
        for (expression, message) in cases {
            XCTAssertEqual(encode(expression).error, message, expression)
            XCTAssertEqual(encode(expression, flags: 0).error, message, "unsorted: \(expression)")
        }
    }

    func testUnsupportedValuesAreRejectedWithPath() {
        let functionMessage = "only nil, booleans, numbers, strings, tables and json.null have a JSON representation"
        XCTAssertEqual(encode("{ rows = { {}, {}, { price = print } } }").error,
                       "cannot encode function at $.rows[3].price: " + functionMessage)
        XCTAssertEqual(encode("{ ['a b'] = { coroutine.create(print) } }").error,
                       #"cannot encode thread at $["a b"][1]: "# + functionMessage)
        XCTAssertEqual(encode("{ f = io.stdout }").error, "cannot encode userdata at $.f: " + functionMessage)

        var marker = 0
        withUnsafeMutablePointer(to: &marker) { lua_pushlightuserdata(L, $0) }
        XCTAssertEqual(encodeTop(flags: 0, maxDepth: 0).error,
                       "cannot encode light userdata at $: only json.null has a JSON representation")
    }

    func testCyclesAndDepthAreRejected() {
        XCTAssertEqual(encode("(function() local t = { a = {} }; t.a.back = t; return t end)()").error,
                       "cannot encode table at $.a.back: reference cycle: the table contains itself")
        XCTAssertEqual(encode("(function() local t = {}; t[1] = t; return t end)()").error,
                       "cannot encode table at $[1]: reference cycle: the table contains itself")
        XCTAssertEqual(encode("{ a = { b = { c = {} } } }", maxDepth: 3).error,
                       "cannot encode table at $.a.b.c: nesting is deeper than the limit of 3 levels")
        XCTAssertEqual(encode("{ a = { b = { c = 1 } } }", maxDepth: 3).text, #"{"a":{"b":{"c":1}}}"#)
        let deep = String(repeating: "{", count: 65) + String(repeating: "}", count: 65)
        XCTAssertTrue(encode(deep).error?.hasSuffix("nesting is deeper than the limit of 64 levels") ?? false)
        XCTAssertEqual(encode("(function() local shared = {}; return { shared, shared } end)()").text, "[{},{}]",
                       "a table seen twice without a cycle is fine")
    }

    func testSortKeysOrdersBytewise() {
        let expression = "{ b = 1, a = 2, B = 3, ['a b'] = 4, aa = 5, [''] = 6, ['é'] = 7, z = { y = 1, x = 2 } }"
        let sorted = #"{"":6,"B":3,"a":2,"a b":4,"aa":5,"b":1,"z":{"x":2,"y":1},"é":7}"#
        XCTAssertEqual(encode(expression).text, sorted)
        let unsorted = encode(expression, flags: 0).text ?? ""
        XCTAssertEqual(unsorted.utf8.count, sorted.utf8.count, "unsorted output has the same members")
        XCTAssertEqual(unsorted.filter { $0 == " " }.count, 1, "no whitespace besides the key 'a b'")
    }

    func testEncodeAppendsAndRestoresOnFailure() {
        var buffer = cljson_buffer()
        defer { cljson_buffer_free(&buffer) }
        var error = [CChar](repeating: 0, count: 256)
        lua_pushinteger(L, 1)
        XCTAssertEqual(cljson_encode(L, -1, &buffer, 0, 0, &error, error.count), 1)
        lua_pushboolean(L, 1)
        XCTAssertEqual(cljson_encode(L, -1, &buffer, 0, 0, &error, error.count), 1)
        XCTAssertEqual(String(decoding: UnsafeRawBufferPointer(start: buffer.data, count: buffer.length),
                              as: UTF8.self), "1true", "encode appends")

        clua_pushcfunction(L, cljson_open)
        XCTAssertEqual(cljson_encode(L, -1, &buffer, 0, 0, &error, error.count), 0)
        XCTAssertEqual(buffer.length, 5, "a failed encode leaves earlier output alone")
        XCTAssertEqual(cljson_encode(L, 1, &buffer, 0, 0, &error, error.count), 1, "positive indexes work")
        XCTAssertEqual(lua_gettop(L), 3)
        XCTAssertEqual(cljson_encode(L, 10, &buffer, 0, 0, &error, error.count), 0)
        XCTAssertEqual(message(error), "JSON encode failed: stack index 10 holds no value")
    }

    func testLuaLibraryFunctions() {
        XCTAssertNil(runLua("""
            local t = {}
            assert(json.array(t) == t and json.is_array(t), 'array tags and returns its argument')
            assert(json.encode(t) == '[]')
            assert(json.object(t) == t and not json.is_array(t), 'object removes the tag')
            assert(json.encode(t) == '{}')
            assert(json.is_array(json.array()) and not json.is_array(json.object()))
            assert(not json.is_array({ 1, 2 }), 'is_array reports the tag only')
            assert(not json.is_array('x') and not json.is_array(nil))
            local other = setmetatable({}, { __name = 'other' })
            assert(json.object(other) == other and getmetatable(other).__name == 'other')
            assert(json.encode({ b = 1, a = { d = 1, c = 2 } }, { sort_keys = true }) == '{"a":{"c":2,"d":1},"b":1}')
            local ok, message = pcall(json.encode, { f = print })
            assert(not ok and message:find('cannot encode function at $.f', 1, true), message)
            assert(not pcall(json.encode), 'a value is required')
            local text = json.encode({ big = string.rep('x', 2000000) })
            assert(#text == 2000010, 'large output survives the buffer release')
            assert(json.encode('again') == '"again"')
            """))
    }
}

/// A small deterministic generator (SplitMix64) so that the generated cases repeat across runs.
private struct SplitMix64 {
    private var state: UInt64

    init(seed: UInt64) {
        state = seed
    }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var mixed = state
        mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
        mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
        return mixed ^ (mixed >> 31)
    }
}
