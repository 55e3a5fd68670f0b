//! The Firecracker backend against the real Firecracker v1.12.1 binary, plain and jailed.
//!
//! On a host with hardware virtualisation the guest would boot; on this project's machines
//! KVM is the paravirtualised `kvm_pvm` module and a standard guest kernel cannot run, so these
//! tests check what can be checked here: Firecracker accepts Manta's whole configuration,
//! `InstanceStart` succeeds, and stopping the VM leaves no process, socket, tap or cgroup.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestNet, require_root_and_artifacts};
use manta::network::Slot;
use manta::network::tap::TapDevice;
use manta::vmm::firecracker::{Jail, remove_cgroups};
use manta::vmm::host::find_binary;
use manta::vmm::{BASE_BOOT_ARGS, Backend, HostCaps, VmSpec, Vmm};

fn binary(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| find_binary(Path::new(name)))
        .unwrap_or_else(|| {
            panic!("{name} not found: run guest/fetch-firecracker.sh (installs v1.12.1)")
        })
}

/// What one start-and-stop showed.
struct Observed {
    pid: u32,
    uid_while_running: String,
    tap_gone: bool,
    log: String,
}

/// Starts Firecracker for one sandbox in a fresh namespace, then kills it and removes the tap.
fn start_and_stop(jail: Option<Jail>, sandbox_id: &str) -> Observed {
    let artifacts = require_root_and_artifacts();
    let bin = binary("MANTA_FIRECRACKER_BIN", "firecracker");
    let version = common::sh(&[bin.to_str().unwrap(), "--version"]);
    assert!(
        version.contains("v1.12.1"),
        "expected Firecracker v1.12.1, got {version}"
    );
    let caps = HostCaps::probe(&bin, Path::new("qemu-system-x86_64"), None);
    match caps.kvm_unusable_reason() {
        Some(why) => eprintln!(
            "NOTE: the guest cannot boot on this host ({why}). This test checks that Firecracker \
             accepts the configuration, InstanceStart succeeds and teardown is complete; guest \
             boot and exec are tested under QEMU (tests/lifecycle.rs)."
        ),
        None => eprintln!("NOTE: this host has hardware virtualisation; the guest can boot here."),
    }

    let net = TestNet::new();
    let work = std::env::temp_dir().join(format!("{}-fc", net.name));
    std::fs::create_dir_all(&work).unwrap();
    let slot = Slot::from_index(1).unwrap();
    let spec = VmSpec {
        sandbox_id: sandbox_id.to_string(),
        vcpus: 1,
        mem_mib: 256,
        kernel: artifacts.join("vmlinux"),
        disk: work.join("rootfs.ext4"),
        tap: slot.tap_name(),
        guest_mac: slot.guest_mac(),
        boot_args: format!("{BASE_BOOT_ARGS} {}", slot.kernel_ip_arg()),
        work_dir: work.clone(),
    };
    manta::rootfs::clone_disk(&artifacts.join("rootfs.ext4"), &spec.disk).unwrap();
    let jailed = jail.is_some();

    // Taps are made in the namespace of the calling thread, so the whole scenario runs on a
    // thread that has joined the test namespace.
    let ns = net.name.clone();
    let spec2 = spec.clone();
    let outcome = std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: setns with a valid netns fd; affects only this thread.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
            0
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tap = TapDevice::create(&spec2.tap, slot.host_ip(), Slot::netmask()).unwrap();
            let vmm = Vmm {
                backend: Backend::Firecracker,
                bin,
                run_as: None,
                jail,
            };
            let vm = vmm
                .start(&spec2)
                .await
                .unwrap_or_else(|e| panic!("Firecracker start failed: {e}"));
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", vm.pid)).unwrap_or_default();
            let uid = status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .unwrap_or("")
                .to_string();
            let pid = vm.pid;
            assert!(
                vm.kill(Duration::from_secs(5)).await,
                "Firecracker did not die"
            );
            tap.remove().unwrap();
            (pid, uid, !TapDevice::exists(&spec2.tap))
        })
    })
    .join();

    let log_path = if jailed {
        work.join(format!(
            "jail/firecracker/{sandbox_id}/root/firecracker.log"
        ))
    } else {
        work.join("firecracker.log")
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let (pid, uid_while_running, tap_gone) =
        outcome.unwrap_or_else(|_| panic!("scenario failed; {}:\n{log}", log_path.display()));
    eprintln!("{}:\n{log}", log_path.display());
    assert!(net.taps().is_empty(), "tap left behind: {:?}", net.taps());
    remove_cgroups(sandbox_id);
    std::fs::remove_dir_all(&work).unwrap();
    Observed {
        pid,
        uid_while_running,
        tap_gone,
        log,
    }
}

fn assert_started_and_gone(seen: &Observed) {
    // Firecracker logs each API call and its answer; InstanceStart must have been accepted.
    let start = seen
        .log
        .find("InstanceStart")
        .expect("no InstanceStart request in the log");
    assert!(
        seen.log[start..].contains("Status code: 204 No Content"),
        "InstanceStart was not answered with 204:\n{}",
        seen.log
    );
    assert!(
        !Path::new(&format!("/proc/{}", seen.pid)).exists(),
        "Firecracker pid {} still exists",
        seen.pid
    );
    assert!(seen.tap_gone, "tap left behind");
}

#[test]
fn firecracker_accepts_config_and_starts_then_leaves_nothing() {
    let seen = start_and_stop(None, "sb-fc0000000001");
    assert_started_and_gone(&seen);
    assert!(
        seen.uid_while_running.starts_with("Uid:\t0"),
        "{}",
        seen.uid_while_running
    );
}

#[test]
fn jailed_firecracker_runs_unprivileged_in_a_chroot_and_leaves_nothing() {
    let jail = Jail {
        jailer: binary("MANTA_JAILER_BIN", "jailer"),
        uid: 65534,
        gid: 65534,
    };
    let seen = start_and_stop(Some(jail), "sb-fc0000000002");
    assert_started_and_gone(&seen);
    assert_eq!(
        seen.uid_while_running, "Uid:\t65534\t65534\t65534\t65534",
        "jailed Firecracker is not nobody"
    );
    for cgroup in [
        "/sys/fs/cgroup/memory/manta/sb-fc0000000002",
        "/sys/fs/cgroup/manta/sb-fc0000000002",
    ] {
        assert!(!Path::new(cgroup).exists(), "cgroup {cgroup} left behind");
    }
}
