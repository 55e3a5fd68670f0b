//! Command-line flags of `manta-bench`.

use std::path::PathBuf;

use super::run::Options;

/// Default server URL: the server's default listen address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// Default measured iterations.
pub const DEFAULT_ITERATIONS: usize = 50;
/// Default command run in each sandbox.
pub const DEFAULT_CMD: &str = "echo hello";
/// Upper bound on parallel workers; far beyond what a host runs as VMs at once.
const MAX_CONCURRENCY: usize = 256;

pub const USAGE: &str = "\
usage: manta-bench [FLAGS] > result.json
       manta-bench compare FILE.json... > comparison.txt

Runs create -> exec -> destroy against a running manta-server and prints one JSON document
on stdout; a table and progress go to stderr. Exit status 1 if any iteration failed.

flags:
  --url URL                 server (default http://127.0.0.1:8080)
  --iterations N            measured iterations (default 50)
  --concurrency N           parallel workers (default 1)
  --cmd CMD                 command to exec (default \"echo hello\")
  --warmup N                iterations run first and not counted (default 0)
  --execs-per-sandbox N     execs between create and destroy (default 1; 0 skips exec)
  --token TOKEN             bearer token (default: $MANTA_API_TOKEN)
  --server-pid PID          sample that process's VmRSS/VmHWM during the run

compare: reads one bench/baseline.sh document and manta-bench documents (any order), prints
ratios against the baseline and each target as met or missed, and by how much.";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    Run(Options),
    Compare(Vec<PathBuf>),
    Help,
}

/// A command line that cannot be used; the message names the flag.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArgsError {
    /// A flag this program does not have.
    #[error("unknown flag {0:?}; see --help")]
    Unknown(String),
    /// A flag without its value.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// A value that cannot be used.
    #[error("{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: &'static str,
    },
    /// `compare` without files.
    #[error("compare needs at least two JSON files (a baseline and a manta-bench run)")]
    CompareArgs,
}

/// Parses the arguments after the program name. `env_token` is `$MANTA_API_TOKEN`.
pub fn parse(args: &[String], env_token: Option<String>) -> Result<Invocation, ArgsError> {
    if args.first().map(String::as_str) == Some("compare") {
        let files: Vec<PathBuf> = args[1..].iter().map(PathBuf::from).collect();
        if files
            .iter()
            .any(|f| f.as_os_str() == "--help" || f.as_os_str() == "-h")
        {
            return Ok(Invocation::Help);
        }
        if files.len() < 2 {
            return Err(ArgsError::CompareArgs);
        }
        return Ok(Invocation::Compare(files));
    }

    let mut options = Options {
        url: DEFAULT_URL.to_string(),
        iterations: DEFAULT_ITERATIONS,
        concurrency: 1,
        cmd: DEFAULT_CMD.to_string(),
        warmup: 0,
        execs_per_sandbox: 1,
        token: env_token.filter(|t| !t.is_empty()),
        server_pid: None,
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Invocation::Help);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let flag: &'static str = match name {
            "--url" => "--url",
            "--iterations" => "--iterations",
            "--concurrency" => "--concurrency",
            "--cmd" => "--cmd",
            "--warmup" => "--warmup",
            "--execs-per-sandbox" => "--execs-per-sandbox",
            "--token" => "--token",
            "--server-pid" => "--server-pid",
            _ => return Err(ArgsError::Unknown(arg.clone())),
        };
        let value = match inline {
            Some(v) => v,
            None => rest.next().cloned().ok_or(ArgsError::MissingValue(flag))?,
        };
        match flag {
            "--url" => options.url = value,
            "--iterations" => options.iterations = count(flag, &value, 1)?,
            "--concurrency" => {
                options.concurrency = count(flag, &value, 1)?;
                if options.concurrency > MAX_CONCURRENCY {
                    return Err(invalid(flag, &value, "at most 256 workers"));
                }
            }
            "--cmd" => {
                if value.trim().is_empty() {
                    return Err(invalid(flag, &value, "the command must not be empty"));
                }
                options.cmd = value;
            }
            "--warmup" => options.warmup = count(flag, &value, 0)?,
            "--execs-per-sandbox" => options.execs_per_sandbox = count(flag, &value, 0)?,
            "--token" => options.token = Some(value).filter(|t| !t.is_empty()),
            "--server-pid" => {
                let pid = value
                    .parse::<u32>()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| invalid(flag, &value, "expected a process id"))?;
                options.server_pid = Some(pid);
            }
            _ => unreachable!("every flag name above is handled"),
        }
    }
    Ok(Invocation::Run(options))
}

fn count(flag: &'static str, value: &str, min: usize) -> Result<usize, ArgsError> {
    match value.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        Ok(_) if min == 1 => Err(invalid(flag, value, "must be at least 1")),
        _ => Err(invalid(flag, value, "expected a whole number")),
    }
}

fn invalid(flag: &'static str, value: &str, reason: &'static str) -> ArgsError {
    ArgsError::Invalid {
        flag,
        value: value.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, ArgsError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match parse(&args, Some("from-env-token-123".to_string()))? {
            Invocation::Run(o) => Ok(o),
            other => panic!("expected a run, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let o = run(&[]).unwrap();
        assert_eq!(o.url, DEFAULT_URL);
        assert_eq!((o.iterations, o.concurrency, o.warmup), (50, 1, 0));
        assert_eq!((o.cmd.as_str(), o.execs_per_sandbox), ("echo hello", 1));
        assert_eq!(o.token.as_deref(), Some("from-env-token-123"));
        assert_eq!(o.server_pid, None);
    }

    #[test]
    fn every_flag_both_spellings() {
        let o = run(&[
            "--url=http://127.0.0.1:9",
            "--iterations",
            "40",
            "--concurrency=4",
            "--cmd",
            "true",
            "--warmup",
            "2",
            "--execs-per-sandbox=0",
            "--token",
            "flag-token",
            "--server-pid",
            "123",
        ])
        .unwrap();
        assert_eq!(o.url, "http://127.0.0.1:9");
        assert_eq!((o.iterations, o.concurrency, o.warmup), (40, 4, 2));
        assert_eq!((o.cmd.as_str(), o.execs_per_sandbox), ("true", 0));
        assert_eq!(o.token.as_deref(), Some("flag-token"));
        assert_eq!(o.server_pid, Some(123));
    }

    #[test]
    fn bad_command_lines_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--iterations", "0"], "--iterations"),
            (&["--iterations", "many"], "--iterations"),
            (&["--concurrency", "0"], "--concurrency"),
            (&["--concurrency", "1000"], "--concurrency"),
            (&["--cmd", " "], "--cmd"),
            (&["--server-pid", "0"], "--server-pid"),
            (&["--warmup"], "--warmup"),
            (&["--bogus", "1"], "--bogus"),
            (&["extra"], "extra"),
        ];
        for (args, named) in cases {
            let err = run(args).expect_err(&format!("{args:?} must be refused"));
            assert!(err.to_string().contains(named), "{args:?}: {err}");
        }
    }

    #[test]
    fn compare_and_help() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse(&args(&["compare", "a.json", "b.json"]), None),
            Ok(Invocation::Compare(vec!["a.json".into(), "b.json".into()]))
        );
        assert_eq!(
            parse(&args(&["compare", "a.json"]), None),
            Err(ArgsError::CompareArgs)
        );
        assert_eq!(parse(&args(&["--help"]), None), Ok(Invocation::Help));
    }
}
