//! The `geosync` command: all logic lives in the `geosync_tools` library.
fn main() -> std::process::ExitCode {
    geosync_tools::cli::main()
}
