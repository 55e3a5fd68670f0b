//! Sandbox lifecycle: create, exec, destroy; the registry of live sandboxes; their records on
//! disk; and the start-up reconcile that re-adopts or cleans what an earlier run left.
//!
//! Every step of create is undone by the same idempotent teardown that destroy uses, so a
//! failure at any point leaves nothing behind.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, info_span, warn};

use crate::config::Config;
use crate::guest::{ExecOutput, ExecRequest, GuestError, GuestKeys, GuestSession};
use crate::network::firewall::{Firewall, FirewallError};
use crate::network::tap::{TapDevice, TapError};
use crate::network::{AddressPool, Slot, TAP_PREFIX};
use crate::rootfs::{DiskPool, RootfsError};
use crate::vmm::{
    BASE_BOOT_ARGS, Backend, CONSOLE_LOG, VmProcess, VmSpec, Vmm, VmmError, log_tail,
};

/// Guest SSH port.
const SSH_PORT: u16 = 22;
/// How long a VMM gets to die after SIGKILL before teardown reports it.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Record file inside each sandbox directory.
const RECORD_FILE: &str = "sandbox.json";
/// Per-sandbox disk file name.
const DISK_FILE: &str = "rootfs.ext4";
/// Commands one sandbox runs at once (one SSH channel each). Under emulation, 50-60
/// simultaneous channels on one dropbear connection sometimes lost a few of them; the rest
/// queue.
const PARALLEL_EXECS: usize = 16;
/// How often a running exec checks that the VM process still lives.
const VM_WATCH_INTERVAL: Duration = Duration::from_millis(200);
/// How long re-adoption waits for a surviving guest's SSH at start.
const ADOPT_SSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the lifecycle; each names the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No live sandbox has this id.
    #[error("no sandbox with id {0:?}")]
    NotFound(String),
    /// The sandbox exists but is not in a state that allows the operation.
    #[error("sandbox {id} is {state}, so it cannot {operation} now")]
    WrongState {
        id: String,
        state: &'static str,
        operation: &'static str,
    },
    /// The configured limit of live sandboxes is reached.
    #[error(
        "capacity reached: {live} of {max} sandboxes are live (MANTA_MAX_SANDBOXES); destroy one and retry"
    )]
    AtCapacity { live: usize, max: usize },
    /// Every guest address is in use.
    #[error("the guest address pool is exhausted; destroy a sandbox and retry")]
    PoolExhausted,
    /// The server is shutting down.
    #[error("the server is shutting down and accepts no new work")]
    ShuttingDown,
    /// A step of create failed; everything made before it was undone.
    #[error("creating sandbox {id} failed at step {step}: {reason}")]
    CreateFailed {
        id: String,
        step: &'static str,
        reason: String,
    },
    /// The guest did not answer SSH before the boot timeout; everything was undone.
    #[error(
        "sandbox {id} did not answer SSH within {timeout_s} s; it was torn down (console: {console})"
    )]
    BootTimeout {
        id: String,
        timeout_s: u64,
        console: String,
    },
    /// Running a command failed (not: the command failed, which is a normal result).
    #[error("exec in sandbox {id} failed: {reason}")]
    ExecFailed { id: String, reason: String },
    /// The sandbox was destroyed while the exec ran.
    #[error("sandbox {0} was destroyed while the command ran")]
    DestroyedDuringExec(String),
    /// Teardown could not remove everything.
    #[error("destroying sandbox {id} left {leftover}")]
    TeardownIncomplete { id: String, leftover: String },
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Creating,
    Running,
    Destroying,
}

impl SandboxState {
    fn name(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Destroying => "destroying",
        }
    }
}

/// What a caller may choose at create.
#[derive(Debug, Clone, Copy)]
pub struct CreateParams {
    pub vcpus: u8,
    pub mem_mib: u32,
    pub boot_timeout: Duration,
}

/// Wall time of each create phase, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CreateTimings {
    pub rootfs: f64,
    pub network: f64,
    pub vmm_start: f64,
    pub boot_to_ssh: f64,
    pub total: f64,
}

/// A created sandbox, as create reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub sandbox_id: String,
    pub ip: Ipv4Addr,
    pub vmm: &'static str,
    /// Where the root disk came from: "pool", "reflink" or "sparse_copy".
    pub rootfs_source: &'static str,
    pub timings_ms: CreateTimings,
}

/// One line of the sandbox list.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxSummary {
    pub sandbox_id: String,
    pub state: SandboxState,
    pub ip: Ipv4Addr,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub age_s: f64,
    pub vmm: &'static str,
    pub vmm_pid: Option<u32>,
    /// False once the VM process has exited (a crashed or killed guest) while the sandbox
    /// still exists; destroy it to clean up.
    pub vm_alive: bool,
}

/// The durable record of a sandbox, in `<work_dir>/sandboxes/<id>/sandbox.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    pub id: String,
    pub slot: u16,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub created_unix_ms: u64,
    pub backend: Backend,
    pub state: SandboxState,
    pub vmm_pid: Option<u32>,
}

/// A live sandbox.
#[derive(Debug)]
struct Sandbox {
    id: String,
    slot: Slot,
    vcpus: u8,
    mem_mib: u32,
    created_unix_ms: u64,
    dir: PathBuf,
    state: Mutex<SandboxState>,
    vm: Mutex<Option<Arc<VmProcess>>>,
    ssh: Mutex<Option<Arc<GuestSession>>>,
    /// Commands running at once in this sandbox; more wait for a turn.
    exec_slots: tokio::sync::Semaphore,
}

impl Sandbox {
    /// The in-memory sandbox for a record (a new one at create, or one read back at start).
    fn from_record(
        record: &SandboxRecord,
        slot: Slot,
        dir: PathBuf,
        vm: Option<Arc<VmProcess>>,
    ) -> Sandbox {
        Sandbox {
            id: record.id.clone(),
            slot,
            vcpus: record.vcpus,
            mem_mib: record.mem_mib,
            created_unix_ms: record.created_unix_ms,
            dir,
            state: Mutex::new(record.state),
            vm: Mutex::new(vm),
            ssh: Mutex::new(None),
            exec_slots: tokio::sync::Semaphore::new(PARALLEL_EXECS),
        }
    }

    fn state(&self) -> SandboxState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, state: SandboxState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn vm(&self) -> Option<Arc<VmProcess>> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn ssh(&self) -> Option<Arc<GuestSession>> {
        self.ssh.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn guest_addr(&self) -> SocketAddr {
        SocketAddr::new(self.slot.guest_ip().into(), SSH_PORT)
    }

    fn record(&self, backend: Backend) -> SandboxRecord {
        SandboxRecord {
            id: self.id.clone(),
            slot: self.slot.index(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            created_unix_ms: self.created_unix_ms,
            backend,
            state: self.state(),
            vmm_pid: self.vm().map(|vm| vm.pid),
        }
    }
}

/// The set of live sandboxes and everything needed to make more.
pub struct Sandboxes {
    config: Config,
    vmm: Vmm,
    keys: GuestKeys,
    firewall: Firewall,
    pool: AddressPool,
    disks: Arc<DiskPool>,
    live: Mutex<HashMap<String, Arc<Sandbox>>>,
    shutting_down: AtomicBool,
}

impl Sandboxes {
    pub fn new(
        config: Config,
        vmm: Vmm,
        keys: GuestKeys,
        firewall: Firewall,
        disks: DiskPool,
    ) -> Self {
        Sandboxes {
            disks: Arc::new(disks),
            config,
            vmm,
            keys,
            firewall,
            pool: AddressPool::new(),
            live: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Tops the disk pool up in the background.
    pub fn refill_disks(&self) {
        let disks = Arc::clone(&self.disks);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = disks.refill() {
                warn!(error = %e, "cannot refill the disk pool; creates will copy on the spot");
            }
        });
    }

    pub fn backend(&self) -> Backend {
        self.vmm.backend
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.config.work_dir.join("sandboxes")
    }

    /// Boots a new sandbox and returns once a command can run in it.
    pub async fn create(&self, params: CreateParams) -> Result<Created, SandboxError> {
        let started = Instant::now();
        let sandbox = self.reserve(&params)?;
        let span = info_span!("sandbox", sandbox_id = %sandbox.id, vmm = self.vmm.backend.name());
        async {
            match self.build(&sandbox, params, started).await {
                Ok(created) => {
                    info!(
                        total_ms = created.timings_ms.total,
                        boot_to_ssh_ms = created.timings_ms.boot_to_ssh,
                        "created"
                    );
                    Ok(created)
                }
                Err(e) => {
                    warn!(error = %e, "create failed; undoing");
                    if let Err(t) = self.teardown(&sandbox).await {
                        warn!(error = %t, "undo after failed create was incomplete");
                    }
                    self.forget(&sandbox);
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Checks limits, takes an address slot and registers the sandbox as `creating`.
    fn reserve(&self, params: &CreateParams) -> Result<Arc<Sandbox>, SandboxError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SandboxError::ShuttingDown);
        }
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.len() >= self.config.max_sandboxes {
            return Err(SandboxError::AtCapacity {
                live: live.len(),
                max: self.config.max_sandboxes,
            });
        }
        let slot = self.pool.allocate().ok_or(SandboxError::PoolExhausted)?;
        let id = new_sandbox_id();
        let record = SandboxRecord {
            id: id.clone(),
            slot: slot.index(),
            vcpus: params.vcpus,
            mem_mib: params.mem_mib,
            created_unix_ms: unix_ms(),
            backend: self.vmm.backend,
            state: SandboxState::Creating,
            vmm_pid: None,
        };
        let sandbox = Arc::new(Sandbox::from_record(
            &record,
            slot,
            self.sandboxes_dir().join(&id),
            None,
        ));
        live.insert(id, Arc::clone(&sandbox));
        Ok(sandbox)
    }

    async fn build(
        &self,
        sandbox: &Arc<Sandbox>,
        params: CreateParams,
        started: Instant,
    ) -> Result<Created, SandboxError> {
        let id = &sandbox.id;
        let failed = |step: &'static str| {
            move |reason: String| SandboxError::CreateFailed {
                id: id.clone(),
                step,
                reason,
            }
        };
        let mut timings = CreateTimings::default();

        let t = Instant::now();
        std::fs::create_dir_all(&sandbox.dir).map_err(|e| {
            failed("work_dir")(format!("cannot create {}: {e}", sandbox.dir.display()))
        })?;
        self.write_record(sandbox).map_err(failed("work_dir"))?;
        let disk = sandbox.dir.join(DISK_FILE);
        let disks = Arc::clone(&self.disks);
        let disk_for_copy = disk.clone();
        let source = tokio::task::spawn_blocking(move || disks.take(&disk_for_copy))
            .await
            .map_err(|e| failed("rootfs")(e.to_string()))?
            .map_err(|e: RootfsError| failed("rootfs")(e.to_string()))?;
        if self.config.disk_pool > 0 {
            self.refill_disks();
        }
        timings.rootfs = ms_since(t);

        let t = Instant::now();
        let slot = sandbox.slot;
        let firewall = self.firewall.clone();
        let sandbox_id = id.clone();
        let tap = tokio::task::spawn_blocking(move || setup_network(slot, &firewall, &sandbox_id))
            .await
            .map_err(|e| failed("network")(e.to_string()))?
            .map_err(failed("network"))?;
        timings.network = ms_since(t);

        let t = Instant::now();
        let spec = VmSpec {
            sandbox_id: id.clone(),
            vcpus: params.vcpus,
            mem_mib: params.mem_mib,
            kernel: self.config.kernel_path.clone(),
            disk,
            tap: tap.name,
            guest_mac: slot.guest_mac(),
            boot_args: format!("{BASE_BOOT_ARGS} {}", slot.kernel_ip_arg()),
            work_dir: sandbox.dir.clone(),
        };
        let vm = Arc::new(
            self.vmm
                .start(&spec)
                .await
                .map_err(|e: VmmError| failed("vmm_start")(e.to_string()))?,
        );
        *sandbox.vm.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&vm));
        self.write_record(sandbox).map_err(failed("vmm_start"))?;
        timings.vmm_start = ms_since(t);

        let t = Instant::now();
        let alive_vm = Arc::clone(&vm);
        let session = GuestSession::wait_ready(
            sandbox.guest_addr(),
            &self.keys,
            params.boot_timeout,
            move || alive_vm.is_alive(),
        )
        .await
        .map_err(|e| match e {
            GuestError::NotReady { .. } => SandboxError::BootTimeout {
                id: id.clone(),
                timeout_s: params.boot_timeout.as_secs(),
                console: log_tail(&sandbox.dir.join(CONSOLE_LOG), 600),
            },
            GuestError::VmExited { .. } => failed("boot")(format!(
                "the VMM exited ({}) before SSH answered; VMM log: {}; console: {}",
                vm.exit_status()
                    .unwrap_or_else(|| "status unknown".to_string()),
                log_tail(&sandbox.dir.join(crate::vmm::VMM_LOG), 600),
                log_tail(&sandbox.dir.join(CONSOLE_LOG), 600),
            )),
            other => failed("boot")(other.to_string()),
        })?;
        timings.boot_to_ssh = ms_since(t);

        *sandbox.ssh.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(session));
        sandbox.set_state(SandboxState::Running);
        self.write_record(sandbox).map_err(failed("record"))?;
        timings.total = ms_since(started);

        Ok(Created {
            sandbox_id: id.clone(),
            ip: slot.guest_ip(),
            vmm: self.vmm.backend.name(),
            rootfs_source: source.name(),
            timings_ms: timings,
        })
    }

    /// Runs a command in a running sandbox.
    pub async fn exec(
        &self,
        id: &str,
        cmd: &str,
        timeout: Duration,
    ) -> Result<ExecOutput, SandboxError> {
        let sandbox = self.get(id)?;
        let state = sandbox.state();
        if state != SandboxState::Running {
            return Err(SandboxError::WrongState {
                id: id.to_string(),
                state: state.name(),
                operation: "run commands",
            });
        }
        let exec_failed = |reason: String| SandboxError::ExecFailed {
            id: id.to_string(),
            reason,
        };
        // Waiting for a turn is not part of the command's timeout.
        let _turn = sandbox.exec_slots.acquire().await;
        let session = self
            .session(&sandbox)
            .await
            .map_err(|e| exec_failed(e.to_string()))?;
        let exec_id = random_hex(8);
        let request = ExecRequest {
            cmd,
            timeout,
            output_limit: self.config.exec_output_limit,
            exec_id: &exec_id,
        };
        // A guest that dies mid-exec is noticed from its VMM process within a poll interval,
        // without waiting for SSH keepalives to run out.
        let vm = sandbox.vm();
        let result = tokio::select! {
            result = session.exec(&request) => result,
            () = wait_for_exit(vm) => Err(GuestError::Connection {
                addr: sandbox.guest_addr(),
                reason: "the VM process exited during the command".to_string(),
            }),
        };
        if sandbox.state() == SandboxState::Destroying {
            return Err(SandboxError::DestroyedDuringExec(id.to_string()));
        }
        result.map_err(|e| {
            let vm_dead = sandbox.vm().map(|vm| !vm.is_alive()).unwrap_or(true);
            if vm_dead {
                exec_failed(format!("the VM is no longer running ({e})"))
            } else {
                exec_failed(e.to_string())
            }
        })
    }

    /// The sandbox's SSH session, reconnecting once if the old one was closed.
    async fn session(&self, sandbox: &Sandbox) -> Result<Arc<GuestSession>, GuestError> {
        if let Some(session) = sandbox.ssh()
            && !session.is_closed()
        {
            return Ok(session);
        }
        let fresh = Arc::new(GuestSession::connect(sandbox.guest_addr(), &self.keys).await?);
        *sandbox.ssh.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&fresh));
        Ok(fresh)
    }

    /// Tears a sandbox down completely and forgets it.
    pub async fn destroy(&self, id: &str) -> Result<f64, SandboxError> {
        let started = Instant::now();
        let sandbox = self.get(id)?;
        {
            let mut state = sandbox.state.lock().unwrap_or_else(|e| e.into_inner());
            if *state != SandboxState::Running {
                return Err(SandboxError::WrongState {
                    id: id.to_string(),
                    state: state.name(),
                    operation: "be destroyed",
                });
            }
            *state = SandboxState::Destroying;
        }
        let span = info_span!("sandbox", sandbox_id = %id, vmm = self.vmm.backend.name());
        let result = self.teardown(&sandbox).instrument(span.clone()).await;
        self.forget(&sandbox);
        let elapsed = ms_since(started);
        span.in_scope(|| info!(duration_ms = elapsed, ok = result.is_ok(), "destroyed"));
        result.map(|()| elapsed)
    }

    /// Lists live sandboxes, oldest first.
    pub fn list(&self) -> Vec<SandboxSummary> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<SandboxSummary> = live
            .values()
            .map(|s| SandboxSummary {
                sandbox_id: s.id.clone(),
                state: s.state(),
                ip: s.slot.guest_ip(),
                vcpus: s.vcpus,
                mem_mib: s.mem_mib,
                age_s: unix_ms().saturating_sub(s.created_unix_ms) as f64 / 1000.0,
                vmm: self.vmm.backend.name(),
                vmm_pid: s.vm().map(|vm| vm.pid),
                vm_alive: s.vm().is_some_and(|vm| vm.is_alive()),
            })
            .collect();
        out.sort_by(|a, b| b.age_s.total_cmp(&a.age_s));
        out
    }

    pub fn live_count(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops accepting creates; then destroys every sandbox unless `keep` is set, in which
    /// case VMs, taps, rules and records stay for the next start to re-adopt.
    ///
    /// Runs once; later calls return at once.
    pub async fn shutdown(&self, keep: bool) {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        self.disks.drain();
        if keep {
            info!(
                live = self.live_count(),
                "keeping sandboxes for the next start (MANTA_KEEP_ON_EXIT=1)"
            );
            return;
        }
        let all: Vec<Arc<Sandbox>> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for sandbox in &all {
            sandbox.set_state(SandboxState::Destroying);
            if let Err(e) = self.teardown(sandbox).await {
                warn!(sandbox_id = %sandbox.id, error = %e, "teardown at shutdown incomplete");
            }
            self.forget(sandbox);
        }
        if let Err(e) = self.firewall.uninstall() {
            warn!(error = %e, "removing Manta's firewall chains failed");
        }
        info!("all sandboxes destroyed");
    }

    fn get(&self, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    fn forget(&self, sandbox: &Sandbox) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sandbox.id);
        self.pool.release(sandbox.slot);
    }

    /// Undoes everything a sandbox may own. Each step tolerates "already gone", so this serves
    /// both destroy and the undo of a half-made create. Every step is tried even if one fails.
    async fn teardown(&self, sandbox: &Sandbox) -> Result<(), SandboxError> {
        let mut leftovers = Vec::new();

        if let Some(session) = sandbox.ssh.lock().unwrap_or_else(|e| e.into_inner()).take() {
            tokio::spawn(async move { session.close().await });
        }
        let vm = sandbox.vm();
        if let Some(vm) = vm
            && !vm.kill(KILL_TIMEOUT).await
        {
            leftovers.push(format!("VMM process {} still running", vm.pid));
        }
        kill_stray_vmms(&sandbox.id).await;
        crate::vmm::firecracker::remove_cgroups(&sandbox.id);

        let slot = sandbox.slot;
        let firewall = self.firewall.clone();
        let id = sandbox.id.clone();
        let dir = sandbox.dir.clone();
        let blocking = tokio::task::spawn_blocking(move || {
            let mut leftovers = Vec::new();
            if let Err(e) = firewall.forget_sandbox(slot, &id) {
                leftovers.push(format!("firewall rule ({e})"));
            }
            if let Err(e) = TapDevice::remove_named(&slot.tap_name()) {
                leftovers.push(format!("tap {} ({e})", slot.tap_name()));
            }
            if dir.exists()
                && let Err(e) = std::fs::remove_dir_all(&dir)
            {
                leftovers.push(format!("work dir {} ({e})", dir.display()));
            }
            leftovers
        });
        match blocking.await {
            Ok(more) => leftovers.extend(more),
            Err(e) => leftovers.push(format!("teardown task failed: {e}")),
        }

        if leftovers.is_empty() {
            Ok(())
        } else {
            Err(SandboxError::TeardownIncomplete {
                id: sandbox.id.clone(),
                leftover: leftovers.join(", "),
            })
        }
    }

    fn write_record(&self, sandbox: &Sandbox) -> Result<(), String> {
        let record = sandbox.record(self.vmm.backend);
        write_atomically(&sandbox.dir.join(RECORD_FILE), &record)
    }

    /// Start-up reconcile: installs the firewall, re-adopts sandboxes whose VM still runs,
    /// cleans up those whose VM died, and removes Manta leftovers that have no record.
    pub async fn reconcile(&self) -> Result<ReconcileReport, FirewallError> {
        let mut report = ReconcileReport {
            stale_rules: self.firewall.sandbox_ids_in_rules(),
            ..Default::default()
        };
        let firewall = self.firewall.clone();
        tokio::task::spawn_blocking(move || firewall.install())
            .await
            .unwrap_or_else(|e| panic!("firewall install task panicked: {e}"))?;

        let dir = self.sandboxes_dir();
        let _ = std::fs::create_dir_all(&dir);
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        entries.sort();

        for path in entries {
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            let record = read_record(&path.join(RECORD_FILE));
            match record {
                Some(record) if record.id == name => {
                    if self.adopt(&record, &path).await {
                        report.adopted.push(record.id);
                    } else {
                        report.cleaned.push(record.id);
                    }
                }
                _ => {
                    info!(path = %path.display(), "removing work dir with no valid record");
                    if is_sandbox_id(&name) {
                        kill_stray_vmms(&name).await;
                    }
                    let _ = std::fs::remove_dir_all(&path);
                    report.stray_dirs.push(path.display().to_string());
                }
            }
        }

        let owned: Vec<String> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|s| s.slot.tap_name())
            .collect();
        for tap in TapDevice::list_with_prefix(TAP_PREFIX) {
            if Slot::from_tap_name(&tap).is_some() && !owned.contains(&tap) {
                info!(tap = %tap, "removing tap with no live sandbox");
                match TapDevice::remove_named(&tap) {
                    Ok(()) => report.stray_taps.push(tap),
                    Err(e) => warn!(tap = %tap, error = %e, "cannot remove stray tap"),
                }
            }
        }
        Ok(report)
    }

    /// Re-adopts one recorded sandbox if its VM is alive and answers; otherwise cleans it up.
    async fn adopt(&self, record: &SandboxRecord, dir: &Path) -> bool {
        let span = info_span!("sandbox", sandbox_id = %record.id, vmm = record.backend.name());
        async {
            let marker = record.id.clone();
            let slot = Slot::from_index(record.slot);
            let vm = record
                .vmm_pid
                .and_then(|pid| VmProcess::adopt(pid, &marker))
                .map(Arc::new);
            let usable = record.state == SandboxState::Running
                && record.backend == self.vmm.backend
                && vm.is_some()
                && slot.is_some_and(|s| self.pool.claim(s));
            let Some(slot) = slot else {
                warn!(
                    slot = record.slot,
                    "record names an invalid slot; removing its work dir"
                );
                kill_stray_vmms(&record.id).await;
                let _ = std::fs::remove_dir_all(dir);
                return false;
            };
            let sandbox = Arc::new(Sandbox::from_record(record, slot, dir.to_path_buf(), vm));
            if usable {
                let firewall = self.firewall.clone();
                let id = record.id.clone();
                let rule =
                    tokio::task::spawn_blocking(move || firewall.allow_sandbox(slot, &id)).await;
                let tap_ok = TapDevice::exists(&slot.tap_name());
                let ssh = GuestSession::wait_ready(
                    sandbox.guest_addr(),
                    &self.keys,
                    ADOPT_SSH_TIMEOUT,
                    || true,
                )
                .await;
                if let (true, Ok(Ok(())), Ok(session)) = (tap_ok, rule, ssh) {
                    *sandbox.ssh.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Arc::new(session));
                    self.live
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(record.id.clone(), sandbox);
                    info!("re-adopted: VM alive and answering SSH");
                    return true;
                }
                warn!("VM alive but not usable (tap, rule or SSH missing); cleaning it up");
            } else {
                info!(
                    state = record.state.name(),
                    vm_alive = sandbox.vm().is_some(),
                    "not adoptable; cleaning up"
                );
            }
            if let Err(e) = self.teardown(&sandbox).await {
                warn!(error = %e, "cleanup of dead sandbox incomplete");
            }
            if self
                .live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&record.id)
                .is_none()
            {
                // Release only a slot this record claimed, never one a live sandbox holds.
                if usable {
                    self.pool.release(slot);
                }
            }
            false
        }
        .instrument(span)
        .await
    }
}

/// What start-up reconcile did.
#[derive(Debug, Default, Serialize)]
pub struct ReconcileReport {
    pub adopted: Vec<String>,
    pub cleaned: Vec<String>,
    pub stray_dirs: Vec<String>,
    pub stray_taps: Vec<String>,
    /// Sandbox ids that had firewall rules before the chains were rebuilt.
    pub stale_rules: Vec<String>,
}

/// Creates the tap (with the guest's static ARP entry) and the sandbox's firewall rule.
fn setup_network(slot: Slot, firewall: &Firewall, sandbox_id: &str) -> Result<TapDevice, String> {
    let tap = TapDevice::create(&slot.tap_name(), slot.host_ip(), Slot::netmask())
        .map_err(|e: TapError| e.to_string())?;
    let rest = tap
        .set_static_neighbor(slot.guest_ip(), slot.guest_mac_bytes())
        .map_err(|e| e.to_string())
        .and_then(|()| {
            firewall
                .allow_sandbox(slot, sandbox_id)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = rest {
        let _ = tap.remove();
        return Err(e);
    }
    Ok(tap)
}

/// Resolves once the VM process has exited (never, if there is none to watch).
async fn wait_for_exit(vm: Option<Arc<VmProcess>>) {
    let Some(vm) = vm else {
        return std::future::pending().await;
    };
    while vm.is_alive() {
        tokio::time::sleep(VM_WATCH_INTERVAL).await;
    }
}

/// Kills any VMM whose command line names this sandbox (one we lost track of).
async fn kill_stray_vmms(sandbox_id: &str) {
    for pid in vmm_pids_for(sandbox_id) {
        if let Some(vm) = VmProcess::adopt(pid, sandbox_id) {
            warn!(
                pid,
                sandbox_id, "killing VMM process left behind for this sandbox"
            );
            vm.kill(KILL_TIMEOUT).await;
        }
    }
}

fn vmm_pids_for(sandbox_id: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| crate::vmm::process_matches(pid, sandbox_id))
        .collect()
}

fn read_record(path: &Path) -> Option<SandboxRecord> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes JSON to a temporary file, then renames it over `path`, so a reader sees the old
/// record or the new one, never a torn one.
///
/// No fsync: the record must survive the server dying (kill -9), and the page cache does
/// that. After a host power loss every VM is gone anyway, and a record that did not reach the
/// disk reads as invalid, which reconcile cleans up like any other leftover.
fn write_atomically<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("cannot write record {}: {e}", path.display()))
}

/// True for names of the form Manta gives sandboxes: `sb-` and 12 lowercase hex digits.
fn is_sandbox_id(name: &str) -> bool {
    name.strip_prefix("sb-").is_some_and(|hex| {
        hex.len() == 12
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn new_sandbox_id() -> String {
    format!("sb-{}", random_hex(6))
}

/// `bytes` random bytes from the kernel, as lowercase hex.
fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // SAFETY: `buf` is a valid, writable buffer of `bytes` bytes for the call.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), bytes, 0) };
    assert_eq!(n, bytes as isize, "getrandom failed");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds since `t`, rounded to hundredths.
pub(crate) fn ms_since(t: Instant) -> f64 {
    (t.elapsed().as_micros() as f64 / 10.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_well_formed() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_sandbox_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert!(is_sandbox_id(id), "{id}");
        }
        for bad in [
            "sb-",
            "sb-0123456789ABCDEF",
            "sb-0123456789aX",
            "x",
            "sb-0123456789abc",
        ] {
            assert!(!is_sandbox_id(bad), "{bad}");
        }
    }

    #[test]
    fn records_round_trip_atomically() {
        let dir = std::env::temp_dir().join(format!("manta-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let record = SandboxRecord {
            id: "sb-0123456789ab".to_string(),
            slot: 7,
            vcpus: 1,
            mem_mib: 256,
            created_unix_ms: 1,
            backend: Backend::QemuTcg,
            state: SandboxState::Running,
            vmm_pid: Some(42),
        };
        let path = dir.join(RECORD_FILE);
        write_atomically(&path, &record).unwrap();
        assert_eq!(read_record(&path), Some(record));
        assert!(!dir.join("sandbox.json.tmp").exists());
        std::fs::write(&path, b"{\"id\": 1").unwrap();
        assert_eq!(
            read_record(&path),
            None,
            "a torn record is rejected, not half-read"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
