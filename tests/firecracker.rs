//! The Firecracker backend against the real Firecracker v1.12.1 binary.
//!
//! On a host with hardware virtualisation the guest would boot; on this project's machines
//! KVM is the paravirtualised `kvm_pvm` module and a standard guest kernel cannot run, so this
//! test checks what can be checked here: Firecracker accepts Manta's whole configuration,
//! `InstanceStart` succeeds, and stopping the VM leaves no process, socket or tap behind.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{TestNet, require_root_and_artifacts};
use manta::network::Slot;
use manta::network::tap::TapDevice;
use manta::vmm::host::find_binary;
use manta::vmm::{BASE_BOOT_ARGS, Backend, HostCaps, VmSpec, Vmm};

#[test]
fn firecracker_accepts_config_and_starts_then_leaves_nothing() {
    let artifacts = require_root_and_artifacts();
    let bin = std::env::var_os("MANTA_FIRECRACKER_BIN")
        .map(PathBuf::from)
        .or_else(|| find_binary(&PathBuf::from("firecracker")))
        .expect("firecracker binary not found: run guest/fetch-firecracker.sh (installs v1.12.1)");
    let version = common::sh(&[bin.to_str().unwrap(), "--version"]);
    assert!(
        version.contains("v1.12.1"),
        "expected Firecracker v1.12.1, got {version}"
    );

    let caps = HostCaps::probe(&bin, &PathBuf::from("qemu-system-x86_64"), None);
    match caps.kvm_unusable_reason() {
        Some(why) => eprintln!(
            "NOTE: the guest cannot boot on this host ({why}). This test checks that Firecracker \
             accepts the configuration and InstanceStart succeeds, and that teardown is complete; \
             guest boot and exec are tested under QEMU (tests/lifecycle.rs)."
        ),
        None => eprintln!("NOTE: this host has hardware virtualisation; the guest can boot here."),
    }

    let net = TestNet::new();
    let work = std::env::temp_dir().join(format!("{}-fc", net.name));
    std::fs::create_dir_all(&work).unwrap();
    let slot = Slot::from_index(1).unwrap();
    let spec = VmSpec {
        sandbox_id: "sb-fc0000000001".to_string(),
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

    // Taps are made in the namespace of the calling thread, so the whole scenario runs on a
    // thread that has joined the test namespace.
    let ns = net.name.clone();
    let (spec2, bin2) = (spec.clone(), bin.clone());
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
                bin: bin2,
                run_as: None,
            };
            let vm = vmm
                .start(&spec2)
                .await
                .unwrap_or_else(|e| panic!("Firecracker start failed: {e}"));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let alive_after_start = vm.is_alive();
            let socket_existed = spec2.work_dir.join("firecracker.sock").exists();
            let pid = vm.pid;
            assert!(
                vm.kill(Duration::from_secs(5)).await,
                "Firecracker did not die"
            );
            tap.remove().unwrap();
            let tap_gone = !TapDevice::exists(&spec2.tap);
            (alive_after_start, socket_existed, pid, tap_gone)
        })
    })
    .join();

    let fc_log = std::fs::read_to_string(work.join("firecracker.log")).unwrap_or_default();
    let (alive_after_start, socket_existed, pid, tap_gone) =
        outcome.unwrap_or_else(|_| panic!("scenario failed; firecracker.log:\n{fc_log}"));
    eprintln!("firecracker.log:\n{fc_log}");
    assert!(socket_existed, "API socket missing");
    assert!(
        fc_log.contains("InstanceStart") || fc_log.contains("Successfully started microvm"),
        "Firecracker log does not show the start: {fc_log}"
    );
    let _ = alive_after_start; // The guest may die at once on this host; the VMM process may too.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "Firecracker pid {pid} still exists"
    );
    assert!(tap_gone, "tap left behind");
    assert!(net.taps().is_empty(), "tap left behind: {:?}", net.taps());
    std::fs::remove_dir_all(&work).unwrap();
}
