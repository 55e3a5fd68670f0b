//! Typed server settings, read once from `MANTA_*` environment variables.
//!
//! Every value is checked here, at start, so that a typo stops the server with a message naming
//! the variable instead of surfacing later as a failed sandbox.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Default API address: loopback only, so a fresh install is not reachable from the network.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:8080";
/// Default directory for per-sandbox disks, logs, sockets and records.
pub const DEFAULT_WORK_DIR: &str = "/tmp/manta";
/// Default cap on the bytes of stdout plus stderr kept per exec (10 MiB).
pub const DEFAULT_EXEC_OUTPUT_LIMIT: usize = 10 * 1024 * 1024;
/// Root disk copies kept ready, so a create renames one instead of copying the image.
pub const DEFAULT_DISK_POOL: usize = 2;
/// User QEMU drops to after start-up (Debian's unprivileged `nobody`).
pub const DEFAULT_VMM_USER: &str = "nobody";
/// Memory the host keeps for itself when the sandbox cap is derived from RAM (MiB).
const HOST_RESERVED_MIB: u64 = 1024;
/// Guest memory assumed per sandbox when deriving the default cap (MiB).
const CAP_MIB_PER_SANDBOX: u64 = 256;

/// Errors found while reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable holds a value that cannot be used.
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    /// A file the server needs is missing.
    #[error("{var} points to {path}, which does not exist{hint}")]
    MissingFile {
        var: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    /// No host interface was given and none could be found.
    #[error(
        "MANTA_HOST_IFACE is not set and the host has no default route to take it from; \
         set MANTA_HOST_IFACE to the uplink interface guests should be NATed out of"
    )]
    NoHostIface,
    /// The API would be reachable from the network without a token.
    #[error(
        "MANTA_LISTEN_ADDR={0} is not a loopback address, and MANTA_API_TOKEN is not set; \
         refusing to expose an unauthenticated root service (set MANTA_API_TOKEN, or listen \
         on 127.0.0.1)"
    )]
    OpenWithoutToken(SocketAddr),
}

/// Which virtual machine monitor runs the guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmChoice {
    /// Firecracker where the host can run it, QEMU otherwise.
    Auto,
    Firecracker,
    Qemu,
}

/// What guests may reach beyond their own tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressPolicy {
    /// Public addresses only: private ranges, link-local (metadata) and the host are dropped.
    Internet,
    /// Nothing is forwarded out of the host interface.
    None,
    /// Everything but the host itself and other guests.
    All,
}

/// All server settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub kernel_path: PathBuf,
    pub rootfs_path: PathBuf,
    pub ssh_key_path: PathBuf,
    pub ssh_host_key_path: PathBuf,
    pub firecracker_bin: PathBuf,
    pub jailer_bin: Option<PathBuf>,
    pub qemu_bin: PathBuf,
    pub vmm: VmmChoice,
    pub host_iface: String,
    pub work_dir: PathBuf,
    pub max_sandboxes: usize,
    pub exec_output_limit: usize,
    pub keep_on_exit: bool,
    pub api_token: Option<String>,
    pub egress: EgressPolicy,
    /// Unprivileged user QEMU switches to once it has opened its devices; `None` for root.
    pub vmm_user: Option<String>,
    /// Root disk copies kept ready ahead of creates (0 disables the pool).
    pub disk_pool: usize,
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_vars(&vars, &RealHost)
    }

    /// Reads the configuration from `vars`; `host` answers questions about the machine.
    pub fn from_vars(
        vars: &HashMap<String, String>,
        host: &dyn HostFacts,
    ) -> Result<Self, ConfigError> {
        let get = |name: &str| vars.get(name).map(String::as_str).filter(|v| !v.is_empty());
        let path = |name: &'static str, default: &str| PathBuf::from(get(name).unwrap_or(default));

        let listen_raw = get("MANTA_LISTEN_ADDR").unwrap_or(DEFAULT_LISTEN_ADDR);
        let listen_addr = parse_listen_addr(listen_raw).ok_or_else(|| ConfigError::Invalid {
            var: "MANTA_LISTEN_ADDR",
            value: listen_raw.to_string(),
            reason: "expected HOST:PORT such as 127.0.0.1:8080 (or :PORT for all interfaces)"
                .to_string(),
        })?;
        let api_token = get("MANTA_API_TOKEN").map(str::to_string);
        if let Some(token) = &api_token
            && token.len() < 16
        {
            return Err(ConfigError::Invalid {
                var: "MANTA_API_TOKEN",
                value: "<hidden>".to_string(),
                reason: format!(
                    "a token needs at least 16 characters, this one has {}",
                    token.len()
                ),
            });
        }
        if !listen_addr.ip().is_loopback() && api_token.is_none() {
            return Err(ConfigError::OpenWithoutToken(listen_addr));
        }

        let kernel_path = path("MANTA_KERNEL_PATH", "./guest-artifacts/vmlinux");
        let rootfs_path = path("MANTA_ROOTFS_PATH", "./guest-artifacts/rootfs.ext4");
        let ssh_key_path = path("MANTA_SSH_KEY_PATH", "./guest-artifacts/sandbox_key");
        let ssh_host_key_path = path(
            "MANTA_SSH_HOST_KEY_PATH",
            "./guest-artifacts/ssh_host_ed25519_key.pub",
        );
        for (var, p) in [
            ("MANTA_KERNEL_PATH", &kernel_path),
            ("MANTA_ROOTFS_PATH", &rootfs_path),
            ("MANTA_SSH_KEY_PATH", &ssh_key_path),
            ("MANTA_SSH_HOST_KEY_PATH", &ssh_host_key_path),
        ] {
            if !p.exists() {
                return Err(ConfigError::MissingFile {
                    var,
                    path: p.clone(),
                    hint: " (build the guest artifacts with guest/build-all.sh)",
                });
            }
        }

        let vmm_raw = get("MANTA_VMM").unwrap_or("auto");
        let vmm = match vmm_raw {
            "auto" => VmmChoice::Auto,
            "firecracker" => VmmChoice::Firecracker,
            "qemu" => VmmChoice::Qemu,
            other => {
                return Err(ConfigError::Invalid {
                    var: "MANTA_VMM",
                    value: other.to_string(),
                    reason: "expected auto, firecracker or qemu".to_string(),
                });
            }
        };

        let host_iface = match get("MANTA_HOST_IFACE") {
            Some(name) => {
                if !valid_iface_name(name) {
                    return Err(ConfigError::Invalid {
                        var: "MANTA_HOST_IFACE",
                        value: name.to_string(),
                        reason: "not a valid interface name (1-15 characters, no '/' or spaces)"
                            .to_string(),
                    });
                }
                if !host.iface_exists(name) {
                    return Err(ConfigError::Invalid {
                        var: "MANTA_HOST_IFACE",
                        value: name.to_string(),
                        reason: "no such network interface on this host".to_string(),
                    });
                }
                name.to_string()
            }
            None => host.default_route_iface().ok_or(ConfigError::NoHostIface)?,
        };

        let max_sandboxes = match get("MANTA_MAX_SANDBOXES") {
            Some(raw) => parse_in_range("MANTA_MAX_SANDBOXES", raw, 1, 4096)?,
            None => default_max_sandboxes(host.total_memory_mib()),
        };
        let exec_output_limit = match get("MANTA_EXEC_OUTPUT_LIMIT") {
            Some(raw) => parse_in_range("MANTA_EXEC_OUTPUT_LIMIT", raw, 1024, 1 << 30)?,
            None => DEFAULT_EXEC_OUTPUT_LIMIT,
        };
        let keep_on_exit = match get("MANTA_KEEP_ON_EXIT").unwrap_or("0") {
            "1" | "true" => true,
            "0" | "false" => false,
            other => {
                return Err(ConfigError::Invalid {
                    var: "MANTA_KEEP_ON_EXIT",
                    value: other.to_string(),
                    reason: "expected 0 or 1".to_string(),
                });
            }
        };
        let egress = match get("MANTA_EGRESS").unwrap_or("internet") {
            "internet" => EgressPolicy::Internet,
            "none" => EgressPolicy::None,
            "all" => EgressPolicy::All,
            other => {
                return Err(ConfigError::Invalid {
                    var: "MANTA_EGRESS",
                    value: other.to_string(),
                    reason: "expected internet, none or all".to_string(),
                });
            }
        };

        let vmm_user = match get("MANTA_VMM_USER").unwrap_or(DEFAULT_VMM_USER) {
            "root" => None,
            name if host.user_exists(name) => Some(name.to_string()),
            name => {
                return Err(ConfigError::Invalid {
                    var: "MANTA_VMM_USER",
                    value: name.to_string(),
                    reason: "no such user on this host (or set it to root to keep QEMU privileged)"
                        .to_string(),
                });
            }
        };

        let disk_pool = match get("MANTA_DISK_POOL") {
            Some(raw) => parse_in_range("MANTA_DISK_POOL", raw, 0, 64)?,
            None => DEFAULT_DISK_POOL,
        };

        let work_dir = path("MANTA_WORK_DIR", DEFAULT_WORK_DIR);
        if work_dir.as_os_str().is_empty() || work_dir == Path::new("/") {
            return Err(ConfigError::Invalid {
                var: "MANTA_WORK_DIR",
                value: work_dir.display().to_string(),
                reason: "must be a dedicated directory".to_string(),
            });
        }

        Ok(Config {
            listen_addr,
            kernel_path,
            rootfs_path,
            ssh_key_path,
            ssh_host_key_path,
            firecracker_bin: path("MANTA_FIRECRACKER_BIN", "firecracker"),
            jailer_bin: get("MANTA_JAILER_BIN").map(PathBuf::from),
            qemu_bin: path("MANTA_QEMU_BIN", "qemu-system-x86_64"),
            vmm,
            host_iface,
            work_dir,
            max_sandboxes,
            exec_output_limit,
            keep_on_exit,
            api_token,
            egress,
            vmm_user,
            disk_pool,
        })
    }
}

/// Facts about the host that the configuration depends on (a trait so tests can pin them).
pub trait HostFacts {
    fn iface_exists(&self, name: &str) -> bool;
    fn default_route_iface(&self) -> Option<String>;
    fn total_memory_mib(&self) -> u64;
    fn user_exists(&self, name: &str) -> bool;
}

/// The machine the server runs on.
pub struct RealHost;

impl HostFacts for RealHost {
    fn iface_exists(&self, name: &str) -> bool {
        crate::network::tap::TapDevice::exists(name)
    }

    fn default_route_iface(&self) -> Option<String> {
        let routes = std::fs::read_to_string("/proc/net/route").ok()?;
        default_route_from_proc(&routes)
    }

    fn total_memory_mib(&self) -> u64 {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib / 1024)
            .unwrap_or(0)
    }

    fn user_exists(&self, name: &str) -> bool {
        matches!(nix::unistd::User::from_name(name), Ok(Some(_)))
    }
}

/// Finds the interface of the IPv4 default route in the text of `/proc/net/route`.
fn default_route_from_proc(routes: &str) -> Option<String> {
    routes.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let iface = fields.next()?;
        let destination = fields.next()?;
        (destination == "00000000").then(|| iface.to_string())
    })
}

/// One sandbox per 256 MiB of memory beyond what the host keeps, at least 1, at most 256.
fn default_max_sandboxes(total_mib: u64) -> usize {
    let usable = total_mib.saturating_sub(HOST_RESERVED_MIB);
    (usable / CAP_MIB_PER_SANDBOX).clamp(1, 256) as usize
}

fn parse_listen_addr(raw: &str) -> Option<SocketAddr> {
    if let Some(port) = raw.strip_prefix(':') {
        let port = port.parse::<u16>().ok()?;
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Some(port) = raw.strip_prefix("localhost:") {
        let port = port.parse::<u16>().ok()?;
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    raw.parse().ok()
}

fn parse_in_range(
    var: &'static str,
    raw: &str,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        var,
        value: raw.to_string(),
        reason,
    };
    let value = raw
        .parse::<usize>()
        .map_err(|_| invalid("expected a whole number".to_string()))?;
    if !(min..=max).contains(&value) {
        return Err(invalid(format!("must be between {min} and {max}")));
    }
    Ok(value)
}

/// Linux interface names: 1 to 15 bytes (IFNAMSIZ - 1), no '/', no whitespace, not "." or "..".
pub fn valid_iface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost;

    impl HostFacts for FakeHost {
        fn iface_exists(&self, name: &str) -> bool {
            name == "uplink0"
        }
        fn default_route_iface(&self) -> Option<String> {
            Some("eth9".to_string())
        }
        fn total_memory_mib(&self) -> u64 {
            24 * 1024
        }
        fn user_exists(&self, name: &str) -> bool {
            name == "nobody"
        }
    }

    fn base_vars() -> HashMap<String, String> {
        // Any existing file satisfies the artifact checks in these tests.
        let existing = "/proc/self/status".to_string();
        [
            ("MANTA_KERNEL_PATH", existing.clone()),
            ("MANTA_ROOTFS_PATH", existing.clone()),
            ("MANTA_SSH_KEY_PATH", existing.clone()),
            ("MANTA_SSH_HOST_KEY_PATH", existing),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn with(extra: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut vars = base_vars();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        Config::from_vars(&vars, &FakeHost)
    }

    #[test]
    fn defaults_are_loopback_and_default_route() {
        let config = with(&[]).unwrap();
        assert_eq!(config.listen_addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.host_iface, "eth9");
        assert_eq!(config.vmm, VmmChoice::Auto);
        assert_eq!(config.max_sandboxes, (24 * 1024 - 1024) / 256);
        assert_eq!(config.exec_output_limit, DEFAULT_EXEC_OUTPUT_LIMIT);
        assert_eq!(config.egress, EgressPolicy::Internet);
        assert!(!config.keep_on_exit);
        assert_eq!(config.vmm_user.as_deref(), Some("nobody"));
        assert_eq!(with(&[("MANTA_VMM_USER", "root")]).unwrap().vmm_user, None);
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: &[(&str, &str, &str)] = &[
            ("MANTA_LISTEN_ADDR", "nonsense", "MANTA_LISTEN_ADDR"),
            ("MANTA_LISTEN_ADDR", "0.0.0.0:8080", "MANTA_API_TOKEN"),
            ("MANTA_LISTEN_ADDR", ":8080", "MANTA_API_TOKEN"),
            ("MANTA_VMM", "kvmtool", "MANTA_VMM"),
            ("MANTA_HOST_IFACE", "nosuch0", "MANTA_HOST_IFACE"),
            ("MANTA_HOST_IFACE", "a/b", "MANTA_HOST_IFACE"),
            ("MANTA_MAX_SANDBOXES", "0", "MANTA_MAX_SANDBOXES"),
            ("MANTA_MAX_SANDBOXES", "ten", "MANTA_MAX_SANDBOXES"),
            ("MANTA_EXEC_OUTPUT_LIMIT", "12", "MANTA_EXEC_OUTPUT_LIMIT"),
            ("MANTA_KEEP_ON_EXIT", "yes", "MANTA_KEEP_ON_EXIT"),
            ("MANTA_EGRESS", "some", "MANTA_EGRESS"),
            ("MANTA_API_TOKEN", "short", "MANTA_API_TOKEN"),
            (
                "MANTA_KERNEL_PATH",
                "/nonexistent/vmlinux",
                "MANTA_KERNEL_PATH",
            ),
            ("MANTA_WORK_DIR", "/", "MANTA_WORK_DIR"),
            ("MANTA_VMM_USER", "nosuchuser", "MANTA_VMM_USER"),
            ("MANTA_DISK_POOL", "65", "MANTA_DISK_POOL"),
        ];
        for (var, value, named) in cases {
            let err = with(&[(var, value)]).expect_err(&format!("{var}={value} must be rejected"));
            assert!(err.to_string().contains(named), "{var}={value}: {err}");
        }
    }

    #[test]
    fn token_allows_open_bind() {
        let config = with(&[
            ("MANTA_LISTEN_ADDR", ":9000"),
            ("MANTA_API_TOKEN", "0123456789abcdef"),
            ("MANTA_HOST_IFACE", "uplink0"),
        ])
        .unwrap();
        assert_eq!(config.listen_addr, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.host_iface, "uplink0");
    }

    #[test]
    fn default_route_parsing() {
        let table = "Iface\tDestination\tGateway\tFlags\n\
                     lo0\t0000A8C0\t00000000\t0001\n\
                     ens3\t00000000\t0100A8C0\t0003\n";
        assert_eq!(default_route_from_proc(table), Some("ens3".to_string()));
        assert_eq!(default_route_from_proc("Iface\tDestination\n"), None);
    }

    #[test]
    fn sandbox_cap_from_memory() {
        assert_eq!(default_max_sandboxes(512), 1);
        assert_eq!(default_max_sandboxes(2048), 4);
        assert_eq!(default_max_sandboxes(1 << 30), 256);
    }
}
