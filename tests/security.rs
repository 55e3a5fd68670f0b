//! Security against the real server, real guests and real iptables rules: what a guest can
//! reach, what the API lets in, and how the VMM runs.
//!
//! Every probe a guest makes here is aimed at the test namespace itself, at another guest, or
//! at an address Manta must drop; the uplink leads only into an empty namespace (the sink),
//! whose packet counter proves that nothing got out.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Server, ServerOptions};
use serde_json::Value;

const TOKEN: &str = "test-token-0123456789abcdef";

/// A TCP connect from inside the guest; prints open / refused / timeout / error.
fn probe(server: &Server, id: &str, host: &str, port: u16, bind: Option<&str>) -> String {
    let bind = bind
        .map(|b| format!("s.bind(('{b}', 0))"))
        .unwrap_or_default();
    let script = format!(
        "python3 - <<'EOF'\n\
         import socket\n\
         s = socket.socket()\n\
         s.settimeout(2)\n\
         {bind}\n\
         try:\n\
         \x20   s.connect(('{host}', {port})); print('open')\n\
         except socket.timeout: print('timeout')\n\
         except ConnectionRefusedError: print('refused')\n\
         except OSError as e: print('error', e.errno)\n\
         EOF"
    );
    let out = server.exec(id, &script);
    assert_eq!(out["exit_code"], 0, "probe script failed: {out}");
    out["stdout"].as_str().unwrap().trim().to_string()
}

fn open_server() -> Server {
    Server::start_with(ServerOptions {
        env: vec![("MANTA_LISTEN_ADDR".into(), "0.0.0.0:18080".into())],
        token: Some(TOKEN.into()),
        ..Default::default()
    })
}

fn id_of(created: &Value) -> String {
    created["sandbox_id"].as_str().unwrap().to_string()
}

#[test]
fn guests_cannot_reach_the_host_or_each_other() {
    let server = open_server();
    let a = server.create();
    let b = server.create();
    let (a_id, b_id) = (id_of(&a), id_of(&b));
    let b_ip = b["ip"].as_str().unwrap();

    // A second host service, as an sshd would be: a listener on all addresses of the namespace.
    let mut listener = Command::new("ip")
        .args([
            "netns",
            "exec",
            &server.net.name,
            "python3",
            "-m",
            "http.server",
            "2222",
            "--bind",
            "0.0.0.0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));

    // The listeners are there: the namespace itself reaches them on the tap-side address.
    let health = server
        .net
        .exec(&["curl", "-s", "-m", "5", "http://172.31.0.5:18080/healthz"]);
    assert!(
        health.contains("\"ok\""),
        "API not reachable from the host side: {health}"
    );
    let web = server.net.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-m",
        "5",
        "http://172.31.0.5:2222/",
    ]);
    assert_eq!(web, "200");

    // From guest A, every host address and port is dropped (no reply at all, not a reset).
    for (host, port) in [
        ("172.31.0.5", 18080),
        ("172.31.0.5", 2222),
        ("172.31.0.9", 18080),
        ("192.0.2.1", 18080),
    ] {
        assert_eq!(
            probe(&server, &a_id, host, port, None),
            "timeout",
            "guest A reached {host}:{port}"
        );
    }

    // IPv6 is off on the host side of every tap: no link-local address to reach the host
    // on, no router advertisements from a guest taken in.
    for tap in server.net.taps() {
        let knob = format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6");
        assert_eq!(
            server.net.exec(&["cat", &knob]).trim(),
            "1",
            "IPv6 on {tap}"
        );
        let v6 = server
            .net
            .exec(&["ip", "-6", "-o", "addr", "show", "dev", &tap]);
        assert!(v6.trim().is_empty(), "{tap} has IPv6 addresses: {v6}");
    }

    // Guest B's sshd answers the host, but not guest A.
    let from_host = server.net.exec(&[
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/{b_ip}/22 && head -c 4 <&3"),
    ]);
    assert_eq!(from_host, "SSH-");
    assert_eq!(
        probe(&server, &a_id, b_ip, 22, None),
        "timeout",
        "guest A reached guest B"
    );

    let _ = listener.kill();
    let _ = listener.wait();
    assert_eq!(server.destroy(&a_id).status, 200);
    assert_eq!(server.destroy(&b_id).status, 200);
    server.assert_no_leftovers();
}

#[test]
fn metadata_private_ranges_and_spoofed_sources_are_dropped_by_manta_rules() {
    let server = Server::start();
    let id = id_of(&server.create());
    let sink_before = server.net.sink_rx_packets();

    let metadata_before = server
        .net
        .rule_packets("filter", "MANTA-EGRESS", "169.254.0.0/16");
    assert_eq!(probe(&server, &id, "169.254.169.254", 80, None), "timeout");
    let metadata_after = server
        .net
        .rule_packets("filter", "MANTA-EGRESS", "169.254.0.0/16");
    eprintln!("metadata DROP rule: {metadata_before} -> {metadata_after} packets");
    assert!(
        metadata_after > metadata_before,
        "the metadata rule did not count the attempt"
    );

    let private_before = server
        .net
        .rule_packets("filter", "MANTA-EGRESS", "10.0.0.0/8");
    assert_eq!(probe(&server, &id, "10.1.2.3", 80, None), "timeout");
    assert!(
        server
            .net
            .rule_packets("filter", "MANTA-EGRESS", "10.0.0.0/8")
            > private_before
    );

    // A guest that gives itself another address: its packets fall to the tap catch-all DROP.
    let spoof_before = server
        .net
        .rule_packets("filter", "MANTA-FORWARD", "-i mt+ -c");
    let added = server.exec(&id, "ip addr add 172.31.0.99/32 dev eth0");
    assert_eq!(added["exit_code"], 0, "{added}");
    assert_eq!(
        probe(&server, &id, "192.0.2.77", 80, Some("172.31.0.99")),
        "timeout"
    );
    let spoof_after = server
        .net
        .rule_packets("filter", "MANTA-FORWARD", "-i mt+ -c");
    eprintln!("spoofed-source DROP rule: {spoof_before} -> {spoof_after} packets");
    assert!(
        spoof_after > spoof_before,
        "spoofed packets were not dropped by Manta's rule"
    );

    assert_eq!(
        server.net.sink_rx_packets(),
        sink_before,
        "a packet reached the uplink's far end"
    );
    eprintln!("rule set:\n{}", server.net.manta_rules().join("\n"));
    assert_eq!(server.destroy(&id).status, 200);
}

#[test]
fn api_requires_the_token_when_one_is_set() {
    let server = open_server();
    let cases: [(&[String], u16); 4] = [
        (&[], 401),
        (
            &["Authorization: Bearer wrong-token-wrong-token".to_string()],
            401,
        ),
        (&["Authorization: Basic dXNlcjpwYXNz".to_string()], 401),
        (&[format!("Authorization: Bearer {TOKEN}")], 200),
    ];
    for (headers, status) in cases {
        let resp = server
            .raw_request("GET", "/sandboxes", headers, None)
            .unwrap();
        assert_eq!(resp.status, status, "{headers:?}: {}", resp.text);
        if status == 401 {
            assert_eq!(resp.json()["error"]["code"], "unauthorized");
            assert_eq!(resp.header("www-authenticate"), Some("Bearer"));
        }
    }
    let create = server
        .raw_request("POST", "/create", &[], Some(b"{}"))
        .unwrap();
    assert_eq!(create.status, 401, "create without token: {}", create.text);
    assert!(
        server.net.taps().is_empty(),
        "an unauthorised create made a tap"
    );
    let health = server.raw_request("GET", "/healthz", &[], None).unwrap();
    assert_eq!(health.status, 200, "health checks need no token");
}

#[test]
fn open_bind_without_token_refuses_to_start() {
    common::require_root_and_artifacts();
    let out = common::server_command(
        None,
        &[
            ("MANTA_LISTEN_ADDR", "0.0.0.0:18099"),
            ("MANTA_HOST_IFACE", "lo"),
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("MANTA_API_TOKEN") && stderr.contains("0.0.0.0:18099"),
        "{stderr}"
    );
}

#[test]
fn a_guest_with_another_host_key_is_refused() {
    common::require_root_and_artifacts();
    let keydir = std::env::temp_dir().join(format!("manta-otherkey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&keydir);
    std::fs::create_dir_all(&keydir).unwrap();
    let key = keydir.join("other");
    common::sh(&[
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        key.to_str().unwrap(),
    ]);

    let server = Server::start_with(ServerOptions {
        env: vec![(
            "MANTA_SSH_HOST_KEY_PATH".into(),
            format!("{}.pub", key.display()),
        )],
        ..Default::default()
    });
    let resp = server.request("POST", "/create", None);
    assert_eq!(resp.status, 500, "{}", resp.text);
    let message = resp.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("host key") && message.contains("pinned"),
        "{message}"
    );
    server.assert_no_leftovers();
    std::fs::remove_dir_all(&keydir).unwrap();
}

#[test]
fn qemu_runs_unprivileged_under_seccomp() {
    let server = Server::start();
    let id = id_of(&server.create());
    let pids = server.vmm_pids();
    assert_eq!(pids.len(), 1);
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(
        field("Uid:"),
        vec!["65534"; 4],
        "QEMU is not running as nobody"
    );
    assert_eq!(field("Seccomp:"), vec!["2"], "QEMU has no seccomp filter");
    assert_eq!(server.destroy(&id).status, 200);
    server.assert_no_leftovers();
}
