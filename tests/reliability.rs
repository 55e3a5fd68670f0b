//! Reliability against the real server and real VMs: crashes and restarts, bursts, long runs,
//! hostile commands, and failures in the middle of create.

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{Server, ServerOptions, pids_mentioning};
use serde_json::{Value, json};

fn id_of(created: &Value) -> String {
    created["sandbox_id"].as_str().unwrap().to_string()
}

/// Pids of the VMM running one sandbox.
fn vm_pids(server: &Server, id: &str) -> Vec<u32> {
    pids_mentioning(&format!("{}/sandboxes/{id}/", server.work_dir.display()))
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) on a VMM pid this test found for its own sandbox.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing in /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn ids_listed(server: &Server) -> Vec<String> {
    let mut ids: Vec<String> = server.request("GET", "/sandboxes", None).json()["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandbox_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn kill9_then_restart_readopts_live_vms_and_cleans_dead_ones() {
    let mut server = Server::start();
    let ids: Vec<String> = (0..3).map(|_| id_of(&server.create())).collect();
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    server.exec(a, "echo before > /root/mark");

    server.kill9();
    let c_pids = vm_pids(&server, c);
    assert_eq!(c_pids.len(), 1, "VM of {c}: {c_pids:?}");
    kill9(c_pids[0]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.vmm_pids().len(), 2, "two VMs survive the server");

    server.restart(ServerOptions::default());
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(ids_listed(&server), expected, "log:\n{}", server.log_text());

    // Re-adopted sandboxes keep their state and run commands; the dead one is gone for good.
    assert_eq!(server.exec(a, "cat /root/mark")["stdout"], "before\n");
    assert_eq!(server.exec(b, "echo alive")["stdout"], "alive\n");
    assert_eq!(server.destroy(c).status, 404);
    let mut taps = server.net.taps();
    taps.sort();
    assert_eq!(
        taps.len(),
        2,
        "the dead sandbox's tap was removed: {taps:?}"
    );
    assert_eq!(
        server.net.sandbox_rules().len(),
        2,
        "{:?}",
        server.net.sandbox_rules()
    );
    assert!(!server.work_dir.join("sandboxes").join(c).exists());

    assert_eq!(server.destroy(a).status, 200);
    assert_eq!(server.destroy(b).status, 200);
    server.assert_no_leftovers();
}

#[test]
fn keep_on_exit_leaves_vms_for_the_next_start() {
    let keep = ServerOptions {
        env: vec![("MANTA_KEEP_ON_EXIT".into(), "1".into())],
        ..Default::default()
    };
    let mut server = Server::start_with(keep);
    let id = id_of(&server.create());
    assert!(server.terminate().success());
    assert_eq!(
        vm_pids(&server, &id).len(),
        1,
        "the VM outlives a MANTA_KEEP_ON_EXIT=1 shutdown"
    );

    server.restart(ServerOptions::default());
    assert_eq!(ids_listed(&server), vec![id.clone()]);
    assert_eq!(server.exec(&id, "echo again")["stdout"], "again\n");
    assert_eq!(server.destroy(&id).status, 200);
    server.assert_no_leftovers();
}

#[test]
fn restart_removes_leftovers_without_records() {
    let mut server = Server::start();
    let id = id_of(&server.create());
    server.kill9();
    // Lose the record, as if the disk had been tampered with: the VM, tap and rule remain.
    std::fs::remove_file(
        server
            .work_dir
            .join("sandboxes")
            .join(&id)
            .join("sandbox.json"),
    )
    .unwrap();
    let stray_dir = server.work_dir.join("sandboxes").join("sb-ffffffffffff");
    std::fs::create_dir_all(&stray_dir).unwrap();

    server.restart(ServerOptions::default());
    assert_eq!(ids_listed(&server), Vec::<String>::new());
    server.assert_no_leftovers();
    let log = server.log_text();
    assert!(
        log.contains("removing work dir with no valid record"),
        "{log}"
    );
}

#[test]
fn eight_concurrent_sandboxes_get_distinct_addresses_and_taps() {
    let server = Arc::new(Server::start());
    let barrier = Arc::new(Barrier::new(8));
    let workers: Vec<_> = (0..8)
        .map(|n| {
            let server = Arc::clone(&server);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let resp = server.request("POST", "/create", Some(r#"{"boot_timeout_s":300}"#));
                assert_eq!(resp.status, 201, "create {n}: {}", resp.text);
                let created = resp.json();
                let id = id_of(&created);
                let ip = created["ip"].as_str().unwrap().to_string();
                let out = server.exec(&id, &format!("echo {n}; ip -4 -o addr show eth0"));
                assert_eq!(out["exit_code"], 0);
                assert!(
                    out["stdout"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("{n}\n"))
                );
                assert!(
                    out["stdout"]
                        .as_str()
                        .unwrap()
                        .contains(&format!("{ip}/30")),
                    "{out}"
                );
                barrier.wait();
                let taps = server.net.taps();
                barrier.wait();
                assert_eq!(server.destroy(&id).status, 200);
                (ip, taps)
            })
        })
        .collect();
    let results: Vec<(String, Vec<String>)> =
        workers.into_iter().map(|w| w.join().unwrap()).collect();
    let ips: std::collections::HashSet<_> = results.iter().map(|(ip, _)| ip.clone()).collect();
    assert_eq!(ips.len(), 8, "addresses: {ips:?}");
    let taps: std::collections::HashSet<_> = results[0].1.iter().cloned().collect();
    assert_eq!(taps.len(), 8, "taps while all 8 lived: {taps:?}");
    server.assert_no_leftovers();
}

#[test]
fn hundred_cycles_leak_nothing() {
    let cycles: usize = std::env::var("MANTA_TEST_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let server = Server::start();
    let pid = server.pid();

    // One cycle first, so lazily made things (runtime threads, SSH state) exist at the baseline.
    let warm = id_of(&server.create());
    assert_eq!(server.destroy(&warm).status, 200);
    let fds_before = open_fds(pid);
    let rss_before = status_kib(pid, "VmRSS");

    let started = Instant::now();
    for n in 0..cycles {
        let id = id_of(&server.create());
        if n % 10 == 0 {
            assert_eq!(server.exec(&id, "echo ok")["stdout"], "ok\n");
        }
        let resp = server.destroy(&id);
        assert_eq!(resp.status, 200, "cycle {n}: {}", resp.text);
    }
    let fds_after = open_fds(pid);
    let rss_after = status_kib(pid, "VmRSS");
    eprintln!(
        "{cycles} cycles in {:.1} s; fds {fds_before} -> {fds_after}; RSS {rss_before} KiB -> {rss_after} KiB",
        started.elapsed().as_secs_f64()
    );
    server.assert_no_leftovers();
    assert_eq!(fds_after, fds_before, "open fds changed");
    assert!(
        rss_after <= rss_before + 10 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn exec_timeout_kills_background_children_holding_stdout() {
    let server = Server::start();
    let id = id_of(&server.create());
    let started = Instant::now();
    // The shell itself waits, so the exec only ends by the timeout; the background child
    // holds the same stdout; another clears its environment, so only parentage ties it to us.
    let out = server.exec_with(
        &id,
        "(sleep 300; echo late) & env -i sleep 301 & echo started; sleep 600",
        Some(2.0),
    );
    let took = started.elapsed();
    assert_eq!(out["timed_out"], true, "{out}");
    assert_eq!(out["stdout"], "started\n");
    assert!(took < Duration::from_secs(15), "timeout took {took:?}");
    let left = server.exec(&id, "pgrep -x sleep");
    assert_eq!(left["exit_code"], 1, "a sleep survived the timeout: {left}");

    let plain = server.exec_with(&id, "sleep 30", Some(1.0));
    assert_eq!(plain["timed_out"], true);
    assert_eq!(plain["exit_code"], Value::Null);
    assert_eq!(server.exec(&id, "pgrep -x sleep")["exit_code"], 1);
    assert_eq!(server.destroy(&id).status, 200);
}

#[test]
fn exec_output_is_capped_and_memory_stays_bounded() {
    let cap = 1024 * 1024;
    let server = Server::start_with(ServerOptions {
        env: vec![("MANTA_EXEC_OUTPUT_LIMIT".into(), cap.to_string())],
        ..Default::default()
    });
    let id = id_of(&server.create());
    let pid = server.pid();
    let hwm_before = status_kib(pid, "VmHWM");

    let out = server.exec_with(
        &id,
        "head -c 100000000 /dev/zero | tr '\\0' y; echo done >&2",
        Some(300.0),
    );
    assert_eq!(out["exit_code"], 0, "{}", out["stderr"]);
    assert_eq!(out["truncated"], true);
    let stdout = out["stdout"].as_str().unwrap();
    assert_eq!(stdout.len(), cap);
    assert!(stdout.bytes().all(|b| b == b'y'));

    let hwm_after = status_kib(pid, "VmHWM");
    eprintln!(
        "server peak RSS {hwm_before} KiB -> {hwm_after} KiB for 100 MB of output, cap {cap} B"
    );
    assert!(
        hwm_after < hwm_before + 32 * 1024,
        "the server's peak memory grew by {} KiB for 100 MB of output",
        hwm_after - hwm_before
    );
    assert_eq!(server.destroy(&id).status, 200);
}

#[test]
fn non_utf8_output_comes_back_byte_exact() {
    let server = Server::start();
    let id = id_of(&server.create());
    let out = server.exec(&id, r"printf '\377\376\000A'; printf '\200' >&2");
    assert_eq!(out["stdout_b64"], "//4AQQ==", "{out}");
    assert_eq!(out["stderr_b64"], "gA==", "{out}");
    let clean = server.exec(&id, "printf 'h\\303\\251'");
    assert_eq!(clean["stdout"], "hé");
    assert!(clean.get("stdout_b64").is_none());
    assert_eq!(server.destroy(&id).status, 200);
}

#[test]
fn guest_death_mid_exec_is_an_error_within_seconds() {
    let server = Arc::new(Server::start());
    let id = id_of(&server.create());
    let vm = vm_pids(&server, &id);
    assert_eq!(vm.len(), 1);

    let s = Arc::clone(&server);
    let id2 = id.clone();
    let exec = std::thread::spawn(move || {
        let body = json!({"sandbox_id": id2, "cmd": "sleep 120", "timeout_s": 200}).to_string();
        let resp = s.request("POST", "/exec", Some(&body));
        (resp, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    kill9(vm[0]);
    let (resp, answered_at) = exec.join().unwrap();
    let delay = answered_at.duration_since(killed_at);
    eprintln!(
        "exec answered {delay:?} after the VM was killed: {}",
        resp.text
    );
    assert_eq!(resp.status, 500, "{}", resp.text);
    assert_eq!(resp.json()["error"]["code"], "exec_failed");
    assert!(delay < Duration::from_secs(5), "took {delay:?}");
    let listed = server.request("GET", "/sandboxes", None).json();
    assert_eq!(listed["sandboxes"][0]["vm_alive"], false, "{listed}");

    assert_eq!(server.destroy(&id).status, 200);
    server.assert_no_leftovers();
}

#[test]
fn destroy_during_exec_ends_the_exec_with_an_error() {
    let server = Arc::new(Server::start());
    let id = id_of(&server.create());
    let s = Arc::clone(&server);
    let id2 = id.clone();
    let exec = std::thread::spawn(move || {
        let body = json!({"sandbox_id": id2, "cmd": "sleep 120", "timeout_s": 200}).to_string();
        s.request("POST", "/exec", Some(&body))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let destroyed = server.destroy(&id);
    assert_eq!(destroyed.status, 200, "{}", destroyed.text);
    let resp = exec.join().unwrap();
    assert_eq!(resp.status, 409, "{}", resp.text);
    assert_eq!(resp.json()["error"]["code"], "destroyed_during_exec");
    server.assert_no_leftovers();
}

#[test]
fn concurrent_execs_in_one_sandbox_all_complete() {
    let server = Arc::new(Server::start());
    let id = id_of(&server.create());
    let workers: Vec<_> = (0..6)
        .map(|n| {
            let s = Arc::clone(&server);
            let id = id.clone();
            std::thread::spawn(move || s.exec(&id, &format!("sleep 1; echo {n}")))
        })
        .collect();
    for (n, w) in workers.into_iter().enumerate() {
        let out = w.join().unwrap();
        assert_eq!(out["stdout"], format!("{n}\n"));
        assert_eq!(out["exit_code"], 0);
    }
    assert_eq!(server.destroy(&id).status, 200);
}

#[test]
fn capacity_limit_answers_503_at_once() {
    let server = Server::start_with(ServerOptions {
        env: vec![("MANTA_MAX_SANDBOXES".into(), "1".into())],
        ..Default::default()
    });
    let id = id_of(&server.create());
    let started = Instant::now();
    let resp = server.request("POST", "/create", None);
    assert_eq!(resp.status, 503, "{}", resp.text);
    assert_eq!(resp.json()["error"]["code"], "at_capacity");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        started.elapsed()
    );
    assert_eq!(ids_listed(&server), vec![id.clone()]);
    assert_eq!(server.net.taps().len(), 1);
    assert_eq!(server.destroy(&id).status, 200);
    server.assert_no_leftovers();
}

#[test]
fn failed_creates_undo_every_step() {
    // Boot timeout: the guest cannot answer SSH within 1 s under emulation.
    let server = Server::start();
    assert_create_fails(
        &server,
        Some(r#"{"boot_timeout_s":1}"#),
        "boot_timeout",
        "did not answer SSH",
    );

    // Disk full: the per-sandbox disk copy runs out of space in the work dir.
    let server = Server::start_with(ServerOptions {
        work_dir_tmpfs_mib: Some(16),
        ..Default::default()
    });
    assert_create_fails(&server, None, "create_failed", "rootfs");
    assert_eq!(ids_listed(&server), Vec::<String>::new());
    drop(server);

    // The VMM exits at once (a binary that fails in place of QEMU).
    let server = Server::start_with(ServerOptions {
        env: vec![
            ("MANTA_VMM".into(), "qemu".into()),
            ("MANTA_QEMU_BIN".into(), "/bin/false".into()),
        ],
        ..Default::default()
    });
    assert_create_fails(&server, None, "create_failed", "exited");
}

/// Asserts that a create answers 500 with `code` and a message containing `needle`, and that
/// it left nothing behind.
fn assert_create_fails(server: &Server, body: Option<&str>, code: &str, needle: &str) {
    let resp = server.request("POST", "/create", body);
    assert_eq!(resp.status, 500, "{}", resp.text);
    let err = resp.json();
    assert_eq!(err["error"]["code"], code);
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains(needle), "{needle:?} not in {message}");
    server.assert_no_leftovers();
}

#[test]
fn clients_that_hang_up_do_not_strand_sandboxes() {
    let server = Server::start();

    // Hang up half a second into a create: the create still finishes.
    server.hang_up_after("POST", "/create", "{}", Duration::from_millis(500));
    let list = server.wait_for_list(Duration::from_secs(120), |l| {
        l.len() == 1 && l[0]["state"] == "running"
    });
    let id = list[0]["sandbox_id"].as_str().unwrap().to_string();
    assert_eq!(server.exec(&id, "echo alive")["stdout"], "alive\n");

    // Hang up at once on a destroy: the destroy still finishes and the sandbox is forgotten.
    let body = json!({ "sandbox_id": id }).to_string();
    server.hang_up_after("POST", "/destroy", &body, Duration::from_millis(5));
    server.wait_for_list(Duration::from_secs(30), |l| l.is_empty());
    server.assert_no_leftovers();
}

#[test]
fn long_commands_run_and_stdin_is_closed() {
    let server = Server::start();
    let id = id_of(&server.create());

    // 100 KB of script: beyond what the SSH server takes in one exec request.
    let long = format!(": '{}'; echo long-ok", "x".repeat(100_000));
    let out = server.exec(&id, &long);
    assert_eq!(out["stdout"], "long-ok\n", "{}", out["stderr"]);
    assert_eq!(out["exit_code"], 0);
    // And the connection is still fine for the next command.
    assert_eq!(server.exec(&id, "echo next")["stdout"], "next\n");

    let started = Instant::now();
    let cat = server.exec_with(&id, "cat; read x; echo \"read=$?\"", Some(30.0));
    assert_eq!(
        cat["timed_out"], false,
        "a command reading stdin waited for input: {cat}"
    );
    assert_eq!(cat["stdout"], "read=1\n");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(server.destroy(&id).status, 200);
}

#[test]
fn a_second_server_on_the_same_work_dir_refuses_to_start() {
    let server = Server::start();
    let work_dir = server.work_dir.display().to_string();
    let out = common::server_command(
        Some(&server.net.name),
        &[
            ("MANTA_LISTEN_ADDR", "127.0.0.1:18098"),
            ("MANTA_HOST_IFACE", "up0"),
            ("MANTA_WORK_DIR", &work_dir),
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("another manta-server already uses MANTA_WORK_DIR"),
        "{stderr}"
    );
    assert_eq!(
        server.request("GET", "/healthz", None).status,
        200,
        "the first server still serves"
    );
}
