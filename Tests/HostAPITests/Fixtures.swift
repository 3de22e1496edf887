import Foundation
import XCTest

@testable import HostAPI

/// A temporary projections folder that tests write Lua files into.
final class ProjectionFolder {
    let path: String

    init() throws {
        path = NSTemporaryDirectory() + "projections-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: path + "/lib", withIntermediateDirectories: true)
    }

    deinit {
        try? FileManager.default.removeItem(atPath: path)
    }

    func write(_ name: String, _ source: String) throws {
        let file = path + "/" + name
        try FileManager.default.createDirectory(
            atPath: (file as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try Data(source.utf8).write(to: URL(fileURLWithPath: file))
    }

    func remove(_ name: String) throws {
        try FileManager.default.removeItem(atPath: path + "/" + name)
    }
}

/// Builds an instance from inline source, as a file named `<stem>.lua` in a scratch folder.
func makeInstance(_ source: String, stem: String = "demo", libraries: [String: String] = [:],
                  limits: LuaLimits = LuaLimits(), settings: HostSettings = HostSettings())
    throws(ProjectionFailure) -> ProjectionInstance
{
    var modules: [String: [UInt8]] = [:]
    for (name, text) in libraries {
        modules[name] = Array(text.utf8)
    }
    let code = ProjectionCode(
        file: "projections/\(stem).lua", stem: stem, source: Array(source.utf8),
        libraries: LibrarySources(path: "projections/lib", modules: modules),
        settings: settings.settingsJSON(forStem: stem))
    return try ProjectionInstance(code: code, limits: limits, sortObjectKeys: true)
}

/// Wraps a handler body into a minimal projection consuming topic `t`.
func handlerProjection(_ body: String) -> String {
    """
    return {
      topics = { "t" },
      on_event = function(event, ctx)
        \(body)
      end,
    }
    """
}

func message(_ payload: String, topic: String = "t", partition: Int32 = 0, offset: Int64 = 0) -> EventMessage {
    EventMessage(topic: topic, partition: partition, offset: offset, payload: Array(payload.utf8))
}

extension EventOutcome {
    var effects: [Effect]? {
        if case .handled(let effects) = self { return effects }
        return nil
    }

    var failure: ProjectionFailure? {
        if case .failed(let failure) = self { return failure }
        return nil
    }
}

func text(_ bytes: [UInt8]) -> String {
    String(decoding: bytes, as: UTF8.self)
}

/// Runs `body` as an on_event handler once and returns the outcome.
func runHandler(_ body: String, payload: String = "{}", limits: LuaLimits = LuaLimits(),
                store: KeyedStateStore = InMemoryStateStore()) throws -> EventOutcome {
    let instance = try makeInstance(handlerProjection(body), limits: limits)
    return instance.handle(message(payload), store: store, nowMs: 1_000)
}
