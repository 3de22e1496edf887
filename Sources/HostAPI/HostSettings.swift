/// The settings the Lua host reads: the topic names projections take from `settings`,
/// per-projection settings, and the sandbox limits.
public struct HostSettings: Sendable, Equatable {
    /// `settings.aggregated_topic`: the topic of aggregated OHLCV bars.
    public var aggregatedTopic: String
    /// `settings.invalidation_topic`: the topic of cache-invalidation events.
    public var invalidationTopic: String
    /// Extra settings by projection file stem, merged over the two topics.
    public var projectionSettings: [String: [String: SettingValue]]
    public var limits: LuaLimits
    public var jsonLimits: JSONLimits
    /// Sorts object keys in rows and state values, for output that golden files can compare.
    public var sortObjectKeys = false

    public init(aggregatedTopic: String = "aggregation.bars.v1",
                invalidationTopic: String = "projection.invalidation.v1",
                projectionSettings: [String: [String: SettingValue]] = [:],
                limits: LuaLimits = LuaLimits(), jsonLimits: JSONLimits = JSONLimits()) {
        self.aggregatedTopic = aggregatedTopic
        self.invalidationTopic = invalidationTopic
        self.projectionSettings = projectionSettings
        self.limits = limits
        self.jsonLimits = jsonLimits
    }

    /// The `settings` table of the projection in `stem.lua`, as a JSON object.
    public func settingsJSON(forStem stem: String) -> [UInt8] {
        var values: [String: SettingValue] = [
            "aggregated_topic": .string(aggregatedTopic),
            "invalidation_topic": .string(invalidationTopic),
        ]
        values.merge(projectionSettings[stem] ?? [:]) { _, own in own }
        var writer = JSONWriter()
        writer.object(values.keys.sorted()) { key, writer in values[key]!.write(to: &writer) }
        return writer.bytes
    }
}

/// A scalar setting value from the configuration file.
public enum SettingValue: Sendable, Equatable {
    case string(String)
    case integer(Int64)
    case number(Double)
    case boolean(Bool)

    func write(to writer: inout JSONWriter) {
        switch self {
        case .string(let value): writer.string(value)
        case .integer(let value): writer.integer(value)
        case .number(let value): writer.number(value)
        case .boolean(let value): writer.boolean(value)
        }
    }
}
