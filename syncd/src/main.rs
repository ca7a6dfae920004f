//! The `syncd` binary (placeholder until issue 4).
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("syncd: geosync replication daemon\n\n{}", geosync_syncd::NOT_YET);
        return std::process::ExitCode::SUCCESS;
    }
    eprintln!("syncd: {}", geosync_syncd::NOT_YET);
    std::process::ExitCode::from(2)
}
