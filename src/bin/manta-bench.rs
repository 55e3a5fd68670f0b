//! `manta-bench`: latency of create / exec / destroy against a running manta-server (JSON on
//! stdout, a table on stderr), and `manta-bench compare` of such runs with the baseline.

use std::io::Write;
use std::process::ExitCode;

use manta::bench::args::{self, Invocation, USAGE};
use manta::bench::{compare, run};

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let invocation = match args::parse(&argv, std::env::var("MANTA_API_TOKEN").ok()) {
        Ok(invocation) => invocation,
        Err(e) => {
            eprintln!("manta-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match invocation {
        Invocation::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Invocation::Compare(files) => match compare::compare_files(&files) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("manta-bench compare: {e}");
                ExitCode::from(2)
            }
        },
        Invocation::Run(options) => bench(&options),
    }
}

fn bench(options: &run::Options) -> ExitCode {
    // One thread is plenty for a handful of HTTP requests in flight, and it keeps the client's
    // own CPU use off the two cores the guests need.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let report = match runtime.block_on(run::run(options)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("manta-bench: {e}");
            return ExitCode::from(2);
        }
    };

    eprint!("{}", report.table());
    let json = serde_json::to_string_pretty(&report).expect("a report always serialises");
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{json}").and_then(|()| stdout.flush()) {
        eprintln!("manta-bench: cannot write the report to stdout: {e}");
        return ExitCode::from(2);
    }
    if report.errors.count > 0 || report.interrupted {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
