//! Firecracker: one process per VM, configured over its API socket, seccomp filters on.
//!
//! The sequence is the one Firecracker's API describes: logger, boot source, root drive,
//! network interface, machine config, then the `InstanceStart` action. The guest's serial
//! console is Firecracker's stdout, so it goes to `console.log`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{CONSOLE_LOG, VMM_LOG, VmProcess, VmSpec, VmmError, create_log, log_tail, spawn};

/// API socket file name inside the sandbox's work directory.
pub const API_SOCKET: &str = "firecracker.sock";
/// Firecracker's own log (set through `PUT /logger`).
pub const FC_LOG: &str = "firecracker.log";
/// How long Firecracker may take to create its API socket.
const SOCKET_WAIT: Duration = Duration::from_secs(5);
/// How long one API call may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Running Firecracker through its jailer: chroot, unprivileged uid/gid, cgroup limits.
#[derive(Debug, Clone)]
pub struct Jail {
    pub jailer: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// Where the configuration's paths point: on the host, or inside the jail's chroot.
struct Layout {
    /// API socket as the host sees it.
    socket: PathBuf,
    /// Paths as Firecracker sees them.
    kernel: PathBuf,
    disk: PathBuf,
    log: PathBuf,
}

/// The cgroup hierarchy all jailed VMs go under (`<controller>/manta/<sandbox id>`).
const PARENT_CGROUP: &str = "manta";
/// Memory a jailed VM may use beyond its guest RAM, for Firecracker itself (MiB).
const VMM_OVERHEAD_MIB: u64 = 128;

/// Starts Firecracker for `spec` (through the jailer when `jail` is set) and boots the guest.
/// On any failure the process is killed.
pub async fn start(bin: &Path, spec: &VmSpec, jail: Option<&Jail>) -> Result<VmProcess, VmmError> {
    let console = create_log(spec, CONSOLE_LOG)?;
    let stderr = create_log(spec, VMM_LOG)?;
    let (program, args, layout) = match jail {
        None => {
            let socket = spec.work_dir.join(API_SOCKET);
            let _ = std::fs::remove_file(&socket);
            create_log(spec, FC_LOG)?;
            let args = vec![
                "--api-sock".to_string(),
                socket.display().to_string(),
                "--id".to_string(),
                spec.sandbox_id.clone(),
            ];
            let layout = Layout {
                socket,
                kernel: spec.kernel.clone(),
                disk: spec.disk.clone(),
                log: spec.work_dir.join(FC_LOG),
            };
            (bin.to_path_buf(), args, layout)
        }
        Some(jail) => {
            let (args, layout) =
                prepare_jail(bin, spec, jail).map_err(|source| VmmError::LogFile {
                    sandbox_id: spec.sandbox_id.clone(),
                    path: spec.work_dir.join("jail"),
                    source,
                })?;
            (jail.jailer.clone(), args, layout)
        }
    };

    let child = spawn(&program, &args, console, stderr, &spec.sandbox_id)?;
    let process = VmProcess::from_child(child)
        .ok_or_else(|| exited(&program, spec, "exited at once".to_string()))?;
    match configure(&layout, spec, &process, &program).await {
        Ok(()) => Ok(process),
        Err(e) => {
            process.kill(Duration::from_secs(5)).await;
            Err(e)
        }
    }
}

/// Builds the chroot the jailer will enter (`<work_dir>/jail/firecracker/<id>/root`): the
/// kernel linked in, the sandbox disk moved in, a log file and a socket directory owned by
/// the jail's user. Returns the jailer's arguments.
fn prepare_jail(bin: &Path, spec: &VmSpec, jail: &Jail) -> std::io::Result<(Vec<String>, Layout)> {
    let base = spec.work_dir.join("jail");
    let exec_name = bin
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("firecracker");
    let root = base.join(exec_name).join(&spec.sandbox_id).join("root");
    std::fs::create_dir_all(root.join("run"))?;
    let owned = |path: &Path| std::os::unix::fs::chown(path, Some(jail.uid), Some(jail.gid));
    owned(&root.join("run"))?;

    let kernel = root.join("vmlinux");
    if std::fs::hard_link(&spec.kernel, &kernel).is_err() {
        std::fs::copy(&spec.kernel, &kernel)?;
    }
    std::fs::rename(&spec.disk, root.join("rootfs.ext4"))?;
    owned(&root.join("rootfs.ext4"))?;
    std::fs::File::create(root.join("firecracker.log"))?;
    owned(&root.join("firecracker.log"))?;

    let mut args: Vec<String> = vec![
        "--id".to_string(),
        spec.sandbox_id.clone(),
        "--exec-file".to_string(),
        bin.display().to_string(),
        "--uid".to_string(),
        jail.uid.to_string(),
        "--gid".to_string(),
        jail.gid.to_string(),
        "--chroot-base-dir".to_string(),
        base.display().to_string(),
        "--resource-limit".to_string(),
        "no-file=4096".to_string(),
    ];
    let memory_bytes = (u64::from(spec.mem_mib) + VMM_OVERHEAD_MIB) * 1024 * 1024;
    let memory_limit = match cgroup_version() {
        Some(1) => Some(("1", format!("memory.limit_in_bytes={memory_bytes}"))),
        Some(_) => Some(("2", format!("memory.max={memory_bytes}"))),
        // Limitation: with no usable memory controller the jail has no memory limit.
        None => None,
    };
    if let Some((version, limit)) = memory_limit {
        args.extend([
            "--cgroup-version".to_string(),
            version.to_string(),
            "--parent-cgroup".to_string(),
            PARENT_CGROUP.to_string(),
            "--cgroup".to_string(),
            limit,
        ]);
    }
    args.extend([
        "--".to_string(),
        "--api-sock".to_string(),
        format!("/run/{API_SOCKET}"),
    ]);

    let layout = Layout {
        socket: root.join("run").join(API_SOCKET),
        kernel: PathBuf::from("/vmlinux"),
        disk: PathBuf::from("/rootfs.ext4"),
        log: PathBuf::from("/firecracker.log"),
    };
    Ok((args, layout))
}

/// Which cgroup version offers a memory controller here, if any.
fn cgroup_version() -> Option<u8> {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    if v2.split_whitespace().any(|c| c == "memory") {
        return Some(2);
    }
    Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        .exists()
        .then_some(1)
}

/// Removes the cgroups the jailer made for a sandbox, once its VM is gone. A cgroup that does
/// not exist is fine.
pub fn remove_cgroups(sandbox_id: &str) {
    for dir in [
        format!("/sys/fs/cgroup/memory/{PARENT_CGROUP}/{sandbox_id}"),
        format!("/sys/fs/cgroup/{PARENT_CGROUP}/{sandbox_id}"),
    ] {
        let _ = std::fs::remove_dir(dir);
    }
}

async fn configure(
    layout: &Layout,
    spec: &VmSpec,
    process: &VmProcess,
    bin: &Path,
) -> Result<(), VmmError> {
    let socket = layout.socket.as_path();
    wait_for_socket(socket, spec, process, bin).await?;
    let api = Api {
        socket: socket.to_path_buf(),
        sandbox_id: spec.sandbox_id.clone(),
    };
    api.put(
        "/logger",
        json!({ "log_path": layout.log, "level": "Info", "show_level": true }),
    )
    .await?;
    api.put(
        "/boot-source",
        json!({ "kernel_image_path": layout.kernel, "boot_args": spec.boot_args }),
    )
    .await?;
    api.put(
        "/drives/rootfs",
        json!({
            "drive_id": "rootfs",
            "path_on_host": layout.disk,
            "is_root_device": true,
            "is_read_only": false,
        }),
    )
    .await?;
    api.put(
        "/network-interfaces/eth0",
        json!({ "iface_id": "eth0", "host_dev_name": spec.tap, "guest_mac": spec.guest_mac }),
    )
    .await?;
    api.put(
        "/machine-config",
        json!({ "vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib }),
    )
    .await?;
    api.put("/actions", json!({ "action_type": "InstanceStart" }))
        .await
}

async fn wait_for_socket(
    socket: &Path,
    spec: &VmSpec,
    process: &VmProcess,
    bin: &Path,
) -> Result<(), VmmError> {
    let deadline = tokio::time::Instant::now() + SOCKET_WAIT;
    loop {
        if UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = process.exit_status() {
            return Err(exited(bin, spec, status));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(VmmError::Socket {
                sandbox_id: spec.sandbox_id.clone(),
                socket: socket.to_path_buf(),
                reason: format!(
                    "not accepting connections after {} ms",
                    SOCKET_WAIT.as_millis()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn exited(bin: &Path, spec: &VmSpec, status: String) -> VmmError {
    VmmError::ExitedEarly {
        sandbox_id: spec.sandbox_id.clone(),
        bin: bin.display().to_string(),
        status,
        log_tail: log_tail(&spec.work_dir.join(VMM_LOG), 2000),
    }
}

/// A client for Firecracker's HTTP API on a Unix socket: one short connection per request.
struct Api {
    socket: PathBuf,
    sandbox_id: String,
}

impl Api {
    async fn put(&self, path: &str, body: serde_json::Value) -> Result<(), VmmError> {
        let body = body.to_string();
        let request = format!(
            "PUT {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let socket_error = |reason: String| VmmError::Socket {
            sandbox_id: self.sandbox_id.clone(),
            socket: self.socket.clone(),
            reason,
        };
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket).await?;
            stream.write_all(request.as_bytes()).await?;
            read_response(&mut stream).await
        };
        let (status, text) = tokio::time::timeout(API_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                socket_error(format!(
                    "PUT {path} got no answer in {} ms",
                    API_TIMEOUT.as_millis()
                ))
            })?
            .map_err(|e| socket_error(format!("PUT {path}: {e}")))?;
        if !(200..300).contains(&status) {
            return Err(VmmError::Api {
                sandbox_id: self.sandbox_id.clone(),
                method: "PUT",
                path: path.to_string(),
                status,
                body: text,
            });
        }
        Ok(())
    }
}

/// Reads one HTTP/1.1 response: the status code and the body (by Content-Length).
async fn read_response(stream: &mut UnixStream) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let header_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("response header over 64 KiB"));
        }
    };
    let (status, content_length) = parse_head(&buf[..header_end]).ok_or_else(|| {
        std::io::Error::other(format!(
            "malformed response: {:?}",
            String::from_utf8_lossy(&buf)
        ))
    })?;
    while buf.len() < header_end + content_length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let end = buf.len().min(header_end + content_length);
    Ok((
        status,
        String::from_utf8_lossy(&buf[header_end..end]).into_owned(),
    ))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses the status line and Content-Length of a response head.
fn parse_head(head: &[u8]) -> Option<(u16, usize)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let content_length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    Some((status, content_length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads() {
        assert_eq!(
            parse_head(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Some((204, 0))
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\ncontent-length: 42\r\n\r\n"),
            Some((400, 42))
        );
        assert_eq!(parse_head(b"garbage"), None);
        assert_eq!(parse_head(b"HTTP/1.1 abc\r\n\r\n"), None);
    }
}
