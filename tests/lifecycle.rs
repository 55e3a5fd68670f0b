//! The main job against the real server binary and real VMs (QEMU microvm here): create,
//! exec, destroy, and the API's answers to bad input.

mod common;

use common::Server;
use serde_json::json;

#[test]
fn create_exec_destroy_leaves_nothing() {
    let server = Server::start();
    let health = server.request("GET", "/healthz", None).json();
    assert_eq!(health["status"], "ok");
    println!("backend under test: {}", health["vmm"]);

    let created = server.create();
    let id = created["sandbox_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("sb-"), "{created}");
    assert_eq!(created["ip"], "172.31.0.6");
    for phase in ["rootfs", "network", "vmm_start", "boot_to_ssh", "total"] {
        assert!(
            created["timings_ms"][phase].as_f64().unwrap() > 0.0,
            "phase {phase}: {created}"
        );
    }
    println!("create timings: {}", created["timings_ms"]);

    let listed = server.request("GET", "/sandboxes", None).json();
    assert_eq!(listed["sandboxes"][0]["sandbox_id"], id.as_str());
    assert_eq!(listed["sandboxes"][0]["state"], "running");
    assert_eq!(listed["sandboxes"][0]["vm_alive"], true);
    assert_eq!(server.net.taps(), vec!["mt1".to_string()]);
    assert_eq!(
        server.net.sandbox_rules().len(),
        1,
        "{:?}",
        server.net.sandbox_rules()
    );
    assert_eq!(server.vmm_pids().len(), 1);

    let hello = server.exec(&id, "echo hello");
    assert_eq!(hello["stdout"], "hello\n");
    assert_eq!(hello["stderr"], "");
    assert_eq!(hello["exit_code"], 0);
    assert_eq!(hello["timed_out"], false);
    assert!(hello["duration_ms"].as_f64().unwrap() > 0.0);

    let three = server.exec(&id, "echo oops >&2; exit 3");
    assert_eq!(three["exit_code"], 3);
    assert_eq!(three["stderr"], "oops\n");

    let state = server.exec(
        &id,
        "cat /etc/manta-guest >/dev/null && echo ours; ip -4 -o addr show eth0",
    );
    assert!(
        state["stdout"].as_str().unwrap().starts_with("ours\n"),
        "{state}"
    );
    assert!(
        state["stdout"].as_str().unwrap().contains("172.31.0.6/30"),
        "{state}"
    );

    let destroyed = server.destroy(&id);
    assert_eq!(destroyed.status, 200, "{}", destroyed.text);
    assert_eq!(destroyed.json()["destroyed"], true);
    server.assert_no_leftovers();

    let again = server.destroy(&id);
    assert_eq!(again.status, 404);
    assert_eq!(again.json()["error"]["code"], "not_found");
    let exec_gone = server.request(
        "POST",
        "/exec",
        Some(&json!({"sandbox_id": id, "cmd": "true"}).to_string()),
    );
    assert_eq!(exec_gone.status, 404);
}

#[test]
fn bad_input_gets_a_clear_json_error() {
    let server = Server::start();
    let created = server.create();
    let id = created["sandbox_id"].as_str().unwrap().to_string();

    // (method, path, body, expected status, expected error code)
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("POST", "/create", Some("{".into()), 400, "malformed_json"),
        ("POST", "/create", Some("[]".into()), 422, "invalid_request"),
        (
            "POST",
            "/create",
            Some("[1,128,30]".into()),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/create",
            Some(r#"{"vcpus":"two"}"#.into()),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/create",
            Some(r#"{"vcpus":0}"#.into()),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/create",
            Some(r#"{"vcpus":-1}"#.into()),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/create",
            Some(r#"{"mem_mib":1}"#.into()),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/create",
            Some(r#"{"boot_timeout_s":0}"#.into()),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/create",
            Some(r#"{"cpus":1}"#.into()),
            422,
            "invalid_request",
        ),
        ("POST", "/exec", None, 400, "malformed_json"),
        (
            "POST",
            "/exec",
            Some("not json".into()),
            400,
            "malformed_json",
        ),
        (
            "POST",
            "/exec",
            Some(r#"{"cmd":"true"}"#.into()),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/exec",
            Some(format!(r#"{{"sandbox_id":"{id}"}}"#)),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/exec",
            Some(format!(r#"{{"sandbox_id":"{id}","cmd":42}}"#)),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/exec",
            Some(format!(r#"{{"sandbox_id":"{id}","cmd":""}}"#)),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/exec",
            Some(format!(
                r#"{{"sandbox_id":"{id}","cmd":"true","timeout_s":0}}"#
            )),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/exec",
            Some(format!(
                r#"{{"sandbox_id":"{id}","cmd":"true","timeout_s":"5"}}"#
            )),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/exec",
            Some(format!(
                r#"{{"sandbox_id":"{id}","cmd":"true","timeout_s":99999}}"#
            )),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/exec",
            Some(r#"{"sandbox_id":"sb-000000000000","cmd":"true"}"#.into()),
            404,
            "not_found",
        ),
        (
            "POST",
            "/exec",
            Some(r#"{"sandbox_id":"../../etc","cmd":"true"}"#.into()),
            404,
            "not_found",
        ),
        ("POST", "/destroy", None, 400, "malformed_json"),
        (
            "POST",
            "/destroy",
            Some("{}".into()),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/destroy",
            Some(r#"{"sandbox_id":7}"#.into()),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/destroy",
            Some(r#"{"sandbox_id":"sb-000000000000"}"#.into()),
            404,
            "not_found",
        ),
        ("GET", "/create", None, 405, "method_not_allowed"),
        ("DELETE", "/sandboxes", None, 405, "method_not_allowed"),
        ("GET", "/nope", None, 404, "no_route"),
    ];
    for (method, path, body, status, code) in &cases {
        let resp = server.request(method, path, body.as_deref());
        assert_eq!(
            resp.status, *status,
            "{method} {path} {body:?}: {}",
            resp.text
        );
        let err = resp.json();
        assert_eq!(
            err["error"]["code"], *code,
            "{method} {path} {body:?}: {err}"
        );
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }

    // An over-sized body is refused with a JSON 413 before it is parsed.
    let big = format!(
        r#"{{"sandbox_id":"{id}","cmd":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let resp = server.request("POST", "/exec", Some(&big));
    assert_eq!(resp.status, 413, "{}", resp.text);
    assert_eq!(resp.json()["error"]["code"], "body_too_large");

    // None of that disturbed the sandbox: it still runs commands, and nothing else was made.
    assert_eq!(
        server.exec(&id, "echo still-here")["stdout"],
        "still-here\n"
    );
    let listed = server.request("GET", "/sandboxes", None).json();
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(server.destroy(&id).status, 200);
    server.assert_no_leftovers();
}

#[test]
fn sigterm_destroys_every_sandbox() {
    let mut server = Server::start();
    let a = server.create()["sandbox_id"].as_str().unwrap().to_string();
    let b = server.create()["sandbox_id"].as_str().unwrap().to_string();
    assert_ne!(a, b);
    assert_eq!(server.vmm_pids().len(), 2);

    // A command still running when the signal comes is ended, not waited for.
    let exec = {
        let body = json!({"sandbox_id": a, "cmd": "sleep 300", "timeout_s": 600}).to_string();
        let (ns, port) = (server.net.name.clone(), server.port);
        std::thread::spawn(move || common::request_in(&ns, port, "POST", "/exec", &body))
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let status = server.terminate();
    let took = started.elapsed();
    assert!(status.success(), "server exit status {status}");
    assert!(
        took < std::time::Duration::from_secs(30),
        "shutdown took {took:?}"
    );
    let answered = exec.join().unwrap();
    assert!(
        answered.map(|r| r.status != 200).unwrap_or(true),
        "the running exec was not ended"
    );
    server.assert_no_leftovers();
    assert_eq!(
        server.net.manta_rules(),
        Vec::<String>::new(),
        "Manta chains left after shutdown"
    );
}
