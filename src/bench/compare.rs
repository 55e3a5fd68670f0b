//! `manta-bench compare`: Manta's figures against the hand-run baseline, and the targets.
//!
//! The documents are told apart by what they say about themselves, so their order on the
//! command line does not matter: the baseline is the one of kind "baseline"; create figures
//! come from the first concurrency-1 run; the exec ratio from a concurrency-1 run of `true`
//! (the baseline's command); the concurrency target from a `--concurrency 4 --iterations 40`
//! run; memory from every run that sampled the server.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::report::{KIND_BASELINE, KIND_MANTA, Report};
use super::stats::Summary;

/// Manta's own create overhead (create wall − boot_to_ssh), p50 and p99, in ms.
pub const OVERHEAD_P50_MAX_MS: f64 = 10.0;
pub const OVERHEAD_P99_MAX_MS: f64 = 30.0;
/// Exec of `true` through Manta, p50, relative to a raw SSH ControlMaster exec.
pub const EXEC_RATIO_MAX: f64 = 1.2;
/// The concurrency run the target names: workers and iterations.
pub const CONCURRENCY_RUN: (u64, u64) = (4, 40);
/// Server memory limits, KiB.
pub const PEAK_RSS_MAX_KIB: f64 = 64.0 * 1024.0;
pub const PER_SANDBOX_MAX_KIB: f64 = 1024.0;

/// Inputs that cannot be compared; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is not a benchmark document.
    #[error("{path} is not a manta-bench or baseline document: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A document of a kind this program does not know.
    #[error("{path} has kind {kind:?}; expected \"manta\" or \"baseline\"")]
    Kind { path: String, kind: String },
    /// No baseline, or more than one.
    #[error("expected exactly one baseline document (kind \"baseline\"), got {0}")]
    Baselines(usize),
    /// No manta-bench document.
    #[error("no manta-bench document (kind \"manta\") among the inputs")]
    NoRun,
}

/// A document and the file it came from.
#[derive(Debug, Clone)]
pub struct Labeled {
    pub path: String,
    pub report: Report,
}

/// Reads the files and renders the comparison.
pub fn compare_files(paths: &[PathBuf]) -> Result<String, CompareError> {
    let docs = paths
        .iter()
        .map(|path| load(path))
        .collect::<Result<Vec<_>, _>>()?;
    render(&docs)
}

fn load(path: &Path) -> Result<Labeled, CompareError> {
    let text = std::fs::read_to_string(path).map_err(|source| CompareError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let report = serde_json::from_str(&text).map_err(|source| CompareError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Labeled {
        path: path.display().to_string(),
        report,
    })
}

/// The comparison text.
pub fn render(docs: &[Labeled]) -> Result<String, CompareError> {
    for doc in docs {
        if doc.report.kind != KIND_MANTA && doc.report.kind != KIND_BASELINE {
            return Err(CompareError::Kind {
                path: doc.path.clone(),
                kind: doc.report.kind.clone(),
            });
        }
    }
    let baselines: Vec<&Labeled> = docs
        .iter()
        .filter(|d| d.report.kind == KIND_BASELINE)
        .collect();
    let [baseline] = baselines[..] else {
        return Err(CompareError::Baselines(baselines.len()));
    };
    let runs: Vec<&Labeled> = docs
        .iter()
        .filter(|d| d.report.kind == KIND_MANTA)
        .collect();
    let create_run = runs
        .iter()
        .find(|d| flag_u64(d, "concurrency") == Some(1) && d.report.latency_ms.create.is_some())
        .or(runs.first())
        .copied()
        .ok_or(CompareError::NoRun)?;
    let exec_run = runs
        .iter()
        .find(|d| {
            flag_str(d, "cmd") == Some("true")
                && flag_u64(d, "concurrency") == Some(1)
                && d.report.latency_ms.exec.is_some()
        })
        .copied();
    let concurrency_run = runs
        .iter()
        .find(|d| {
            (flag_u64(d, "concurrency"), flag_u64(d, "iterations"))
                == (Some(CONCURRENCY_RUN.0), Some(CONCURRENCY_RUN.1))
        })
        .copied();

    let mut out = String::new();
    let _ = writeln!(out, "Manta vs the hand-run baseline");
    describe_sources(&mut out, baseline, &runs);
    let _ = writeln!(out);
    figures(&mut out, docs);
    let _ = writeln!(out);
    ratios(&mut out, baseline, create_run, exec_run);
    let _ = writeln!(out);
    let _ = writeln!(out, "targets");
    targets(
        &mut out,
        baseline,
        create_run,
        exec_run,
        concurrency_run,
        &runs,
    );
    Ok(out)
}

fn describe_sources(out: &mut String, baseline: &Labeled, runs: &[&Labeled]) {
    let b = &baseline.report;
    let _ = writeln!(
        out,
        "  baseline {}: {} by hand, {} boots, {} execs, {} failures ({}, rev {}{})",
        baseline.path,
        b.vmm,
        b.latency_ms.create.map_or(0, |s| s.n),
        b.latency_ms.exec.map_or(0, |s| s.n),
        b.errors.count,
        b.timestamp,
        b.git_rev,
        changes(b),
    );
    for run in runs {
        let r = &run.report;
        let _ = writeln!(
            out,
            "  run {}: {} {}/{} ok, concurrency {}, cmd {}, {} exec(s) each{} ({}, rev {}{})",
            run.path,
            r.vmm,
            r.iterations.ok,
            r.iterations.requested,
            r.flags.get("concurrency").unwrap_or(&Value::Null),
            r.flags.get("cmd").unwrap_or(&Value::Null),
            r.flags.get("execs_per_sandbox").unwrap_or(&Value::Null),
            if r.interrupted { ", INTERRUPTED" } else { "" },
            r.timestamp,
            r.git_rev,
            changes(r),
        );
        let (h, bh) = (&r.host, &b.host);
        if (h.cores, &h.kernel, &h.kvm) != (bh.cores, &bh.kernel, &bh.kvm) || r.vmm != b.vmm {
            let _ = writeln!(
                out,
                "    warning: not the same host setup as the baseline ({} cores, {}, kvm {}, \
                 {} vs {} cores, {}, kvm {}, {}); ratios compare different machines",
                h.cores, h.kernel, h.kvm, r.vmm, bh.cores, bh.kernel, bh.kvm, b.vmm
            );
        }
    }
    let h = &baseline.report.host;
    let _ = writeln!(
        out,
        "  host: {} cores ({}), kernel {}, KVM for standard guests: {}",
        h.cores, h.cpu_model, h.kernel, h.kvm
    );
}

/// p50 / p95 of each step, per document.
fn figures(out: &mut String, docs: &[Labeled]) {
    let _ = writeln!(
        out,
        "{:<32} {:>17} {:>17} {:>17} {:>17} {:>6}",
        "p50 / p95 ms", "create", "exec", "destroy", "overhead p50/p99", "errors"
    );
    let pair =
        |s: Option<Summary>| s.map_or("-".to_string(), |s| format!("{:.1} / {:.1}", s.p50, s.p95));
    for doc in docs {
        let l = &doc.report.latency_ms;
        let name = Path::new(&doc.path)
            .file_name()
            .map_or(doc.path.clone(), |n| n.to_string_lossy().into_owned());
        let _ = writeln!(
            out,
            "{name:<32} {:>17} {:>17} {:>17} {:>17} {:>6}",
            pair(l.create),
            pair(l.exec),
            pair(l.destroy),
            l.create_overhead
                .map_or("-".to_string(), |s| format!("{:.1} / {:.1}", s.p50, s.p99)),
            doc.report.errors.count,
        );
    }
}

fn ratios(out: &mut String, baseline: &Labeled, create_run: &Labeled, exec_run: Option<&Labeled>) {
    let b = &baseline.report.latency_ms;
    let r = &create_run.report;
    let _ = writeln!(out, "{:<44} {:>28} {:>28}", "ratio (ms / ms)", "p50", "p95");
    ratio_row(
        out,
        "Manta create / hand boot",
        r.latency_ms.create,
        b.create,
    );
    ratio_row(
        out,
        "Manta boot_to_ssh / hand boot",
        r.create_phases_ms.boot_to_ssh,
        b.create,
    );
    match exec_run {
        Some(run) => ratio_row(
            out,
            "Manta exec `true` / raw SSH exec `true`",
            run.report.latency_ms.exec,
            b.exec,
        ),
        None => {
            let _ = writeln!(
                out,
                "Manta exec `true` / raw SSH exec: not measured (no concurrency-1 run with \
                 --cmd true)"
            );
        }
    }
    if let (Some(create), Some(boot)) = (r.latency_ms.create, b.create) {
        let rootfs = r.create_phases_ms.rootfs.map_or(0.0, |s| s.p50);
        let _ = writeln!(
            out,
            "  Manta create p50 is {:+.1} ms from the hand boot p50 (Manta's rootfs copy p50 is \
             {rootfs:.1} ms; the hand boot's copy is done before its clock starts)",
            create.p50 - boot.p50
        );
    }
}

fn ratio_row(out: &mut String, label: &str, manta: Option<Summary>, base: Option<Summary>) {
    let cell = |m: Option<f64>, b: Option<f64>| match (m, b) {
        (Some(m), Some(b)) if b > 0.0 => format!("{m:.1} / {b:.1} = {:.3}x", m / b),
        _ => "n/a".to_string(),
    };
    let _ = writeln!(
        out,
        "{label:<44} {:>28} {:>28}",
        cell(manta.map(|s| s.p50), base.map(|s| s.p50)),
        cell(manta.map(|s| s.p95), base.map(|s| s.p95)),
    );
}

fn targets(
    out: &mut String,
    baseline: &Labeled,
    create_run: &Labeled,
    exec_run: Option<&Labeled>,
    concurrency_run: Option<&Labeled>,
    runs: &[&Labeled],
) {
    let overhead = create_run.report.latency_ms.create_overhead;
    let source = |run: &Labeled| format!(" [{}]", run.path);
    limit_line(
        out,
        &format!("create overhead p50 <= {OVERHEAD_P50_MAX_MS} ms"),
        overhead.map(|s| s.p50),
        OVERHEAD_P50_MAX_MS,
        "ms",
        &source(create_run),
    );
    limit_line(
        out,
        &format!("create overhead p99 <= {OVERHEAD_P99_MAX_MS} ms"),
        overhead.map(|s| s.p99),
        OVERHEAD_P99_MAX_MS,
        "ms",
        &source(create_run),
    );

    let exec_ratio = exec_run.and_then(|run| {
        let manta = run.report.latency_ms.exec?.p50;
        let raw = baseline.report.latency_ms.exec?.p50;
        (raw > 0.0).then(|| manta / raw)
    });
    limit_line(
        out,
        &format!("exec `true` p50 <= {EXEC_RATIO_MAX} x raw SSH"),
        exec_ratio,
        EXEC_RATIO_MAX,
        "x",
        &exec_run.map(source).unwrap_or_default(),
    );

    let label = format!(
        "--concurrency {} --iterations {} with 0 errors",
        CONCURRENCY_RUN.0, CONCURRENCY_RUN.1
    );
    match concurrency_run {
        None => {
            let _ = writeln!(out, "  n/a    {label}: not measured (no such run)");
        }
        Some(run) => {
            let r = &run.report;
            let clean = r.errors.count == 0
                && !r.interrupted
                && r.iterations.ok as u64 == CONCURRENCY_RUN.1;
            let verdict = if clean { "met   " } else { "MISSED" };
            let _ = writeln!(
                out,
                "  {verdict} {label}: {} errors, {}/{} iterations ok{}{}",
                r.errors.count,
                r.iterations.ok,
                r.iterations.requested,
                if r.interrupted { ", interrupted" } else { "" },
                source(run),
            );
            for message in &r.errors.first {
                let _ = writeln!(out, "           {message}");
            }
        }
    }

    let sampled: Vec<_> = runs
        .iter()
        .filter_map(|run| run.report.server_memory.as_ref())
        .collect();
    let peak = sampled.iter().map(|m| m.peak_kib()).max();
    let idle = sampled.iter().map(|m| m.idle_rss_kib).min();
    let max_live = sampled.iter().map(|m| m.max_live_sandboxes).max();
    limit_line(
        out,
        "server peak RSS <= 64 MiB",
        peak.map(|kib| kib as f64 / 1024.0),
        PEAK_RSS_MAX_KIB / 1024.0,
        "MiB",
        " [max of sampled VmRSS and VmHWM over all runs]",
    );
    let per_sandbox = match (peak, idle, max_live) {
        (Some(peak), Some(idle), Some(live)) if live > 0 => {
            Some(peak.saturating_sub(idle) as f64 / live as f64 / 1024.0)
        }
        _ => None,
    };
    limit_line(
        out,
        "server memory per live sandbox <= 1 MiB",
        per_sandbox,
        PER_SANDBOX_MAX_KIB / 1024.0,
        "MiB",
        &format!(
            " [(peak {} - idle {}) / {} live at most; an upper bound]",
            peak.map_or("?".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            idle.map_or("?".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            max_live.map_or("?".to_string(), |n| n.to_string()),
        ),
    );
}

/// One "value <= limit" target: met with how much to spare, or missed by how much.
fn limit_line(
    out: &mut String,
    label: &str,
    value: Option<f64>,
    limit: f64,
    unit: &str,
    source: &str,
) {
    let space = if unit == "x" { "" } else { " " };
    let Some(value) = value else {
        let _ = writeln!(out, "  n/a    {label}: not measured{source}");
        return;
    };
    if value <= limit {
        let _ = writeln!(
            out,
            "  met    {label}: {value:.2}{space}{unit}, {:.2}{space}{unit} under the limit{source}",
            limit - value
        );
    } else {
        let _ = writeln!(
            out,
            "  MISSED {label}: {value:.2}{space}{unit}, over by {:.2}{space}{unit} ({:.1}x the \
             limit){source}",
            value - limit,
            value / limit
        );
    }
}

/// Marks a revision whose tracked files had local changes when it was measured.
fn changes(report: &Report) -> &'static str {
    if report.git_dirty == Some(true) {
        "+changes"
    } else {
        ""
    }
}

fn flag_u64(doc: &Labeled, name: &str) -> Option<u64> {
    doc.report.flags.get(name)?.as_u64()
}

fn flag_str<'a>(doc: &'a Labeled, name: &str) -> Option<&'a str> {
    doc.report.flags.get(name)?.as_str()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::bench::report::{
        CreatePhases, ErrorReport, HostInfo, IterationCounts, Latency, SCHEMA, Samples,
        ServerMemory,
    };

    fn summary(p50: f64, p95: f64, p99: f64) -> Option<Summary> {
        Some(Summary {
            n: 10,
            min: p50,
            p50,
            p95,
            p99,
            max: p99,
            mean: p50,
        })
    }

    fn doc(path: &str, kind: &str, flags: Value) -> Labeled {
        Labeled {
            path: path.to_string(),
            report: Report {
                schema: SCHEMA.to_string(),
                kind: kind.to_string(),
                timestamp: "2025-01-01T00:00:00Z".to_string(),
                git_rev: "abc".to_string(),
                git_dirty: None,
                vmm: "qemu-tcg".to_string(),
                host: HostInfo {
                    cores: 2,
                    kernel: "6.1".to_string(),
                    kvm: "pvm".to_string(),
                    cpu_model: "test".to_string(),
                    mem_total_mib: 1024,
                },
                flags,
                wall_s: 1.0,
                iterations: IterationCounts {
                    requested: 40,
                    ok: 40,
                    ..Default::default()
                },
                latency_ms: Latency::default(),
                create_phases_ms: CreatePhases::default(),
                errors: ErrorReport::default(),
                server_memory: None,
                interrupted: false,
                samples_ms: Samples::default(),
            },
        }
    }

    fn memory(idle: u64, peak: u64, live: usize) -> Option<ServerMemory> {
        Some(ServerMemory {
            pid: 1,
            samples: 10,
            idle_rss_kib: idle,
            peak_rss_kib: peak,
            hwm_kib: peak,
            max_live_sandboxes: live,
            per_live_sandbox_kib: None,
            note: None,
        })
    }

    fn inputs() -> Vec<Labeled> {
        let mut baseline = doc("baseline.json", KIND_BASELINE, json!({}));
        baseline.report.latency_ms.create = summary(3000.0, 3200.0, 3300.0);
        baseline.report.latency_ms.exec = summary(70.0, 80.0, 90.0);

        let mut main = doc(
            "main.json",
            KIND_MANTA,
            json!({"concurrency": 1, "iterations": 50, "cmd": "echo hello"}),
        );
        main.report.latency_ms.create = summary(3300.0, 3500.0, 3600.0);
        main.report.latency_ms.create_overhead = summary(305.0, 320.0, 340.0);
        main.report.create_phases_ms.boot_to_ssh = summary(2995.0, 3180.0, 3260.0);
        main.report.server_memory = memory(8 * 1024, 12 * 1024, 1);

        let mut exec = doc(
            "true.json",
            KIND_MANTA,
            json!({"concurrency": 1, "iterations": 10, "cmd": "true"}),
        );
        exec.report.latency_ms.exec = summary(77.0, 88.0, 95.0);

        let mut c4 = doc(
            "c4.json",
            KIND_MANTA,
            json!({"concurrency": 4, "iterations": 40, "cmd": "echo hello"}),
        );
        c4.report.iterations.ok = 39;
        c4.report.iterations.failed = 1;
        c4.report.errors = ErrorReport {
            count: 1,
            first: vec!["iteration 7: create: HTTP 500 boot_timeout: slow".to_string()],
        };
        c4.report.server_memory = memory(10 * 1024, 14 * 1024, 4);
        vec![c4, exec, baseline, main]
    }

    #[test]
    fn verdicts_say_by_how_much() {
        let text = render(&inputs()).unwrap();
        assert!(text.contains("3300.0 / 3000.0 = 1.100x"), "{text}");
        assert!(text.contains("77.0 / 70.0 = 1.100x"), "{text}");
        assert!(
            text.contains(
                "MISSED create overhead p50 <= 10 ms: 305.00 ms, over by 295.00 ms (30.5x the \
                 limit) [main.json]"
            ),
            "{text}"
        );
        assert!(
            text.contains("met    exec `true` p50 <= 1.2 x raw SSH: 1.10x, 0.10x under"),
            "{text}"
        );
        assert!(
            text.contains("MISSED --concurrency 4 --iterations 40 with 0 errors: 1 errors, 39/40"),
            "{text}"
        );
        assert!(text.contains("boot_timeout: slow"), "{text}");
        assert!(
            text.contains("met    server peak RSS <= 64 MiB: 14.00 MiB"),
            "{text}"
        );
        // (14 MiB peak - 8 MiB freshest idle) / 4 live at most = 1.5 MiB.
        assert!(
            text.contains("MISSED server memory per live sandbox <= 1 MiB: 1.50 MiB"),
            "{text}"
        );
    }

    #[test]
    fn missing_runs_are_not_measured_rather_than_passed() {
        let docs: Vec<Labeled> = inputs()
            .into_iter()
            .filter(|d| d.path == "baseline.json" || d.path == "main.json")
            .collect();
        let text = render(&docs).unwrap();
        assert!(text.contains("n/a    exec `true`"), "{text}");
        assert!(text.contains("n/a    --concurrency 4"), "{text}");
        assert!(!text.contains("met    exec"), "{text}");
    }

    #[test]
    fn inputs_must_hold_one_baseline_and_a_run() {
        let all = inputs();
        let no_baseline: Vec<Labeled> = all
            .iter()
            .filter(|d| d.report.kind == KIND_MANTA)
            .cloned()
            .collect();
        assert!(matches!(
            render(&no_baseline),
            Err(CompareError::Baselines(0))
        ));
        let only_baseline: Vec<Labeled> = all
            .iter()
            .filter(|d| d.report.kind == KIND_BASELINE)
            .cloned()
            .collect();
        assert!(matches!(render(&only_baseline), Err(CompareError::NoRun)));
        let mut odd = all.clone();
        odd[0].report.kind = "other".to_string();
        assert!(matches!(render(&odd), Err(CompareError::Kind { .. })));
    }
}
