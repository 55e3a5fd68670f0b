//! The JSON document of one benchmark run, and its table on stderr.
//!
//! `manta-bench` and `bench/baseline.sh` write the same shape (`kind` tells them apart), so
//! `manta-bench compare` reads both with the types below. Every latency is in milliseconds.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::stats::Summary;
use crate::vmm::HostCaps;

/// Version of this document's shape; bump it when a field changes meaning.
pub const SCHEMA: &str = "manta-bench/1";
/// `kind` of a document written by `manta-bench`.
pub const KIND_MANTA: &str = "manta";
/// `kind` of a document written by `bench/baseline.sh`.
pub const KIND_BASELINE: &str = "baseline";

/// One run, as written to stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub kind: String,
    /// UTC, RFC 3339, when the run ended.
    pub timestamp: String,
    /// `git rev-parse --short HEAD` of the working directory, or "unknown".
    pub git_rev: String,
    /// Whether tracked files differed from `git_rev` (`None` when git could not tell).
    #[serde(default)]
    pub git_dirty: Option<bool>,
    /// The backend that ran the guests ("qemu-tcg", "firecracker", ...).
    pub vmm: String,
    pub host: HostInfo,
    /// The flags (bench) or settings (baseline) the run used; never a secret.
    pub flags: serde_json::Value,
    /// Wall time of the measured part of the run, in seconds.
    pub wall_s: f64,
    pub iterations: IterationCounts,
    pub latency_ms: Latency,
    /// The server's own split of create (for the baseline: the same phases done by hand).
    pub create_phases_ms: CreatePhases,
    pub errors: ErrorReport,
    /// The server process's memory during the run, when `--server-pid` was given.
    #[serde(default)]
    pub server_memory: Option<ServerMemory>,
    /// The run was stopped early (Ctrl-C); the figures cover what finished.
    #[serde(default)]
    pub interrupted: bool,
    /// Every sample behind `latency_ms`, in completion order, for later analysis.
    #[serde(default)]
    pub samples_ms: Samples,
}

/// Facts about the machine the run happened on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    /// CPUs this process may run on.
    pub cores: usize,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// What KVM offers standard guests: "vmx" or "svm" (hardware), "pvm" (the paravirtual
    /// kvm_pvm module, which standard guests cannot use), or "none".
    pub kvm: String,
    pub cpu_model: String,
    pub mem_total_mib: u64,
}

/// How many iterations were asked for and how they ended.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IterationCounts {
    pub requested: usize,
    pub ok: usize,
    pub failed: usize,
    /// Warm-up iterations run before the measured ones (not in any figure).
    pub warmup: usize,
    pub warmup_failed: usize,
}

/// Client-side wall time of each step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub create: Option<Summary>,
    pub exec: Option<Summary>,
    pub destroy: Option<Summary>,
    /// create + every exec + destroy, for iterations where all of them succeeded.
    pub cycle: Option<Summary>,
    /// Create wall time minus the server's boot_to_ssh: what Manta itself adds to a boot.
    pub create_overhead: Option<Summary>,
}

/// The phases of create as the server timed them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreatePhases {
    pub rootfs: Option<Summary>,
    pub network: Option<Summary>,
    pub vmm_start: Option<Summary>,
    pub boot_to_ssh: Option<Summary>,
    pub total: Option<Summary>,
}

/// Failures: how many, and the first few messages.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrorReport {
    pub count: usize,
    pub first: Vec<String>,
}

/// The server's resident memory, sampled from `/proc/<pid>/status` during the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerMemory {
    pub pid: u32,
    pub samples: usize,
    /// VmRSS before the run's first request.
    pub idle_rss_kib: u64,
    /// Highest VmRSS sampled during the run.
    pub peak_rss_kib: u64,
    /// VmHWM at the end: the kernel's peak RSS over the process's whole life, which also
    /// catches spikes between samples.
    pub hwm_kib: u64,
    /// Most sandboxes this run had live at once.
    pub max_live_sandboxes: usize,
    /// (max(peak, HWM) − idle) / max live sandboxes: an upper bound of what one live sandbox
    /// costs the server, since it also counts allocator caches and in-flight request buffers.
    pub per_live_sandbox_kib: Option<f64>,
    /// Why sampling stopped early, if it did.
    #[serde(default)]
    pub note: Option<String>,
}

impl ServerMemory {
    /// The peak to hold against a target: the higher of sampled VmRSS and VmHWM.
    pub fn peak_kib(&self) -> u64 {
        self.peak_rss_kib.max(self.hwm_kib)
    }
}

/// Raw samples, milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Samples {
    pub create: Vec<f64>,
    pub exec: Vec<f64>,
    pub destroy: Vec<f64>,
    pub cycle: Vec<f64>,
    pub create_overhead: Vec<f64>,
}

impl HostInfo {
    /// Reads the facts from this machine.
    pub fn probe() -> HostInfo {
        let caps = HostCaps::probe(
            Path::new("firecracker"),
            Path::new("qemu-system-x86_64"),
            None,
        );
        let kvm = match (&caps.hw_virt, caps.kvm_device, caps.pvm) {
            (Some(flag), true, _) => flag.clone(),
            (_, true, true) => "pvm".to_string(),
            _ => "none".to_string(),
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        HostInfo {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".to_string()),
            kvm,
            cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".to_string()),
            mem_total_mib: field(&meminfo, "MemTotal")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kib| kib / 1024),
        }
    }
}

/// The value of the first `name: value` line in a /proc text file.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == name).then(|| value.trim().to_string())
    })
}

/// The short git revision of the working directory and whether tracked files were changed.
pub fn git_revision() -> (String, Option<bool>) {
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let Some(rev) = run(&["rev-parse", "--short", "HEAD"]).filter(|r| !r.is_empty()) else {
        return ("unknown".to_string(), None);
    };
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    (rev, dirty)
}

/// Now, as RFC 3339 UTC with second precision.
pub fn timestamp_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339_utc(secs)
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian).
pub fn rfc3339_utc(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let rem = unix_s % 86_400;
    // Civil date from a day count, after Howard Hinnant's `civil_from_days`: shift the epoch
    // to 0000-03-01 so leap days fall at the end of a 400-year era.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Report {
    /// The human-readable table for stderr.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let flag = |name: &str| {
            self.flags
                .get(name)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".to_string())
        };
        let _ = writeln!(
            out,
            "{}: {} iterations ({} ok, {} failed{}), concurrency {}, cmd {}, {} exec(s) per \
             sandbox, vmm {}, {:.1} s",
            self.kind,
            self.iterations.requested,
            self.iterations.ok,
            self.iterations.failed,
            if self.interrupted {
                ", interrupted"
            } else {
                ""
            },
            flag("concurrency"),
            flag("cmd"),
            flag("execs_per_sandbox"),
            self.vmm,
            self.wall_s,
        );
        let _ = writeln!(
            out,
            "{:<36} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "ms", "n", "min", "p50", "p95", "p99", "max"
        );
        let rows: [(&str, Option<Summary>); 10] = [
            ("create", self.latency_ms.create),
            ("exec", self.latency_ms.exec),
            ("destroy", self.latency_ms.destroy),
            ("cycle", self.latency_ms.cycle),
            (
                "create phases (server): rootfs",
                self.create_phases_ms.rootfs,
            ),
            ("  network", self.create_phases_ms.network),
            ("  vmm_start", self.create_phases_ms.vmm_start),
            ("  boot_to_ssh", self.create_phases_ms.boot_to_ssh),
            ("  total", self.create_phases_ms.total),
            (
                "create overhead (wall - boot_to_ssh)",
                self.latency_ms.create_overhead,
            ),
        ];
        for (label, summary) in rows {
            let _ = match summary {
                Some(s) => writeln!(
                    out,
                    "{label:<36} {:>5} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                    s.n, s.min, s.p50, s.p95, s.p99, s.max
                ),
                None => writeln!(out, "{label:<36} {:>5} (no successful samples)", 0),
            };
        }
        if let Some(mem) = &self.server_memory {
            let per = mem
                .per_live_sandbox_kib
                .map_or("n/a".to_string(), |kib| format!("{:.2} MiB", kib / 1024.0));
            let _ = writeln!(
                out,
                "server RSS (pid {}): idle {:.1} MiB, peak {:.1} MiB (VmHWM {:.1} MiB), \
                 max live {}, per live sandbox <= {per}{}",
                mem.pid,
                mem.idle_rss_kib as f64 / 1024.0,
                mem.peak_rss_kib as f64 / 1024.0,
                mem.hwm_kib as f64 / 1024.0,
                mem.max_live_sandboxes,
                mem.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default(),
            );
        }
        let _ = writeln!(out, "errors: {}", self.errors.count);
        for message in &self.errors.first {
            let _ = writeln!(out, "  {message}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let cases = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (4_107_542_399, "2100-02-28T23:59:59Z"),
        ];
        for (secs, want) in cases {
            assert_eq!(rfc3339_utc(secs), want, "{secs}");
        }
    }

    #[test]
    fn proc_fields() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC\nMemTotal:       24684172 kB\n";
        assert_eq!(field(text, "model name").as_deref(), Some("AMD EPYC"));
        assert_eq!(field(text, "MemTotal").as_deref(), Some("24684172 kB"));
        assert_eq!(field(text, "flags"), None);
    }

    #[test]
    fn table_names_every_step_and_the_errors() {
        let summary = Summary::of(&[1.0, 2.0, 3.0]);
        let report = Report {
            schema: SCHEMA.to_string(),
            kind: KIND_MANTA.to_string(),
            timestamp: rfc3339_utc(0),
            git_rev: "abc1234".to_string(),
            git_dirty: Some(false),
            vmm: "qemu-tcg".to_string(),
            host: HostInfo {
                cores: 2,
                kernel: "6.1".to_string(),
                kvm: "none".to_string(),
                cpu_model: "test".to_string(),
                mem_total_mib: 1024,
            },
            flags: serde_json::json!({"concurrency": 1, "cmd": "true", "execs_per_sandbox": 1}),
            wall_s: 1.0,
            iterations: IterationCounts {
                requested: 3,
                ok: 2,
                failed: 1,
                ..Default::default()
            },
            latency_ms: Latency {
                create: summary,
                ..Default::default()
            },
            create_phases_ms: CreatePhases::default(),
            errors: ErrorReport {
                count: 1,
                first: vec!["iteration 2: create: HTTP 500".to_string()],
            },
            server_memory: None,
            interrupted: false,
            samples_ms: Samples::default(),
        };
        let table = report.table();
        for part in [
            "3 iterations (2 ok, 1 failed)",
            "create ",
            "exec ",
            "boot_to_ssh",
            "create overhead",
            "errors: 1",
            "HTTP 500",
        ] {
            assert!(table.contains(part), "{part:?} missing from\n{table}");
        }
        let back: Report = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(back.latency_ms.create, summary);
    }
}
