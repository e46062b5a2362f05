//! The `cx-proxy` binary: parse the command line and hand it to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    cx_proxy::cli::main(cx_proxy::cli::Cli::parse())
}
