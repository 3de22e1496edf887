import CYAML
import Foundation
import HostAPI

/// A position in the config file, 1-based as editors show it.
struct YAMLMark: Sendable, Equatable {
    var line: Int
    var column: Int

    init(line: Int, column: Int) {
        self.line = line
        self.column = column
    }

    /// Converts libyaml's 0-based mark.
    init(_ mark: yaml_mark_t) {
        self.line = Int(mark.line) + 1
        self.column = Int(mark.column) + 1
    }
}

/// A scalar of the config file with the facts that decide its type.
struct YAMLScalar: Sendable {
    var value: String
    /// True for an unquoted scalar. Only plain scalars are read as null, booleans or numbers.
    var isPlain: Bool
    var mark: YAMLMark

    /// True for the YAML 1.2 core-schema null: an empty plain scalar, `~` or `null`.
    var isNull: Bool {
        isPlain && ["", "~", "null", "Null", "NULL"].contains(value)
    }
}

/// One `key: value` pair of a mapping.
struct YAMLMappingEntry: Sendable {
    var key: String
    var keyMark: YAMLMark
    var value: YAMLNode
}

/// A node of the parsed config file.
indirect enum YAMLNode: Sendable {
    case scalar(YAMLScalar)
    case mapping([YAMLMappingEntry], YAMLMark)
    case sequence([YAMLNode], YAMLMark)

    var mark: YAMLMark {
        switch self {
        case .scalar(let scalar): scalar.mark
        case .mapping(_, let mark): mark
        case .sequence(_, let mark): mark
        }
    }

    /// The node's kind with an article, for error messages.
    var kindName: String {
        switch self {
        case .scalar(let scalar): scalar.isNull ? "null" : "a scalar"
        case .mapping: "a mapping"
        case .sequence: "a sequence"
        }
    }
}

/// Reads the config file into a `YAMLNode` tree with libyaml's event parser.
///
/// The file contains at most one document. Anchors, aliases and tags are rejected with an error
/// that names their position, because settings are short enough to write out and a tag would
/// let a value bypass the typing rules. Duplicate keys are rejected too.
enum ConfigFileReader {
    /// Parses the file at `path`. Returns nil for a file without a document, such as an empty
    /// file or one with only comments.
    static func read(path: String) throws(ConfigError) -> YAMLNode? {
        var parser = yaml_parser_t()
        guard yaml_parser_initialize(&parser) == 1 else {
            throw ConfigError("cannot read config file \(path): libyaml could not allocate a parser")
        }
        defer { yaml_parser_delete(&parser) }

        guard let file = fopen(path, "rb") else {
            let reason = String(cString: strerror(errno))
            throw ConfigError("cannot open config file \(path): \(reason)")
        }
        defer { fclose(file) }
        // libyaml reads from `file` during yaml_parser_parse but does not own or close it.
        yaml_parser_set_input_file(&parser, file)

        var builder = YAMLTreeBuilder(path: path)
        while !builder.isFinished {
            var event = yaml_event_t()
            guard yaml_parser_parse(&parser, &event) == 1 else {
                throw parserError(parser, path: path)
            }
            defer { yaml_event_delete(&event) }
            try builder.consume(event)
        }
        return builder.root
    }

    /// Describes a libyaml scanner or parser failure with the file position.
    private static func parserError(_ parser: yaml_parser_t, path: String) -> ConfigError {
        let problem = parser.problem.map { String(cString: $0) } ?? "unknown error"
        if parser.error == YAML_READER_ERROR {
            return ConfigError("invalid YAML in \(path) at byte \(parser.problem_offset): \(problem)")
        }
        let mark = YAMLMark(parser.problem_mark)
        var message = "invalid YAML at \(path):\(mark.line):\(mark.column): \(problem)"
        if let context = parser.context {
            let contextMark = YAMLMark(parser.context_mark)
            message += " (\(String(cString: context)) at line \(contextMark.line))"
        }
        return ConfigError(message)
    }
}

/// Builds the node tree from libyaml events, keeping the collections not yet closed on a stack.
private struct YAMLTreeBuilder {
    private enum OpenCollection {
        case mapping(entries: [YAMLMappingEntry], pendingKey: YAMLScalar?, mark: YAMLMark)
        case sequence(items: [YAMLNode], mark: YAMLMark)
    }

    let path: String
    private(set) var root: YAMLNode?
    private(set) var isFinished = false
    private var stack: [OpenCollection] = []
    private var documentCount = 0

    init(path: String) {
        self.path = path
    }

    mutating func consume(_ event: yaml_event_t) throws(ConfigError) {
        let mark = YAMLMark(event.start_mark)
        switch event.type {
        case YAML_STREAM_END_EVENT:
            isFinished = true
        case YAML_DOCUMENT_START_EVENT:
            documentCount += 1
            if documentCount > 1 {
                throw error(at: mark,
                            "the file contains a second YAML document, but the config must be one document")
            }
        case YAML_ALIAS_EVENT:
            let name = Self.string(event.data.alias.anchor) ?? ""
            throw error(at: mark, "aliases (*\(name)) are not supported. Write the value out instead.")
        case YAML_SCALAR_EVENT:
            let data = event.data.scalar
            try rejectAnchorAndTag(anchor: data.anchor, tag: data.tag, at: mark)
            let bytes = UnsafeBufferPointer(start: data.value, count: data.length)
            let scalar = YAMLScalar(value: String(decoding: bytes, as: UTF8.self),
                                    isPlain: data.style == YAML_PLAIN_SCALAR_STYLE, mark: mark)
            try add(.scalar(scalar))
        case YAML_SEQUENCE_START_EVENT:
            try rejectAnchorAndTag(anchor: event.data.sequence_start.anchor,
                                   tag: event.data.sequence_start.tag, at: mark)
            stack.append(.sequence(items: [], mark: mark))
        case YAML_MAPPING_START_EVENT:
            try rejectAnchorAndTag(anchor: event.data.mapping_start.anchor,
                                   tag: event.data.mapping_start.tag, at: mark)
            stack.append(.mapping(entries: [], pendingKey: nil, mark: mark))
        case YAML_SEQUENCE_END_EVENT, YAML_MAPPING_END_EVENT:
            try closeCollection()
        default:
            break
        }
    }

    private mutating func closeCollection() throws(ConfigError) {
        switch stack.removeLast() {
        case .sequence(let items, let mark):
            try add(.sequence(items, mark))
        case .mapping(let entries, _, let mark):
            try add(.mapping(entries, mark))
        }
    }

    /// Adds a finished node to the innermost open collection, or makes it the root.
    private mutating func add(_ node: YAMLNode) throws(ConfigError) {
        guard let top = stack.popLast() else {
            root = node
            return
        }
        switch top {
        case .sequence(var items, let mark):
            items.append(node)
            stack.append(.sequence(items: items, mark: mark))
        case .mapping(var entries, let pendingKey?, let mark):
            entries.append(YAMLMappingEntry(key: pendingKey.value, keyMark: pendingKey.mark, value: node))
            stack.append(.mapping(entries: entries, pendingKey: nil, mark: mark))
        case .mapping(let entries, nil, let mark):
            guard case .scalar(let key) = node else {
                throw error(at: node.mark, "mapping keys must be scalars, found \(node.kindName)")
            }
            if let first = entries.first(where: { $0.key == key.value }) {
                throw error(at: key.mark,
                            "duplicate key '\(key.value)' (first set at line \(first.keyMark.line))")
            }
            stack.append(.mapping(entries: entries, pendingKey: key, mark: mark))
        }
    }

    private func rejectAnchorAndTag(anchor: UnsafeMutablePointer<yaml_char_t>?,
                                    tag: UnsafeMutablePointer<yaml_char_t>?,
                                    at mark: YAMLMark) throws(ConfigError) {
        if let name = Self.string(anchor) {
            throw error(at: mark, "anchors (&\(name)) are not supported. Write the value out instead.")
        }
        if let tag = Self.string(tag) {
            throw error(at: mark, "tags (\(tag)) are not supported. Quote a value to make it a string.")
        }
    }

    private func error(at mark: YAMLMark, _ text: String) -> ConfigError {
        ConfigError("\(path):\(mark.line):\(mark.column): \(text)")
    }

    private static func string(_ pointer: UnsafeMutablePointer<yaml_char_t>?) -> String? {
        pointer.map { String(cString: $0) }
    }
}

// MARK: - Applying the file to the settings

extension RuntimeConfig {
    /// Applies every setting of the config file at `path`, rejecting keys that match no setting.
    mutating func applyFile(at path: String) throws(ConfigError) {
        guard let root = try ConfigFileReader.read(path: path) else { return }
        switch root {
        case .mapping(let entries, _):
            try applyMapping(entries, under: "", path: path)
        case .scalar(let scalar) where scalar.isNull:
            return
        default:
            let mark = root.mark
            throw ConfigError("\(path):\(mark.line):\(mark.column): the config file must be a mapping "
                + "of settings, found \(root.kindName)")
        }
    }

    /// Applies the entries of the mapping at `section` (a dotted key path, empty at the top).
    private mutating func applyMapping(_ entries: [YAMLMappingEntry], under section: String,
                                       path: String) throws(ConfigError) {
        for entry in entries {
            let key = section.isEmpty ? entry.key : "\(section).\(entry.key)"
            if let spec = Self.setting(forKey: key) {
                let source = SettingSource.configFile(path: path, line: entry.value.mark.line,
                                                      column: entry.value.mark.column)
                try apply(spec, node: entry.value, source: source)
                continue
            }
            guard Self.isSection(key) else {
                let known = Self.childKeys(of: section).joined(separator: ", ")
                let place = section.isEmpty ? "at the top level" : "under \(section)"
                throw ConfigError("unknown key '\(key)' at \(path):\(entry.keyMark.line):"
                    + "\(entry.keyMark.column) (known keys \(place): \(known))")
            }
            switch entry.value {
            case .mapping(let children, _):
                try applyMapping(children, under: key, path: path)
            case .scalar(let scalar) where scalar.isNull:
                continue
            default:
                let mark = entry.value.mark
                throw ConfigError("invalid value for \(key) at \(path):\(mark.line):\(mark.column): "
                    + "expected a mapping of settings, found \(entry.value.kindName)")
            }
        }
    }

    /// Applies one setting from its YAML node. Scalars go through the same parser as
    /// environment variables, so both sources accept the same text. A null mapping setting is
    /// empty, so that commenting out every entry under it keeps the file valid.
    private mutating func apply(_ spec: SettingSpec, node: YAMLNode,
                                source: SettingSource) throws(ConfigError) {
        do throws(SettingValueError) {
            switch (spec.kind, node) {
            case (.kafkaProperties(let keyPath), .scalar(let scalar)) where scalar.isNull:
                self[keyPath: keyPath] = [:]
            case (.projectionSettings(let keyPath), .scalar(let scalar)) where scalar.isNull:
                self[keyPath: keyPath] = [:]
            case (_, .scalar(let scalar)) where scalar.isNull:
                throw SettingValueError(expected: "\(spec.kind.expectation), found null "
                    + "(remove the key to use the default)")
            case (.list(let keyPath), .sequence(let items, _)):
                self[keyPath: keyPath] = try Self.listEntries(items)
            case (.kafkaProperties(let keyPath), .mapping(let entries, _)):
                self[keyPath: keyPath] = try Self.kafkaProperties(entries)
            case (.projectionSettings(let keyPath), .mapping(let entries, _)):
                self[keyPath: keyPath] = try Self.projectionSettings(entries)
            case (_, .scalar(let scalar)):
                try spec.kind.apply(text: scalar.value, to: &self)
            default:
                throw SettingValueError(expected: "\(spec.kind.expectation), found \(node.kindName)")
            }
        } catch {
            var errorSource = source
            if let mark = error.mark, case .configFile(let path, _, _) = source {
                errorSource = .configFile(path: path, line: mark.line, column: mark.column)
            }
            throw ConfigError.invalidValue(error.quotedValue ?? Self.scalarText(node), for: spec,
                                           from: errorSource, expected: error.expected)
        }
        sources[spec.key] = source
    }

    private static func scalarText(_ node: YAMLNode) -> String? {
        guard case .scalar(let scalar) = node, !scalar.isNull else { return nil }
        return scalar.value
    }

    private static func listEntries(_ items: [YAMLNode]) throws(SettingValueError) -> [String] {
        var entries: [String] = []
        for item in items {
            guard case .scalar(let scalar) = item, !scalar.isNull else {
                throw SettingValueError(expected: "a list of non-empty strings, found \(item.kindName)",
                                        at: item.mark)
            }
            entries += try SettingKind.splitList(scalar.value)
        }
        guard !entries.isEmpty else {
            throw SettingValueError(expected: "a non-empty list")
        }
        return entries
    }

    /// Reads `kafka.properties`. `bootstrap.servers` and `group.id` are rejected because they
    /// have their own settings, and two places for one value would disagree.
    private static func kafkaProperties(_ entries: [YAMLMappingEntry]) throws(SettingValueError)
        -> [String: String]
    {
        var properties: [String: String] = [:]
        for entry in entries {
            let ownSettings = ["bootstrap.servers": "kafka.bootstrap", "group.id": "kafka.groupId"]
            if let replacement = ownSettings[entry.key] {
                throw SettingValueError(expected: "no '\(entry.key)' property (set \(replacement) instead)",
                                        at: entry.keyMark, quotedValue: entry.key)
            }
            guard case .scalar(let scalar) = entry.value, !scalar.isNull else {
                throw SettingValueError(
                    expected: "a scalar for property '\(entry.key)', found \(entry.value.kindName) "
                        + "(write a dotted librdkafka name as one key, such as security.protocol: SASL_SSL)",
                    at: entry.value.mark)
            }
            properties[entry.key] = scalar.value
        }
        return properties
    }

    /// Reads `projections.settings`: a mapping of projection file stems to mappings of scalars.
    private static func projectionSettings(_ entries: [YAMLMappingEntry]) throws(SettingValueError)
        -> [String: [String: SettingValue]]
    {
        var settings: [String: [String: SettingValue]] = [:]
        for projection in entries {
            if case .scalar(let scalar) = projection.value, scalar.isNull {
                settings[projection.key] = [:]
                continue
            }
            guard case .mapping(let values, _) = projection.value else {
                throw SettingValueError(
                    expected: "a mapping of settings for projection '\(projection.key)', "
                        + "found \(projection.value.kindName)",
                    at: projection.value.mark)
            }
            var typed: [String: SettingValue] = [:]
            for value in values {
                typed[value.key] = try settingValue(value, projection: projection.key)
            }
            settings[projection.key] = typed
        }
        return settings
    }

    private static func settingValue(_ entry: YAMLMappingEntry,
                                     projection: String) throws(SettingValueError) -> SettingValue {
        let name = "\(projection).\(entry.key)"
        guard case .scalar(let scalar) = entry.value, !scalar.isNull else {
            throw SettingValueError(
                expected: "a string, integer, float or boolean for '\(name)', found \(entry.value.kindName)",
                at: entry.value.mark)
        }
        guard let value = typedScalar(scalar) else {
            throw SettingValueError(
                expected: "a finite number for '\(name)' (settings reach Lua as JSON, which has no "
                    + "infinity or NaN, and integers must fit in 64 bits)",
                at: scalar.mark, quotedValue: scalar.value)
        }
        return value
    }

    /// Types a scalar by the YAML 1.2 core schema: plain `true`/`false` are booleans, plain
    /// decimal, `0x` and `0o` integers are integers, other plain numbers are floats, and every
    /// quoted scalar is a string. Returns nil for a number that cannot reach Lua (infinity,
    /// NaN, an integer outside Int64).
    static func typedScalar(_ scalar: YAMLScalar) -> SettingValue? {
        let text = scalar.value
        guard scalar.isPlain else { return .string(text) }

        if ["true", "True", "TRUE"].contains(text) { return .boolean(true) }
        if ["false", "False", "FALSE"].contains(text) { return .boolean(false) }

        if text.wholeMatch(of: #/[-+]?[0-9]+/#) != nil {
            return Int64(text.hasPrefix("+") ? String(text.dropFirst()) : text).map(SettingValue.integer)
        }
        if let digits = text.wholeMatch(of: #/0x([0-9a-fA-F]+)/#)?.1 {
            return Int64(digits, radix: 16).map(SettingValue.integer)
        }
        if let digits = text.wholeMatch(of: #/0o([0-7]+)/#)?.1 {
            return Int64(digits, radix: 8).map(SettingValue.integer)
        }
        if text.wholeMatch(of: #/[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?/#) != nil {
            guard let number = Double(text), number.isFinite else { return nil }
            return .number(number)
        }
        if text.wholeMatch(of: #/[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)/#) != nil {
            return nil
        }
        return .string(text)
    }
}
