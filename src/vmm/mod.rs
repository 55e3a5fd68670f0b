//! Virtual machine monitors: one interface, two backends (Firecracker and QEMU microvm).
//!
//! Both boot the same uncompressed kernel and raw ext4 root disk, with one virtio-net device on
//! the sandbox's tap and the guest's address on the kernel command line. A VM's console goes to
//! `console.log` and the VMM's own messages to `vmm.log` in the sandbox's work directory.

pub mod firecracker;
pub mod host;
pub mod qemu;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::process::{Child, Command};

pub use host::{Backend, HostCaps};

/// Kernel arguments shared by every guest; the network part is appended per sandbox.
pub const BASE_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/sbin/manta-init";
/// File names inside a sandbox's work directory.
pub const CONSOLE_LOG: &str = "console.log";
pub const VMM_LOG: &str = "vmm.log";

/// Errors of starting or stopping a VM; each names the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM process could not be started.
    #[error("cannot start {bin} for sandbox {sandbox_id}: {source}")]
    Spawn {
        sandbox_id: String,
        bin: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A log file could not be created.
    #[error("cannot create {path} for sandbox {sandbox_id}: {source}")]
    LogFile {
        sandbox_id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Firecracker refused part of the configuration.
    #[error("Firecracker API {method} {path} for sandbox {sandbox_id} answered {status}: {body}")]
    Api {
        sandbox_id: String,
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    /// The Firecracker API socket could not be used.
    #[error("Firecracker API socket {socket} for sandbox {sandbox_id}: {reason}")]
    Socket {
        sandbox_id: String,
        socket: PathBuf,
        reason: String,
    },
    /// The VMM exited during start-up.
    #[error(
        "{bin} for sandbox {sandbox_id} exited during start-up ({status}); last log lines: {log_tail}"
    )]
    ExitedEarly {
        sandbox_id: String,
        bin: String,
        status: String,
        log_tail: String,
    },
}

/// Everything needed to boot one guest.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub sandbox_id: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub kernel: PathBuf,
    pub disk: PathBuf,
    pub tap: String,
    pub guest_mac: String,
    /// Full kernel command line.
    pub boot_args: String,
    /// The sandbox's own directory: logs and sockets go here.
    pub work_dir: PathBuf,
}

/// A configured monitor that can start VMs.
#[derive(Debug, Clone)]
pub struct Vmm {
    pub backend: Backend,
    pub bin: PathBuf,
    /// User QEMU drops to after opening its devices (`-runas`); `None` keeps root.
    pub run_as: Option<String>,
    /// Firecracker only: run it through the jailer.
    pub jail: Option<firecracker::Jail>,
}

impl Vmm {
    /// Starts the VM described by `spec`. Returns once the VMM runs the guest; the guest is
    /// still booting.
    pub async fn start(&self, spec: &VmSpec) -> Result<VmProcess, VmmError> {
        match self.backend {
            Backend::Firecracker => firecracker::start(&self.bin, spec, self.jail.as_ref()).await,
            Backend::QemuKvm => qemu::start(&self.bin, spec, true, self.run_as.as_deref()).await,
            Backend::QemuTcg => qemu::start(&self.bin, spec, false, self.run_as.as_deref()).await,
        }
    }
}

/// A running VMM process: either our child, or one adopted from an earlier server run.
#[derive(Debug)]
pub struct VmProcess {
    pub pid: u32,
    child: Mutex<Option<Child>>,
}

impl VmProcess {
    fn from_child(child: Child) -> Option<VmProcess> {
        let pid = child.id()?;
        Some(VmProcess {
            pid,
            child: Mutex::new(Some(child)),
        })
    }

    /// Takes over a VMM started by an earlier server, if `pid` still runs a VMM whose command
    /// line names sandbox `marker`, so a reused pid is never touched.
    pub fn adopt(pid: u32, marker: &str) -> Option<VmProcess> {
        process_matches(pid, marker).then(|| VmProcess {
            pid,
            child: Mutex::new(None),
        })
    }

    /// True while the VMM process runs (an exited child is reaped here).
    pub fn is_alive(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => pid_alive(self.pid),
        }
    }

    /// The exit status, if the process was our child and has exited.
    pub fn exit_status(&self) -> Option<String> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let status = child.as_mut()?.try_wait().ok()??;
        Some(status.to_string())
    }

    /// Kills the VMM and waits until it is gone (at most `timeout`). Returns true if gone.
    pub async fn kill(&self, timeout: Duration) -> bool {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        match child {
            Some(mut child) => {
                let _ = child.start_kill();
                let gone = tokio::time::timeout(timeout, child.wait()).await.is_ok();
                if !gone {
                    *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
                }
                gone
            }
            None => {
                if pid_alive(self.pid) {
                    // SAFETY: kill(2) with a pid we verified to be our VMM at adoption time.
                    unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
                }
                let deadline = tokio::time::Instant::now() + timeout;
                while !released(self.pid) {
                    if tokio::time::Instant::now() > deadline {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                true
            }
        }
    }
}

/// Spawns a VMM process in its own process group (so a Ctrl-C aimed at the server does not
/// reach it), with stdout and stderr sent to files.
fn spawn(
    bin: &Path,
    args: &[String],
    stdout: File,
    stderr: File,
    sandbox_id: &str,
) -> Result<Child, VmmError> {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|source| VmmError::Spawn {
            sandbox_id: sandbox_id.to_string(),
            bin: bin.to_path_buf(),
            source,
        })
}

fn create_log(spec: &VmSpec, name: &str) -> Result<File, VmmError> {
    let path = spec.work_dir.join(name);
    File::create(&path).map_err(|source| VmmError::LogFile {
        sandbox_id: spec.sandbox_id.clone(),
        path,
        source,
    })
}

/// The last `max` bytes of a log, on one line, for error messages.
pub fn log_tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("({} missing)", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let joined: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if joined.is_empty() {
        "(empty)".to_string()
    } else {
        joined.join(" | ")
    }
}

fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie ('Z') has exited; it only waits for its parent to reap it.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// True once `pid` has let go of everything it held: it is gone, or it is a zombie with no
/// threads left. (A zombie thread-group leader can still have threads exiting, and those
/// hold the shared file table, and so the tap, until they are done.)
fn released(pid: u32) -> bool {
    if pid_alive(pid) {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| tasks.count() <= 1)
        .unwrap_or(true)
}

/// True if `pid` is a live VMM process (QEMU, or Firecracker, also when started by the
/// jailer) whose command line contains `marker` (a sandbox id). Both backends put the id on
/// their command line (`-name manta-<id>`, `--id <id>`), so a reused pid is never mistaken for
/// a sandbox's VMM.
pub fn process_matches(pid: u32, marker: &str) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !(comm.starts_with("qemu-system") || comm.starts_with("firecracker")) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    String::from_utf8_lossy(&cmdline)
        .replace('\0', " ")
        .contains(marker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_is_one_line() {
        let dir = std::env::temp_dir().join(format!("manta-logtail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("x.log");
        std::fs::write(&log, "first\n\nsecond line\nthird\n").unwrap();
        assert_eq!(log_tail(&log, 1000), "first | second line | third");
        assert_eq!(log_tail(&log, 6), "third");
        assert!(log_tail(&dir.join("nope"), 10).contains("missing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_vmm_processes_match() {
        let me = std::process::id();
        assert!(pid_alive(me));
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap();
        assert!(
            !process_matches(me, name),
            "a test binary is not a VMM, whatever its cmdline"
        );
        assert!(!pid_alive(u32::MAX / 2));
        assert!(!process_matches(u32::MAX / 2, "sb-"));
    }
}
