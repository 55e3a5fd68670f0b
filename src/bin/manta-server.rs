//! `manta-server`: serve the sandbox API. `manta-server doctor`: report what this host can run.

use std::process::ExitCode;

use manta::config::Config;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("serve") => serve(),
        Some("doctor") => doctor(),
        Some("-h" | "--help" | "help") => {
            println!(
                "usage: manta-server [serve|doctor]\n\nConfiguration comes from MANTA_* environment variables; see README.md."
            );
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("manta-server: unknown command {other:?}; try `manta-server --help`");
            ExitCode::from(2)
        }
    }
}

fn serve() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("manta-server: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    match runtime.block_on(manta::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("manta-server: cannot start: {e}");
            ExitCode::from(2)
        }
    }
}

fn doctor() -> ExitCode {
    manta::doctor::print()
}
