import Foundation

/// Writes the host's own JSON (reports, log lines, offline-runner output) around values that the
/// Lua codec already encoded. Values from projections never pass through here: `raw` splices
/// the codec's output in unchanged.
public struct JSONWriter {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public var text: String { String(decoding: bytes, as: UTF8.self) }

    public mutating func raw(_ json: [UInt8]) {
        bytes.append(contentsOf: json)
    }

    public mutating func null() {
        bytes.append(contentsOf: "null".utf8)
    }

    public mutating func boolean(_ value: Bool) {
        bytes.append(contentsOf: (value ? "true" : "false").utf8)
    }

    public mutating func integer<T: BinaryInteger>(_ value: T) {
        bytes.append(contentsOf: String(value).utf8)
    }

    /// Writes a finite double in its shortest round-trip form; NaN and infinities become null.
    public mutating func number(_ value: Double) {
        guard value.isFinite else { return null() }
        var text = value.description
        if !text.contains(".") && !text.contains("e") {
            text += ".0"
        }
        bytes.append(contentsOf: text.utf8)
    }

    /// Writes a string; invalid UTF-8 in `value` was already replaced when it became a String.
    public mutating func string(_ value: String) {
        bytes.append(UInt8(ascii: "\""))
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "\""): bytes.append(contentsOf: #"\""#.utf8)
            case UInt8(ascii: "\\"): bytes.append(contentsOf: #"\\"#.utf8)
            case 0x0a: bytes.append(contentsOf: #"\n"#.utf8)
            case 0x0d: bytes.append(contentsOf: #"\r"#.utf8)
            case 0x09: bytes.append(contentsOf: #"\t"#.utf8)
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                bytes.append(contentsOf: #"\u00"#.utf8)
                bytes.append(hex[Int(byte >> 4)])
                bytes.append(hex[Int(byte & 0x0f)])
            default: bytes.append(byte)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }

    /// Writes a byte string as a JSON string when it is valid UTF-8, else as `{"base64": ...}`.
    public mutating func byteString(_ value: [UInt8]) {
        if let text = String(validating: value, as: UTF8.self) {
            string(text)
        } else {
            bytes.append(contentsOf: #"{"base64":""#.utf8)
            bytes.append(contentsOf: Data(value).base64EncodedString().utf8)
            bytes.append(contentsOf: #""}"#.utf8)
        }
    }

    public mutating func object<Keys: Sequence>(
        _ keys: Keys, _ writeValue: (Keys.Element, inout JSONWriter) -> Void
    ) where Keys.Element == String {
        bytes.append(UInt8(ascii: "{"))
        var first = true
        for key in keys {
            if !first { bytes.append(UInt8(ascii: ",")) }
            first = false
            string(key)
            bytes.append(UInt8(ascii: ":"))
            writeValue(key, &self)
        }
        bytes.append(UInt8(ascii: "}"))
    }

    public mutating func array<Items: Sequence>(
        _ items: Items, _ writeItem: (Items.Element, inout JSONWriter) -> Void
    ) {
        bytes.append(UInt8(ascii: "["))
        var first = true
        for item in items {
            if !first { bytes.append(UInt8(ascii: ",")) }
            first = false
            writeItem(item, &self)
        }
        bytes.append(UInt8(ascii: "]"))
    }

    /// Writes `"key":` inside an object being built by hand with `beginObject`/`endObject`.
    public mutating func field(_ key: String, first: Bool = false) {
        if !first { bytes.append(UInt8(ascii: ",")) }
        string(key)
        bytes.append(UInt8(ascii: ":"))
    }

    public mutating func beginObject() { bytes.append(UInt8(ascii: "{")) }
    public mutating func endObject() { bytes.append(UInt8(ascii: "}")) }
}
