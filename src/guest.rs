//! The SSH side of a sandbox: waiting for the guest to answer, and running commands in it.
//!
//! One SSH connection per sandbox is opened when the guest first answers and kept; every exec
//! is a new channel on it, so an exec costs one channel round trip rather than a handshake.
//! The guest's host key is pinned: it was recorded when the root filesystem was built.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::{
    PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate, load_secret_key,
};
use russh::{ChannelMsg, Disconnect};
use tokio::net::TcpStream;

/// The user commands run as inside the guest.
const GUEST_USER: &str = "root";
/// How long one TCP connect attempt may take while the guest boots.
const CONNECT_ATTEMPT: Duration = Duration::from_millis(150);
/// Pause between connect attempts that were refused.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Longest an SSH handshake plus authentication may take once TCP is up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive probe interval; after `KEEPALIVE_MAX` unanswered probes the connection is dead,
/// so a guest that dies mid-exec is noticed within about 3 seconds.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_MAX: usize = 3;
/// Longest command sent in the SSH exec request itself; dropbear refuses command strings
/// longer than about 9000 bytes (and drops the connection), so longer ones go through stdin.
const INLINE_CMD_MAX: usize = 8 * 1024;
/// Environment variable that marks every process of one exec, so a timeout can find them all.
const EXEC_MARKER: &str = "MANTA_EXEC_ID";

/// Errors talking to a guest; each names the address.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A key file could not be read or parsed.
    #[error("cannot load SSH key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    /// The guest did not answer SSH in time.
    #[error("guest {addr} did not answer SSH within {waited_ms} ms (last error: {last_error})")]
    NotReady {
        addr: SocketAddr,
        waited_ms: u128,
        last_error: String,
    },
    /// The VM process ended while we waited for SSH.
    #[error("the VM process exited before guest {addr} answered SSH")]
    VmExited { addr: SocketAddr },
    /// The guest presented a host key other than the pinned one.
    #[error("guest {addr} presented host key {presented}, expected the pinned key {expected}")]
    HostKeyMismatch {
        addr: SocketAddr,
        presented: String,
        expected: String,
    },
    /// The guest refused our key.
    #[error("guest {addr} rejected the sandbox key for user {GUEST_USER}")]
    AuthRejected { addr: SocketAddr },
    /// The SSH connection failed or was closed.
    #[error("SSH connection to guest {addr} failed: {reason}")]
    Connection { addr: SocketAddr, reason: String },
}

/// The client key and the guest's pinned host key.
#[derive(Clone)]
pub struct GuestKeys {
    client: Arc<PrivateKey>,
    host: PublicKey,
}

impl GuestKeys {
    pub fn load(client_key: &Path, host_key: &Path) -> Result<Self, GuestError> {
        let client = load_secret_key(client_key, None).map_err(|e| GuestError::Key {
            path: client_key.to_path_buf(),
            reason: e.to_string(),
        })?;
        let host_text = std::fs::read_to_string(host_key).map_err(|e| GuestError::Key {
            path: host_key.to_path_buf(),
            reason: e.to_string(),
        })?;
        let host = PublicKey::from_openssh(host_text.trim()).map_err(|e| GuestError::Key {
            path: host_key.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(GuestKeys {
            client: Arc::new(client),
            host,
        })
    }
}

/// What one exec asks for.
#[derive(Debug, Clone)]
pub struct ExecRequest<'a> {
    pub cmd: &'a str,
    pub timeout: Duration,
    /// Bytes of stdout plus stderr to keep; the rest is read and dropped.
    pub output_limit: usize,
    /// Unique per exec; marks its processes in the guest.
    pub exec_id: &'a str,
}

/// What one exec produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Exit status; `None` if the command was killed by a signal or timed out before exiting.
    pub exit_code: Option<i32>,
    /// Signal name if the command died of one (e.g. "KILL").
    pub signal: Option<String>,
    pub timed_out: bool,
    pub truncated: bool,
}

/// A live, authenticated SSH connection to one guest.
pub struct GuestSession {
    addr: SocketAddr,
    handle: Handle<PinnedHost>,
}

impl std::fmt::Debug for GuestSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSession")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl GuestSession {
    /// Polls `addr` until the guest's SSH server answers and accepts our key, or `timeout`
    /// passes, or `vm_alive` says the VM process is gone.
    pub async fn wait_ready(
        addr: SocketAddr,
        keys: &GuestKeys,
        timeout: Duration,
        mut vm_alive: impl FnMut() -> bool,
    ) -> Result<Self, GuestError> {
        let started = Instant::now();
        let mut last_error = String::from("no attempt yet");
        let attempts = async {
            loop {
                if !vm_alive() {
                    return Err(GuestError::VmExited { addr });
                }
                match tokio::time::timeout(CONNECT_ATTEMPT, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        let attempt = Self::handshake(addr, stream, keys);
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
                            Ok(Ok(session)) => return Ok(session),
                            Ok(Err(
                                e @ (GuestError::HostKeyMismatch { .. }
                                | GuestError::AuthRejected { .. }),
                            )) => {
                                return Err(e);
                            }
                            Ok(Err(e)) => last_error = e.to_string(),
                            Err(_) => last_error = "SSH handshake timed out".to_string(),
                        }
                    }
                    Ok(Err(e)) => last_error = e.to_string(),
                    Err(_) => last_error = "TCP connect timed out".to_string(),
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        };
        match tokio::time::timeout(timeout, attempts).await {
            Ok(result) => result,
            Err(_) => Err(GuestError::NotReady {
                addr,
                waited_ms: started.elapsed().as_millis(),
                last_error,
            }),
        }
    }

    /// Connects once, without retrying.
    pub async fn connect(addr: SocketAddr, keys: &GuestKeys) -> Result<Self, GuestError> {
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| GuestError::Connection {
                addr,
                reason: "TCP connect timed out".to_string(),
            })?
            .map_err(|e| GuestError::Connection {
                addr,
                reason: e.to_string(),
            })?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::handshake(addr, stream, keys))
            .await
            .map_err(|_| GuestError::Connection {
                addr,
                reason: "SSH handshake timed out".to_string(),
            })?
    }

    async fn handshake(
        addr: SocketAddr,
        stream: TcpStream,
        keys: &GuestKeys,
    ) -> Result<Self, GuestError> {
        let _ = stream.set_nodelay(true);
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_max: KEEPALIVE_MAX,
            nodelay: true,
            ..Default::default()
        });
        let mismatch = Arc::new(Mutex::new(None));
        let handler = PinnedHost {
            expected: keys.host.clone(),
            mismatch: Arc::clone(&mismatch),
        };
        let connection_error = |e: russh::Error| GuestError::Connection {
            addr,
            reason: e.to_string(),
        };
        let mut handle = match client::connect_stream(config, stream, handler).await {
            Ok(handle) => handle,
            Err(e) => {
                if let Some(presented) = mismatch.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(GuestError::HostKeyMismatch {
                        addr,
                        presented,
                        expected: fingerprint(&keys.host),
                    });
                }
                return Err(connection_error(e));
            }
        };
        let key = PrivateKeyWithHashAlg::new(Arc::clone(&keys.client), None);
        let auth = handle
            .authenticate_publickey(GUEST_USER, key)
            .await
            .map_err(connection_error)?;
        if !auth.success() {
            return Err(GuestError::AuthRejected { addr });
        }
        Ok(GuestSession { addr, handle })
    }

    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Runs `req.cmd` through the guest user's shell and collects its output.
    ///
    /// A non-zero exit is a normal result. On timeout every process of this exec is killed
    /// (found by the marker in its environment) and the output so far is returned.
    pub async fn exec(&self, req: &ExecRequest<'_>) -> Result<ExecOutput, GuestError> {
        let lost = |e: russh::Error| GuestError::Connection {
            addr: self.addr,
            reason: e.to_string(),
        };
        let mut channel = self.handle.channel_open_session().await.map_err(lost)?;
        let marker = format!("export {EXEC_MARKER}={};", req.exec_id);
        if req.cmd.len() <= INLINE_CMD_MAX {
            channel
                .exec(true, format!("{marker} {}", req.cmd))
                .await
                .map_err(lost)?;
        } else {
            // Too long for the SSH server's command string: send it as stdin, where the shell
            // reads exactly its length and runs it.
            let reader = format!("{marker} eval \"$(head -c {})\"", req.cmd.len());
            channel.exec(true, reader).await.map_err(lost)?;
            channel.data(req.cmd.as_bytes()).await.map_err(lost)?;
        }
        // The command gets end-of-file on stdin rather than waiting for input nobody sends.
        channel.eof().await.map_err(lost)?;

        let mut out = ExecOutput::default();
        let mut kept = 0usize;
        let deadline = tokio::time::Instant::now() + req.timeout;
        loop {
            let msg = match tokio::time::timeout_at(deadline, channel.wait()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(_) => {
                    out.timed_out = true;
                    let _ = channel.close().await;
                    self.kill_exec(req.exec_id).await;
                    break;
                }
            };
            match msg {
                ChannelMsg::Data { data } => keep(
                    &mut out.stdout,
                    &data,
                    &mut kept,
                    req.output_limit,
                    &mut out.truncated,
                ),
                ChannelMsg::ExtendedData { data, ext: 1 } => keep(
                    &mut out.stderr,
                    &data,
                    &mut kept,
                    req.output_limit,
                    &mut out.truncated,
                ),
                ChannelMsg::ExitStatus { exit_status } => out.exit_code = Some(exit_status as i32),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    out.signal = Some(format!("{signal_name:?}"))
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }

        if out.exit_code.is_none() && out.signal.is_none() && !out.timed_out {
            return Err(GuestError::Connection {
                addr: self.addr,
                reason: "the connection closed before the command reported an exit status"
                    .to_string(),
            });
        }
        Ok(out)
    }

    /// Kills every process in the guest whose environment carries this exec's marker.
    async fn kill_exec(&self, exec_id: &str) {
        // Marked processes and all their descendants (a child that cleared its environment is
        // still a child), found first and killed together, so none is re-parented to init
        // before it is seen. Shell builtins only: no process per /proc entry, fast under TCG.
        let script = format!(
            "declare -A doomed=() parent=(); \
             for d in /proc/[0-9]*; do \
               p=${{d#/proc/}}; read -r st < \"$d/stat\" 2>/dev/null || continue; \
               set -- ${{st##*) }}; parent[$p]=$2; \
               mapfile -d '' -t env < \"$d/environ\" 2>/dev/null; \
               for v in \"${{env[@]}}\"; do \
                 if [[ $v == '{EXEC_MARKER}={exec_id}' ]]; then doomed[$p]=1; break; fi; \
               done; \
             done; \
             grew=1; while ((grew)); do grew=0; \
               for p in \"${{!parent[@]}}\"; do \
                 if [[ -z ${{doomed[$p]}} && -n ${{doomed[${{parent[$p]}}]}} ]]; then doomed[$p]=1; grew=1; fi; \
               done; \
             done; \
             ((${{#doomed[@]}})) && kill -9 \"${{!doomed[@]}}\" 2>/dev/null; true"
        );
        let Ok(mut channel) = self.handle.channel_open_session().await else {
            return;
        };
        if channel.exec(true, script).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(msg) = channel.wait().await {
                if matches!(msg, ChannelMsg::Close) {
                    break;
                }
            }
        })
        .await;
    }

    /// Closes the connection politely (best effort).
    pub async fn close(&self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "sandbox destroyed", "en")
            .await;
    }
}

/// Appends `data` to `buf` while the exec's total stays under `limit`; counts the rest as
/// dropped.
fn keep(buf: &mut Vec<u8>, data: &[u8], kept: &mut usize, limit: usize, truncated: &mut bool) {
    let room = limit.saturating_sub(*kept);
    let take = room.min(data.len());
    buf.extend_from_slice(&data[..take]);
    *kept += take;
    if take < data.len() {
        *truncated = true;
    }
}

fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(Default::default()).to_string()
}

/// Accepts exactly one server key: the one recorded when the image was built.
struct PinnedHost {
    expected: PublicKey,
    mismatch: Arc<Mutex<Option<String>>>,
}

impl client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        presented: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match presented {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                *self.mismatch.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some("a certificate".to_string());
                return Ok(false);
            }
        };
        if key.key_data() == self.expected.key_data() {
            return Ok(true);
        }
        *self.mismatch.lock().unwrap_or_else(|p| p.into_inner()) = Some(fingerprint(key));
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_cap_counts_both_streams() {
        let mut out = ExecOutput::default();
        let mut kept = 0;
        keep(&mut out.stdout, b"hello", &mut kept, 8, &mut out.truncated);
        assert!(!out.truncated);
        keep(&mut out.stderr, b"world", &mut kept, 8, &mut out.truncated);
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"wor");
        assert!(out.truncated);
        keep(&mut out.stdout, b"more", &mut kept, 8, &mut out.truncated);
        assert_eq!(out.stdout, b"hello");
    }
}
