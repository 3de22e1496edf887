import Foundation
import HostAPI

// The command-line entry point: parse arguments, call the libraries, set the exit code.

let arguments = Array(CommandLine.arguments.dropFirst())

do {
    let code = try Command.parse(arguments).run()
    exit(code)
} catch {
    FileHandle.standardError.write(Data("projection-runtime: \(error.message)\n".utf8))
    FileHandle.standardError.write(Data("Run 'projection-runtime --help' for usage.\n".utf8))
    exit(2)
}
