// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "projection-runtime",
    products: [
        .executable(name: "projection-runtime", targets: ["projection-runtime"]),
    ],
    targets: [
        // Lua 5.4 from Debian's liblua5.4-dev, plus wrappers for the C API's macros and the
        // host's allocator and instruction hook.
        .target(
            name: "CLua",
            linkerSettings: [.linkedLibrary("lua5.4"), .linkedLibrary("m")]
        ),
        // The JSON codec: decodes straight into Lua values and encodes Lua values.
        .target(name: "CLuaJSON", dependencies: ["CLua"]),
        // SHA-1 (Redis script ids) and SHA-256 (projection versions) from OpenSSL's libcrypto.
        .systemLibrary(name: "CCrypto", path: "Sources/CCrypto"),
        .target(
            name: "HostAPI",
            dependencies: ["CLua", "CLuaJSON", "CCrypto"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // librdkafka, hiredis and libyaml import as they are.
        .systemLibrary(name: "CRdKafka", path: "Sources/CRdKafka"),
        .systemLibrary(name: "CHiredis", path: "Sources/CHiredis"),
        .systemLibrary(name: "CYAML", path: "Sources/CYAML"),
        // libmicrohttpd and libcurl need C wrappers for their variadic functions.
        .target(name: "CMicroHTTPD", linkerSettings: [.linkedLibrary("microhttpd")]),
        .target(name: "CCurl", linkerSettings: [.linkedLibrary("curl")]),
        .target(
            name: "Runtime",
            dependencies: ["HostAPI", "CRdKafka", "CHiredis", "CYAML", "CMicroHTTPD", "CCurl"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "projection-runtime",
            dependencies: ["HostAPI", "Runtime"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "host-bench",
            dependencies: ["HostAPI", "CLua", "CLuaJSON"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .testTarget(
            name: "RuntimeTests",
            dependencies: ["Runtime", "HostAPI", "CRdKafka", "CHiredis"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .testTarget(
            name: "HostAPITests",
            dependencies: ["HostAPI", "CLua", "CLuaJSON"],
            exclude: ["Golden"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
    ]
)
