//! Harness for integration tests: a private network namespace with a sink uplink, the real
//! `manta-server` binary running inside it, and a small HTTP client that talks to it.
//!
//! Network safety: the server's uplink (`up0`) is one end of a veth pair whose other end sits
//! alone in a second namespace (the "sink"). Nothing routes further, so no packet a guest sends
//! can leave the machine; the sink's counters show what would have left.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Fails loudly (never skips) when the test cannot run here.
pub fn require_root_and_artifacts() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these integration tests need root (network namespaces, taps, iptables, VMs)"
    );
    let dir = artifacts_dir();
    for name in [
        "vmlinux",
        "rootfs.ext4",
        "sandbox_key",
        "ssh_host_ed25519_key.pub",
    ] {
        assert!(
            dir.join(name).exists(),
            "missing {}: build the guest artifacts first (guest/build-all.sh)",
            dir.join(name).display()
        );
    }
    dir
}

pub fn artifacts_dir() -> PathBuf {
    std::env::var_os("MANTA_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-artifacts"))
}

/// `manta-server` with a clean environment that points at the guest artifacts, to run once
/// and read its exit; started inside namespace `netns` when given.
pub fn server_command(netns: Option<&str>, env: &[(&str, &str)]) -> Command {
    let dir = artifacts_dir();
    let bin = env!("CARGO_BIN_EXE_manta-server");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin]);
            c
        }
        None => Command::new(bin),
    };
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MANTA_KERNEL_PATH", dir.join("vmlinux"))
        .env("MANTA_ROOTFS_PATH", dir.join("rootfs.ext4"))
        .env("MANTA_SSH_KEY_PATH", dir.join("sandbox_key"))
        .env(
            "MANTA_SSH_HOST_KEY_PATH",
            dir.join("ssh_host_ed25519_key.pub"),
        )
        .envs(env.iter().copied());
    cmd
}

/// Runs a command to completion; panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace for one server, plus the sink namespace behind its uplink.
pub struct TestNet {
    pub name: String,
    pub sink: String,
}

impl TestNet {
    pub fn new() -> TestNet {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("manta-t{}-{n}", std::process::id());
        let sink = format!("{name}-sink");
        let net = TestNet { name, sink };
        sh(&["ip", "netns", "add", &net.name]);
        sh(&["ip", "netns", "add", &net.sink]);
        sh(&["ip", "-n", &net.name, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", &net.name, "link", "add", "up0", "type", "veth", "peer", "name", "sink0",
            "netns", &net.sink,
        ]);
        sh(&[
            "ip",
            "-n",
            &net.name,
            "addr",
            "add",
            "192.0.2.1/24",
            "dev",
            "up0",
        ]);
        sh(&["ip", "-n", &net.name, "link", "set", "up0", "up"]);
        sh(&["ip", "-n", &net.sink, "link", "set", "sink0", "up"]);
        sh(&[
            "ip",
            "-n",
            &net.name,
            "route",
            "add",
            "default",
            "via",
            "192.0.2.254",
            "dev",
            "up0",
        ]);
        // No IPv6 chatter on the uplink, so the sink's counters count only guest traffic.
        // (Only the uplink: the taps keep the kernel's default, so the tests see what Manta
        // itself does about IPv6 on them.)
        sh(&[
            "ip",
            "netns",
            "exec",
            &net.name,
            "sysctl",
            "-qw",
            "net.ipv6.conf.up0.disable_ipv6=1",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &net.sink,
            "sysctl",
            "-qw",
            "net.ipv6.conf.sink0.disable_ipv6=1",
        ]);
        net
    }

    /// Packet count of the first rule in `table`/`chain` whose text contains `needle`.
    pub fn rule_packets(&self, table: &str, chain: &str, needle: &str) -> u64 {
        let rules = self.exec(&["iptables", "-w", "5", "-t", table, "-v", "-S", chain]);
        let line = rules
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no rule with {needle:?} in {table}/{chain}:\n{rules}"));
        let mut words = line.split_whitespace();
        words.find(|w| *w == "-c");
        words
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in {line}"))
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Names of links in the namespace that look like Manta taps.
    pub fn taps(&self) -> Vec<String> {
        self.exec(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("mt"))
            .collect()
    }

    /// Every rule in the namespace's filter and nat tables that mentions Manta or a tap.
    pub fn manta_rules(&self) -> Vec<String> {
        let mut rules = Vec::new();
        for table in ["filter", "nat"] {
            rules.extend(
                self.exec(&["iptables", "-w", "5", "-t", table, "-S"])
                    .lines()
                    .filter(|l| l.contains("MANTA") || l.contains("mt+") || l.contains("manta:"))
                    .map(|l| format!("{table}: {l}")),
            );
        }
        rules
    }

    /// Per-sandbox rules (those carrying a sandbox id comment).
    pub fn sandbox_rules(&self) -> Vec<String> {
        self.manta_rules()
            .into_iter()
            .filter(|r| r.contains("manta:sb-"))
            .collect()
    }

    /// Packets the sink end of the uplink has received.
    pub fn sink_rx_packets(&self) -> u64 {
        let out = sh(&[
            "ip",
            "netns",
            "exec",
            &self.sink,
            "cat",
            "/sys/class/net/sink0/statistics/rx_packets",
        ]);
        out.trim().parse().unwrap()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.sink])
            .status();
    }
}

/// A running `manta-server` inside a [`TestNet`].
pub struct Server {
    pub net: TestNet,
    pub work_dir: PathBuf,
    pub port: u16,
    pub token: Option<String>,
    child: Option<Child>,
    log: PathBuf,
}

/// Extra settings for a server under test.
#[derive(Default, Clone)]
pub struct ServerOptions {
    pub env: Vec<(String, String)>,
    pub token: Option<String>,
    /// Size of a tmpfs mounted as the work dir before the server starts (the server runs in
    /// its own mount namespace, so a later mount would not be seen by it).
    pub work_dir_tmpfs_mib: Option<u32>,
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(ServerOptions::default())
    }

    pub fn start_with(options: ServerOptions) -> Server {
        let artifacts = require_root_and_artifacts();
        become_subreaper();
        let net = TestNet::new();
        let work_dir = std::env::temp_dir().join(format!("{}-work", net.name));
        let _ = std::fs::remove_dir_all(&work_dir);
        if let Some(mib) = options.work_dir_tmpfs_mib {
            std::fs::create_dir_all(&work_dir).unwrap();
            let size = format!("size={mib}m");
            sh(&[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &size,
                "tmpfs",
                work_dir.to_str().unwrap(),
            ]);
        }
        let mut server = Server {
            net,
            work_dir,
            port: 18080,
            token: options.token.clone(),
            child: None,
            log: PathBuf::new(),
        };
        server.log = std::env::temp_dir().join(format!("{}.log", server.net.name));
        server.spawn(&artifacts, &options);
        server
    }

    fn spawn(&mut self, artifacts: &Path, options: &ServerOptions) {
        let mut env: HashMap<String, String> = [
            ("MANTA_LISTEN_ADDR", format!("127.0.0.1:{}", self.port)),
            ("MANTA_HOST_IFACE", "up0".to_string()),
            ("MANTA_WORK_DIR", self.work_dir.display().to_string()),
            (
                "MANTA_KERNEL_PATH",
                artifacts.join("vmlinux").display().to_string(),
            ),
            (
                "MANTA_ROOTFS_PATH",
                artifacts.join("rootfs.ext4").display().to_string(),
            ),
            (
                "MANTA_SSH_KEY_PATH",
                artifacts.join("sandbox_key").display().to_string(),
            ),
            (
                "MANTA_SSH_HOST_KEY_PATH",
                artifacts
                    .join("ssh_host_ed25519_key.pub")
                    .display()
                    .to_string(),
            ),
            ("RUST_LOG", "info".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(token) = &options.token {
            env.insert("MANTA_API_TOKEN".to_string(), token.clone());
        }
        for (k, v) in &options.env {
            env.insert(k.clone(), v.clone());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.net.name,
                env!("CARGO_BIN_EXE_manta-server"),
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting manta-server");
        self.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(resp) = self.try_request("GET", "/healthz", None)
                && resp.status == 200
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "manta-server exited at start ({status}); log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "manta-server did not answer /healthz in 20 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server again in the same namespace and work dir (after a stop or kill).
    pub fn restart(&mut self, options: ServerOptions) {
        assert!(self.child.is_none(), "stop or kill the server first");
        let artifacts = require_root_and_artifacts();
        self.spawn(&artifacts, &options);
    }

    pub fn pid(&self) -> u32 {
        // `ip netns exec` execs the server in place, so the child's pid is the server's.
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: the server gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server not running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit within 120 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; server log:\n{}", self.log_text()))
    }

    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<Response> {
        let mut headers = Vec::new();
        if let Some(token) = &self.token {
            headers.push(format!("Authorization: Bearer {token}"));
        }
        self.raw_request(method, path, &headers, body.map(str::as_bytes))
    }

    /// Sends one request with exactly the given extra headers (inside the namespace).
    pub fn raw_request(
        &self,
        method: &str,
        path: &str,
        headers: &[String],
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        let ns = self.net.name.clone();
        let port = self.port;
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        // Sockets belong to the namespace of the thread that creates them, so each request
        // runs on a short-lived thread that first joins the server's namespace.
        std::thread::spawn(move || -> std::io::Result<Response> {
            enter_netns(&ns)?;
            let mut stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(300)))?;
            stream.write_all(&bytes)?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw)?;
            Response::parse(&raw)
        })
        .join()
        .expect("request thread panicked")
    }

    /// Sends a request and hangs up after `wait`, without reading the answer.
    pub fn hang_up_after(&self, method: &str, path: &str, body: &str, wait: Duration) {
        let ns = self.net.name.clone();
        let port = self.port;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        std::thread::spawn(move || {
            enter_netns(&ns).unwrap();
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            std::thread::sleep(wait);
            drop(stream);
        })
        .join()
        .unwrap();
    }

    /// Polls `GET /sandboxes` until `done` holds for the list, or panics after `limit`.
    pub fn wait_for_list(&self, limit: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let list = self.request("GET", "/sandboxes", None).json()["sandboxes"]
                .as_array()
                .unwrap()
                .clone();
            if done(&list) {
                return list;
            }
            assert!(
                Instant::now() < deadline,
                "sandbox list never settled: {list:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn create(&self) -> Value {
        let resp = self.request("POST", "/create", Some("{}"));
        assert_eq!(
            resp.status,
            201,
            "create failed: {}\nserver log:\n{}",
            resp.text,
            self.log_text()
        );
        resp.json()
    }

    pub fn exec(&self, id: &str, cmd: &str) -> Value {
        self.exec_with(id, cmd, None)
    }

    pub fn exec_with(&self, id: &str, cmd: &str, timeout_s: Option<f64>) -> Value {
        let mut body = serde_json::json!({ "sandbox_id": id, "cmd": cmd });
        if let Some(t) = timeout_s {
            body["timeout_s"] = serde_json::json!(t);
        }
        let resp = self.request("POST", "/exec", Some(&body.to_string()));
        assert_eq!(resp.status, 200, "exec {cmd:?} failed: {}", resp.text);
        resp.json()
    }

    pub fn destroy(&self, id: &str) -> Response {
        self.request(
            "POST",
            "/destroy",
            Some(&serde_json::json!({ "sandbox_id": id }).to_string()),
        )
    }

    /// Asserts that nothing of any sandbox is left: no tap, no per-sandbox rule, no VMM
    /// process started for this server, no sandbox directory.
    pub fn assert_no_leftovers(&self) {
        assert_eq!(self.net.taps(), Vec::<String>::new(), "taps left behind");
        assert_eq!(
            self.net.sandbox_rules(),
            Vec::<String>::new(),
            "per-sandbox rules left behind"
        );
        assert_eq!(
            self.vmm_pids(),
            Vec::<u32>::new(),
            "VMM processes left behind"
        );
        let dirs: Vec<_> = std::fs::read_dir(self.work_dir.join("sandboxes"))
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert_eq!(
            dirs,
            Vec::<PathBuf>::new(),
            "sandbox directories left behind"
        );
    }

    /// Pids of VMM processes whose command line points into this server's work dir.
    pub fn vmm_pids(&self) -> Vec<u32> {
        pids_mentioning(&self.work_dir.display().to_string())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let mut child = child;
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever the test did, leave no VM of ours running, and no zombie of one either.
        for pid in self.vmm_pids() {
            // SAFETY: kill(2) on a VMM started for this test's work dir.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        reap_orphaned_vmms();
        let _ = Command::new("umount")
            .arg(&self.work_dir)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.work_dir);
        if std::thread::panicking() {
            eprintln!(
                "---- server log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Makes this test process the reaper of orphans below it: a VMM whose server was killed
/// with SIGKILL is re-parented here rather than to the machine's init (which, in some
/// sandboxes, never reaps), so [`reap_orphaned_vmms`] can collect it.
fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes a plain integer argument.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

/// Reaps exited VMM processes that were re-parented to this test process.
pub fn reap_orphaned_vmms() {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        let vmm = comm.starts_with("qemu-system") || comm.starts_with("firecracker");
        if vmm && state == Some("Z") && ppid == Some(me.as_str()) {
            // SAFETY: waitpid on a zombie child of ours; status pointer may be null.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
    }
}

/// One JSON request to the server on `port` inside namespace `ns` (for use from threads that
/// do not hold the [`Server`]).
pub fn request_in(
    ns: &str,
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<Response> {
    let bytes = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    enter_netns(ns)?;
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    stream.write_all(bytes.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    Response::parse(&raw)
}

/// Pids (other than ours) whose command line contains `needle`.
pub fn pids_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            !zombie && cmd.contains(needle) && !cmd.contains("manta-server")
        })
        .collect();
    pids.sort();
    pids
}

fn enter_netns(name: &str) -> std::io::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns with a valid namespace fd; it only changes this (short-lived) thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An HTTP response, parsed.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub text: String,
}

impl Response {
    fn parse(raw: &[u8]) -> std::io::Result<Response> {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "no header end in {:?}",
                    String::from_utf8_lossy(raw)
                ))
            })?;
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad status line"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect::<Vec<_>>();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        Ok(Response {
            status,
            headers,
            text: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..line_end]).trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        out.extend_from_slice(&body[start..start + size]);
        body = &body[start + size + 2..];
    }
}
