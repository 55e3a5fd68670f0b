//! Server start-up and shutdown: configuration, backend choice, reconcile, serve, teardown.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::api::{AppState, router};
use crate::config::Config;
use crate::guest::GuestKeys;
use crate::network::firewall::Firewall;
use crate::rootfs::DiskPool;
use crate::sandbox::Sandboxes;
use crate::vmm::{HostCaps, Vmm};

/// The host's IPv4 forwarding switch: on while the server runs, restored at exit.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// How long requests still in flight get after the sandboxes are torn down at shutdown.
const REQUEST_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Anything that stops the server from starting; the message is printed as is.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Backend(#[from] crate::vmm::host::ChoiceError),
    #[error("guest keys: {0}")]
    Keys(#[from] crate::guest::GuestError),
    #[error("cannot enable IPv4 forwarding (/proc/sys/net/ipv4/ip_forward): {0}")]
    Forwarding(std::io::Error),
    #[error("cannot prepare the disk pool in the work dir (MANTA_WORK_DIR): {0}")]
    WorkDir(std::io::Error),
    #[error(
        "another manta-server already uses MANTA_WORK_DIR={0} (its lock file is held); \
         give each server its own work dir"
    )]
    WorkDirBusy(std::path::PathBuf),
    #[error("MANTA_JAILER_BIN points to {0}, which was not found")]
    JailerMissing(std::path::PathBuf),
    #[error("firewall: {0}")]
    Firewall(#[from] crate::network::firewall::FirewallError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the server until SIGINT or SIGTERM, then destroys (or keeps) every sandbox.
pub async fn run(config: Config) -> Result<(), StartError> {
    let caps = HostCaps::probe(
        &config.firecracker_bin,
        &config.qemu_bin,
        config.jailer_bin.as_deref(),
    );
    let (backend, reason) = caps.choose(config.vmm, &config.firecracker_bin, &config.qemu_bin)?;
    let bin = match backend {
        crate::vmm::Backend::Firecracker => caps.firecracker_bin.clone(),
        _ => caps.qemu_bin.clone(),
    }
    .unwrap_or_else(|| unreachable!("choose() only picks a backend whose binary exists"));
    info!(vmm = backend.name(), bin = %bin.display(), %reason, "VMM chosen");

    let _work_dir_lock = lock_work_dir(&config.work_dir)?;
    let keys = GuestKeys::load(&config.ssh_key_path, &config.ssh_host_key_path)?;
    let forwarding_before = std::fs::read_to_string(IP_FORWARD).unwrap_or_default();
    std::fs::write(IP_FORWARD, "1").map_err(StartError::Forwarding)?;
    let firewall = Firewall::new(&config.host_iface, config.egress);
    let listen_addr = config.listen_addr;
    let keep_on_exit = config.keep_on_exit;
    let api_token = config.api_token.clone().map(Arc::new);
    let run_as = match backend {
        crate::vmm::Backend::Firecracker => None,
        _ => config.vmm_user.clone(),
    };
    let jail = match (backend, &caps.jailer_bin) {
        (crate::vmm::Backend::Firecracker, Some(jailer)) => {
            let user = config.vmm_user.as_deref().unwrap_or("root");
            let (uid, gid) = match nix::unistd::User::from_name(user) {
                Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
                _ => (0, 0),
            };
            info!(jailer = %jailer.display(), uid, gid, "Firecracker runs through the jailer");
            Some(crate::vmm::firecracker::Jail {
                jailer: jailer.clone(),
                uid,
                gid,
            })
        }
        (crate::vmm::Backend::Firecracker, None) if config.jailer_bin.is_some() => {
            return Err(StartError::JailerMissing(
                config.jailer_bin.clone().unwrap_or_default(),
            ));
        }
        _ => None,
    };
    let vmm = Vmm {
        backend,
        bin,
        run_as,
        jail,
    };
    let disks = DiskPool::new(
        &config.rootfs_path,
        &config.work_dir.join("disk-pool"),
        config.disk_pool,
    )
    .map_err(StartError::WorkDir)?;
    let sandboxes = Arc::new(Sandboxes::new(config, vmm, keys, firewall, disks));

    let report = sandboxes.reconcile().await?;
    info!(
        adopted = ?report.adopted,
        cleaned = ?report.cleaned,
        stray_dirs = report.stray_dirs.len(),
        stray_taps = ?report.stray_taps,
        rules_rebuilt_for = ?report.stale_rules,
        "reconciled state left by earlier runs"
    );

    sandboxes.refill_disks();

    let listener = TcpListener::bind(listen_addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: listen_addr,
            source,
        })?;
    info!(addr = %listen_addr, auth = api_token.is_some(), "listening");
    let app = router(AppState {
        sandboxes: Arc::clone(&sandboxes),
        api_token,
    });
    // On SIGINT/SIGTERM: stop accepting, tear the sandboxes down (which also ends commands
    // still running in them), then give other requests in flight a short while to answer.
    let (torn_down_tx, mut torn_down) = tokio::sync::watch::channel(false);
    let teardown_sandboxes = Arc::clone(&sandboxes);
    let graceful = async move {
        shutdown_signal().await;
        teardown_sandboxes.shutdown(keep_on_exit).await;
        let _ = torn_down_tx.send(true);
    };
    let serve = axum::serve(listener, app).with_graceful_shutdown(graceful);
    tokio::select! {
        served = serve => {
            if let Err(e) = served {
                warn!(error = %e, "server stopped with an error");
            }
        }
        _ = async {
            let _ = torn_down.wait_for(|done| *done).await;
            tokio::time::sleep(REQUEST_DRAIN).await;
        } => {
            warn!(drain_ms = REQUEST_DRAIN.as_millis() as u64, "requests still running after shutdown; exiting anyway");
        }
    }

    // Idempotent: a no-op when the signal path above already ran.
    sandboxes.shutdown(keep_on_exit).await;
    if !keep_on_exit && forwarding_before.trim() == "0" {
        let _ = std::fs::write(IP_FORWARD, "0");
    }
    Ok(())
}

/// Takes an exclusive lock on `<work_dir>/manta.lock`, held while the returned file is open:
/// two servers sharing a work dir would adopt, and then destroy, each other's sandboxes.
fn lock_work_dir(work_dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    use std::os::fd::AsRawFd;

    std::fs::create_dir_all(work_dir).map_err(StartError::WorkDir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(work_dir.join("manta.lock"))
        .map_err(StartError::WorkDir)?;
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(StartError::WorkDirBusy(work_dir.to_path_buf()));
    }
    Ok(file)
}

async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "shutting down");
}
