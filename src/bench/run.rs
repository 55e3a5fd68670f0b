//! The benchmark loop: workers that create, exec in and destroy sandboxes, a sampler of the
//! server's memory, and the progress line.

use std::io::{IsTerminal, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::{JoinHandle, JoinSet};

use super::http::{ApiClient, HttpError, HttpResponse};
use super::report::{
    CreatePhases, ErrorReport, HostInfo, IterationCounts, KIND_MANTA, Latency, Report, SCHEMA,
    Samples, ServerMemory, git_revision, timestamp_now,
};
use super::stats::{Summary, round_ms};

/// Longest one request may take. Create waits for the guest's SSH (60 s by default on the
/// server), and with several TCG guests booting on two cores it can take longer than a quiet
/// boot; past this the iteration is counted as failed rather than hanging the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the server's memory is sampled.
const MEMORY_SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Error messages kept in the report (all of them are counted).
const ERRORS_KEPT: usize = 5;

/// What to run; see `manta-bench --help`.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub url: String,
    pub iterations: usize,
    pub concurrency: usize,
    pub cmd: String,
    pub warmup: usize,
    pub execs_per_sandbox: usize,
    pub token: Option<String>,
    pub server_pid: Option<u32>,
}

/// Problems that stop the run before it measures anything.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The URL cannot be used.
    #[error(transparent)]
    Url(#[from] HttpError),
    /// The server does not answer its health check.
    #[error("the server at {url} is not usable: {reason}")]
    Unreachable { url: String, reason: String },
    /// The process given by `--server-pid` cannot be read.
    #[error("--server-pid {pid}: cannot read /proc/{pid}/status: {source}")]
    ServerPid {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Create timings as the server reports them (`timings_ms` of the create response).
#[derive(Debug, Clone, Copy, Deserialize)]
struct ServerTimings {
    rootfs: f64,
    network: f64,
    vmm_start: f64,
    boot_to_ssh: f64,
    total: f64,
}

/// What one iteration measured. A step's time is kept only if the step succeeded.
#[derive(Debug, Default)]
struct Outcome {
    index: usize,
    create_ms: Option<f64>,
    server: Option<ServerTimings>,
    exec_ms: Vec<f64>,
    destroy_ms: Option<f64>,
    /// Set only when every step succeeded.
    cycle_ms: Option<f64>,
    error: Option<String>,
}

/// Warm-up iterations are run and reported, but their times are not in any figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measured,
}

/// State the workers, the sampler and the progress line share.
#[derive(Debug, Default)]
struct Shared {
    /// Sandboxes of this run the server holds: counted from the create request on (the server
    /// registers a sandbox before it boots), until its destroy succeeds or its create fails.
    live: AtomicUsize,
    max_live: AtomicUsize,
    /// Set by Ctrl-C: workers finish the iteration in hand and take no new one.
    stop: AtomicBool,
    /// Last sampled server VmRSS (0 when not sampling).
    last_rss_kib: AtomicU64,
    progress: Mutex<Progress>,
}

#[derive(Debug, Default)]
struct Progress {
    done: usize,
    failed: usize,
}

/// Runs the benchmark and returns its report.
pub async fn run(options: &Options) -> Result<Report, RunError> {
    let client = ApiClient::new(&options.url, options.token.clone(), REQUEST_TIMEOUT)?;
    let health = health(&client, &options.url).await?;
    let vmm = health
        .get("vmm")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    if let Some(max) = health.get("max_sandboxes").and_then(Value::as_u64)
        && (options.concurrency as u64) > max
    {
        eprintln!(
            "manta-bench: warning: --concurrency {} exceeds the server's max_sandboxes {max}; \
             expect at_capacity errors",
            options.concurrency
        );
    }

    let shared = Arc::new(Shared::default());
    let sampler = match options.server_pid {
        Some(pid) => Some(MemorySampler::start(pid, Arc::clone(&shared))?),
        None => None,
    };
    let ctrl_c = tokio::spawn(stop_on_ctrl_c(Arc::clone(&shared)));

    let warm = run_phase(Phase::Warmup, options.warmup, &client, options, &shared).await;
    let started = Instant::now();
    let measured = run_phase(
        Phase::Measured,
        options.iterations,
        &client,
        options,
        &shared,
    )
    .await;
    let wall_s = started.elapsed().as_secs_f64();
    ctrl_c.abort();

    let memory = sampler.map(|s| s.finish(shared.max_live.load(Ordering::SeqCst)));
    Ok(build_report(
        options,
        vmm,
        &warm,
        &measured,
        wall_s,
        memory,
        shared.stop.load(Ordering::SeqCst),
    ))
}

/// `GET /healthz`, which must answer 200 with JSON.
async fn health(client: &ApiClient, url: &str) -> Result<Value, RunError> {
    let unreachable = |reason: String| RunError::Unreachable {
        url: url.to_string(),
        reason,
    };
    let response = client
        .send("GET", "/healthz", None)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if response.status != 200 {
        return Err(unreachable(response.describe_error()));
    }
    response
        .json()
        .ok_or_else(|| unreachable("/healthz did not answer JSON".to_string()))
}

async fn stop_on_ctrl_c(shared: Arc<Shared>) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    shared.stop.store(true, Ordering::SeqCst);
    eprintln!(
        "\nmanta-bench: interrupted; finishing the iterations in flight so their sandboxes are \
         destroyed (Ctrl-C again quits at once and leaves them to the server)"
    );
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(130);
    }
}

/// Runs `count` iterations on `options.concurrency` workers.
async fn run_phase(
    phase: Phase,
    count: usize,
    client: &ApiClient,
    options: &Options,
    shared: &Arc<Shared>,
) -> Vec<Outcome> {
    if count == 0 {
        return Vec::new();
    }
    *shared.progress.lock().unwrap_or_else(|e| e.into_inner()) = Progress::default();
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let mut workers = JoinSet::new();
    for _ in 0..options.concurrency.min(count) {
        let (next, results, shared) = (Arc::clone(&next), Arc::clone(&results), Arc::clone(shared));
        let (client, options) = (client.clone(), options.clone());
        workers.spawn(async move {
            loop {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= count {
                    break;
                }
                let mut outcome = iteration(&client, &options, &shared).await;
                outcome.index = index;
                report_progress(phase, count, &outcome, &shared);
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(outcome);
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = joined {
            eprintln!("manta-bench: a worker stopped abnormally: {e}");
        }
    }
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()))
}

/// create → exec × N → destroy. A sandbox that was created is always destroyed, even when an
/// exec failed.
async fn iteration(client: &ApiClient, options: &Options, shared: &Shared) -> Outcome {
    let mut outcome = Outcome::default();
    let cycle = Instant::now();

    let live = shared.live.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_live.fetch_max(live, Ordering::SeqCst);
    let t = Instant::now();
    let created = client.send("POST", "/create", Some(&json!({}))).await;
    let create_ms = ms_since(t);
    let created = match expect_status(created, 201) {
        Ok(response) => response,
        Err(reason) => {
            shared.live.fetch_sub(1, Ordering::SeqCst);
            outcome.error = Some(format!("create: {reason}"));
            return outcome;
        }
    };
    let Some((sandbox_id, timings)) = parse_created(&created) else {
        outcome.error = Some(format!(
            "create: answered 201 without a sandbox_id and timings_ms (body: {}); \
             nothing can be destroyed",
            String::from_utf8_lossy(&created.body)
        ));
        return outcome;
    };
    outcome.create_ms = Some(create_ms);
    outcome.server = timings;

    let exec_body = json!({ "sandbox_id": sandbox_id, "cmd": options.cmd });
    for _ in 0..options.execs_per_sandbox {
        let t = Instant::now();
        let result = client.send("POST", "/exec", Some(&exec_body)).await;
        let exec_ms = ms_since(t);
        match expect_status(result, 200).and_then(|r| command_succeeded(&r)) {
            Ok(()) => outcome.exec_ms.push(exec_ms),
            Err(reason) => {
                outcome.error = Some(format!("exec in {sandbox_id}: {reason}"));
                break;
            }
        }
    }

    let t = Instant::now();
    let destroyed = client
        .send(
            "POST",
            "/destroy",
            Some(&json!({ "sandbox_id": sandbox_id })),
        )
        .await;
    let destroy_ms = ms_since(t);
    match expect_status(destroyed, 200) {
        Ok(_) => {
            outcome.destroy_ms = Some(destroy_ms);
            shared.live.fetch_sub(1, Ordering::SeqCst);
        }
        Err(reason) => {
            let message = format!("destroy {sandbox_id}: {reason}");
            outcome.error = Some(match outcome.error.take() {
                Some(first) => format!("{first}; then {message}"),
                None => message,
            });
        }
    }

    if outcome.error.is_none() {
        outcome.cycle_ms = Some(ms_since(cycle));
    }
    outcome
}

fn expect_status(
    result: Result<HttpResponse, HttpError>,
    want: u16,
) -> Result<HttpResponse, String> {
    match result {
        Ok(response) if response.status == want => Ok(response),
        Ok(response) => Err(response.describe_error()),
        Err(e) => Err(e.to_string()),
    }
}

/// The sandbox id and the server's timings from a create response.
fn parse_created(response: &HttpResponse) -> Option<(String, Option<ServerTimings>)> {
    let body = response.json()?;
    let id = body.get("sandbox_id")?.as_str()?.to_string();
    let timings = body
        .get("timings_ms")
        .and_then(|t| serde_json::from_value(t.clone()).ok());
    Some((id, timings))
}

/// An exec answer counts as a success only if the command ran to exit status 0: the bench's
/// command is expected to work, so anything else means the measurement is not what it claims.
fn command_succeeded(response: &HttpResponse) -> Result<(), String> {
    let body = response
        .json()
        .ok_or_else(|| "answered 200 with a body that is not JSON".to_string())?;
    if body.get("timed_out").and_then(Value::as_bool) == Some(true) {
        return Err("the command timed out".to_string());
    }
    match body.get("exit_code").and_then(Value::as_i64) {
        Some(0) => Ok(()),
        code => {
            let stderr = body.get("stderr").and_then(Value::as_str).unwrap_or("");
            let stderr: String = stderr.chars().take(200).collect();
            Err(format!(
                "the command exited with {} (stderr: {:?})",
                code.map_or("no status".to_string(), |c| c.to_string()),
                stderr.trim()
            ))
        }
    }
}

fn report_progress(phase: Phase, count: usize, outcome: &Outcome, shared: &Shared) {
    let (done, failed) = {
        let mut p = shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.done += 1;
        p.failed += usize::from(outcome.error.is_some());
        (p.done, p.failed)
    };
    let label = match phase {
        Phase::Warmup => "warmup",
        Phase::Measured => "run",
    };
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |ms| format!("{ms:.0} ms"));
    let exec = outcome.exec_ms.last().copied();
    let rss = shared.last_rss_kib.load(Ordering::Relaxed);
    let rss = if rss > 0 {
        format!(" | server rss {:.1} MiB", rss as f64 / 1024.0)
    } else {
        String::new()
    };
    let line = format!(
        "[{label} {done}/{count}] ok {} failed {failed} | last: create {}, exec {}, destroy {} \
         | live {}{rss}",
        done - failed,
        fmt(outcome.create_ms),
        fmt(exec),
        fmt(outcome.destroy_ms),
        shared.live.load(Ordering::SeqCst),
    );
    let mut stderr = std::io::stderr().lock();
    if stderr.is_terminal() {
        let _ = write!(stderr, "\r\x1b[2K{line}");
    } else {
        let _ = writeln!(stderr, "{line}");
    }
    let _ = stderr.flush();
}

fn build_report(
    options: &Options,
    vmm: String,
    warm: &[Outcome],
    measured: &[Outcome],
    wall_s: f64,
    server_memory: Option<ServerMemory>,
    interrupted: bool,
) -> Report {
    let mut samples = Samples::default();
    let mut phases: [Vec<f64>; 5] = Default::default();
    for o in measured {
        samples.create.extend(o.create_ms.map(round_ms));
        samples.exec.extend(o.exec_ms.iter().copied().map(round_ms));
        samples.destroy.extend(o.destroy_ms.map(round_ms));
        samples.cycle.extend(o.cycle_ms.map(round_ms));
        if let (Some(create), Some(server)) = (o.create_ms, o.server) {
            samples
                .create_overhead
                .push(round_ms(create - server.boot_to_ssh));
            let split = [
                server.rootfs,
                server.network,
                server.vmm_start,
                server.boot_to_ssh,
                server.total,
            ];
            for (all, value) in phases.iter_mut().zip(split) {
                all.push(value);
            }
        }
    }

    let tagged = |o: &Outcome, tag: &str| {
        o.error
            .as_ref()
            .map(|e| format!("iteration {}{tag}: {e}", o.index))
    };
    let messages: Vec<String> = warm
        .iter()
        .filter_map(|o| tagged(o, " (warmup)"))
        .chain(measured.iter().filter_map(|o| tagged(o, "")))
        .collect();
    let failed = measured.iter().filter(|o| o.error.is_some()).count();
    let warmup_failed = warm.iter().filter(|o| o.error.is_some()).count();
    let (git_rev, git_dirty) = git_revision();

    Report {
        schema: SCHEMA.to_string(),
        kind: KIND_MANTA.to_string(),
        timestamp: timestamp_now(),
        git_rev,
        git_dirty,
        vmm,
        host: HostInfo::probe(),
        flags: json!({
            "url": options.url,
            "iterations": options.iterations,
            "concurrency": options.concurrency,
            "cmd": options.cmd,
            "warmup": options.warmup,
            "execs_per_sandbox": options.execs_per_sandbox,
            "token": options.token.as_ref().map(|_| "set"),
            "server_pid": options.server_pid,
        }),
        wall_s: (wall_s * 1000.0).round() / 1000.0,
        iterations: IterationCounts {
            requested: options.iterations,
            ok: measured.len() - failed,
            failed,
            warmup: options.warmup,
            warmup_failed,
        },
        latency_ms: Latency {
            create: Summary::of(&samples.create),
            exec: Summary::of(&samples.exec),
            destroy: Summary::of(&samples.destroy),
            cycle: Summary::of(&samples.cycle),
            create_overhead: Summary::of(&samples.create_overhead),
        },
        create_phases_ms: CreatePhases {
            rootfs: Summary::of(&phases[0]),
            network: Summary::of(&phases[1]),
            vmm_start: Summary::of(&phases[2]),
            boot_to_ssh: Summary::of(&phases[3]),
            total: Summary::of(&phases[4]),
        },
        errors: ErrorReport {
            count: messages.len(),
            first: messages.into_iter().take(ERRORS_KEPT).collect(),
        },
        server_memory,
        interrupted,
        samples_ms: samples,
    }
}

/// Samples `/proc/<pid>/status` in the background.
struct MemorySampler {
    pid: u32,
    idle_rss_kib: u64,
    state: Arc<Mutex<MemoryState>>,
    task: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct MemoryState {
    samples: usize,
    peak_rss_kib: u64,
    note: Option<String>,
}

impl MemorySampler {
    /// Reads the idle size now, then samples every [`MEMORY_SAMPLE_EVERY`].
    fn start(pid: u32, shared: Arc<Shared>) -> Result<Self, RunError> {
        let (idle_rss_kib, _) =
            read_memory(pid).map_err(|source| RunError::ServerPid { pid, source })?;
        shared.last_rss_kib.store(idle_rss_kib, Ordering::Relaxed);
        let state = Arc::new(Mutex::new(MemoryState {
            samples: 1,
            peak_rss_kib: idle_rss_kib,
            note: None,
        }));
        let task_state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(MEMORY_SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let read = read_memory(pid);
                let mut state = task_state.lock().unwrap_or_else(|e| e.into_inner());
                match read {
                    Ok((rss, _)) => {
                        state.samples += 1;
                        state.peak_rss_kib = state.peak_rss_kib.max(rss);
                        shared.last_rss_kib.store(rss, Ordering::Relaxed);
                    }
                    Err(e) => {
                        state.note = Some(format!(
                            "sampling stopped after {} samples: /proc/{pid}/status: {e}",
                            state.samples
                        ));
                        return;
                    }
                }
            }
        });
        Ok(MemorySampler {
            pid,
            idle_rss_kib,
            state,
            task,
        })
    }

    /// Stops sampling, takes a last reading and computes the per-sandbox figure.
    fn finish(self, max_live: usize) -> ServerMemory {
        self.task.abort();
        let mut state = std::mem::take(&mut *self.state.lock().unwrap_or_else(|e| e.into_inner()));
        let mut hwm_kib = 0;
        match read_memory(self.pid) {
            Ok((rss, hwm)) => {
                state.samples += 1;
                state.peak_rss_kib = state.peak_rss_kib.max(rss);
                hwm_kib = hwm;
            }
            Err(e) if state.note.is_none() => {
                state.note = Some(format!(
                    "no final reading of /proc/{}/status: {e}",
                    self.pid
                ));
            }
            Err(_) => {}
        }
        let peak = state.peak_rss_kib.max(hwm_kib);
        ServerMemory {
            pid: self.pid,
            samples: state.samples,
            idle_rss_kib: self.idle_rss_kib,
            peak_rss_kib: state.peak_rss_kib,
            hwm_kib,
            max_live_sandboxes: max_live,
            per_live_sandbox_kib: (max_live > 0)
                .then(|| (peak.saturating_sub(self.idle_rss_kib) as f64 / max_live as f64).round()),
            note: state.note,
        }
    }
}

/// (VmRSS, VmHWM) of `pid`, in KiB.
fn read_memory(pid: u32) -> std::io::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status_kib(&status, "VmRSS:");
    let hwm = status_kib(&status, "VmHWM:");
    match (rss, hwm) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => Err(std::io::Error::other(
            "no VmRSS/VmHWM lines (is it a kernel thread or a zombie?)",
        )),
    }
}

/// A `Name:   1234 kB` line of /proc/<pid>/status, in KiB.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, body: Value) -> HttpResponse {
        HttpResponse {
            status,
            body: body.to_string().into_bytes(),
        }
    }

    #[test]
    fn exec_answers_table() {
        let cases = [
            (json!({"exit_code": 0, "timed_out": false}), true),
            (
                json!({"exit_code": 1, "timed_out": false, "stderr": "no"}),
                false,
            ),
            (json!({"exit_code": null, "timed_out": true}), false),
            (
                json!({"exit_code": null, "timed_out": false, "signal": "KILL"}),
                false,
            ),
        ];
        for (body, ok) in cases {
            assert_eq!(
                command_succeeded(&response(200, body.clone())).is_ok(),
                ok,
                "{body}"
            );
        }
        let not_json = HttpResponse {
            status: 200,
            body: b"hello".to_vec(),
        };
        assert!(command_succeeded(&not_json).is_err());
    }

    #[test]
    fn create_answer_parsing() {
        let full = response(
            201,
            json!({"sandbox_id": "sb-1", "ip": "172.31.0.6", "vmm": "qemu-tcg",
                   "timings_ms": {"rootfs": 1.0, "network": 2.0, "vmm_start": 3.0,
                                  "boot_to_ssh": 4.0, "total": 10.0}}),
        );
        let (id, timings) = parse_created(&full).unwrap();
        assert_eq!(id, "sb-1");
        assert_eq!(timings.unwrap().boot_to_ssh, 4.0);
        assert!(parse_created(&response(201, json!({"ip": "x"}))).is_none());
        let (_, none) = parse_created(&response(201, json!({"sandbox_id": "sb-2"}))).unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn proc_status_lines() {
        let status = "Name:\tmanta-server\nVmHWM:\t   20480 kB\nVmRSS:\t   16384 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(16384));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        let (rss, hwm) = read_memory(std::process::id()).unwrap();
        assert!(rss > 0 && hwm >= rss, "rss {rss} hwm {hwm}");
    }

    fn options() -> Options {
        Options {
            url: "http://127.0.0.1:1".to_string(),
            iterations: 3,
            concurrency: 1,
            cmd: "true".to_string(),
            warmup: 1,
            execs_per_sandbox: 2,
            token: Some("secret-token-value".to_string()),
            server_pid: None,
        }
    }

    #[test]
    fn report_counts_every_failure_and_hides_the_token() {
        let timings = ServerTimings {
            rootfs: 300.0,
            network: 5.0,
            vmm_start: 20.0,
            boot_to_ssh: 3000.0,
            total: 3330.0,
        };
        let ok = |index| Outcome {
            index,
            create_ms: Some(3340.0),
            server: Some(timings),
            exec_ms: vec![80.0, 90.0],
            destroy_ms: Some(40.0),
            cycle_ms: Some(3550.0),
            error: None,
        };
        let failed_exec = Outcome {
            index: 2,
            create_ms: Some(3360.0),
            server: Some(timings),
            exec_ms: vec![85.0],
            destroy_ms: Some(41.0),
            cycle_ms: None,
            error: Some("exec in sb-3: the command exited with 1".to_string()),
        };
        let failed_warmup = Outcome {
            index: 0,
            error: Some("create: HTTP 500 create_failed: boom".to_string()),
            ..Default::default()
        };
        let report = build_report(
            &options(),
            "qemu-tcg".to_string(),
            &[failed_warmup],
            &[ok(0), ok(1), failed_exec],
            12.0,
            None,
            false,
        );
        assert_eq!((report.iterations.ok, report.iterations.failed), (2, 1));
        assert_eq!(report.iterations.warmup_failed, 1);
        assert_eq!(report.errors.count, 2);
        assert!(report.errors.first[0].starts_with("iteration 0 (warmup): create"));
        assert!(report.errors.first[1].starts_with("iteration 2: exec"));
        assert_eq!(report.latency_ms.create.unwrap().n, 3);
        assert_eq!(report.latency_ms.exec.unwrap().n, 5);
        assert_eq!(report.latency_ms.cycle.unwrap().n, 2);
        assert_eq!(report.latency_ms.create_overhead.unwrap().p50, 340.0);
        assert_eq!(report.create_phases_ms.rootfs.unwrap().p50, 300.0);
        assert_eq!(report.flags["token"], "set");
        let text = serde_json::to_string(&report).unwrap();
        assert!(!text.contains("secret-token-value"), "{text}");
    }
}
