//! The `cx-proxy` binary: parse the command line and hand it to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let code = cx_proxy::cli::main(cx_proxy::cli::Cli::parse());
    // Log lines still in their threads' buffers go out before the process ends.
    cx_proxy::logging::flush();
    code
}
