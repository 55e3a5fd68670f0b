//! QEMU `-M microvm`: the same kernel, disk, tap and command line as Firecracker, with KVM
//! where the host has hardware virtualisation and TCG software emulation elsewhere.

use std::path::Path;

use super::{CONSOLE_LOG, VMM_LOG, VmProcess, VmSpec, VmmError, create_log, spawn};

/// Starts QEMU for `spec`. QEMU opens the tap and disk itself, so once the process runs, the
/// guest is booting.
pub async fn start(
    bin: &Path,
    spec: &VmSpec,
    kvm: bool,
    run_as: Option<&str>,
) -> Result<VmProcess, VmmError> {
    // QEMU writes the console itself (see `args`); its stdout stays empty.
    let stdout = create_log(spec, VMM_LOG)?;
    let stderr = stdout.try_clone().map_err(|source| VmmError::LogFile {
        sandbox_id: spec.sandbox_id.clone(),
        path: spec.work_dir.join(VMM_LOG),
        source,
    })?;
    create_log(spec, CONSOLE_LOG)?;

    let child = spawn(
        bin,
        &args(spec, kvm, run_as),
        stdout,
        stderr,
        &spec.sandbox_id,
    )?;
    VmProcess::from_child(child).ok_or_else(|| VmmError::ExitedEarly {
        sandbox_id: spec.sandbox_id.clone(),
        bin: bin.display().to_string(),
        status: "exited before its pid could be read".to_string(),
        log_tail: super::log_tail(&spec.work_dir.join(VMM_LOG), 2000),
    })
}

/// The QEMU command line for `spec`.
///
/// Hardening: QEMU's seccomp filter (`-sandbox on`) denies obsolete system calls, spawning
/// processes and resource control; with `run_as`, QEMU opens the tap, disk and logs as root,
/// then switches to that user for good (`-runas`), which needs set*id left allowed in the
/// filter; without it, set*id is denied too.
pub fn args(spec: &VmSpec, kvm: bool, run_as: Option<&str>) -> Vec<String> {
    let (accel, cpu) = if kvm { ("kvm", "host") } else { ("tcg", "max") };
    let console = spec.work_dir.join(CONSOLE_LOG);
    let elevate = if run_as.is_some() { "allow" } else { "deny" };
    let mut args: Vec<String> = vec![
        "-sandbox".to_string(),
        format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"),
    ];
    if let Some(user) = run_as {
        args.extend(["-runas".to_string(), user.to_string()]);
    }
    args.extend([
        "-name".to_string(),
        format!("manta-{}", spec.sandbox_id),
        "-M".to_string(),
        "microvm,x-option-roms=off,acpi=off".to_string(),
        "-accel".to_string(),
        accel.to_string(),
        "-cpu".to_string(),
        cpu.to_string(),
        "-smp".to_string(),
        spec.vcpus.to_string(),
        "-m".to_string(),
        format!("{}M", spec.mem_mib),
        "-nodefaults".to_string(),
        "-no-user-config".to_string(),
        "-display".to_string(),
        "none".to_string(),
        "-no-reboot".to_string(),
        "-serial".to_string(),
        format!("file:{}", console.display()),
        "-kernel".to_string(),
        spec.kernel.display().to_string(),
        "-append".to_string(),
        spec.boot_args.clone(),
        "-drive".to_string(),
        format!("id=root,file={},format=raw,if=none", spec.disk.display()),
        "-device".to_string(),
        "virtio-blk-device,drive=root".to_string(),
        "-netdev".to_string(),
        format!("tap,id=net0,ifname={},script=no,downscript=no", spec.tap),
        "-device".to_string(),
        format!("virtio-net-device,netdev=net0,mac={}", spec.guest_mac),
    ]);
    args
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn command_line_carries_the_spec() {
        let spec = VmSpec {
            sandbox_id: "sb-1".to_string(),
            vcpus: 2,
            mem_mib: 512,
            kernel: PathBuf::from("/k/vmlinux"),
            disk: PathBuf::from("/w/sb-1/rootfs.ext4"),
            tap: "mt4".to_string(),
            guest_mac: "06:00:ac:1f:00:04".to_string(),
            boot_args: "console=ttyS0 ip=1.2.3.4".to_string(),
            work_dir: PathBuf::from("/w/sb-1"),
        };
        let line = args(&spec, false, Some("nobody")).join(" ");
        for part in [
            "-accel tcg -cpu max -smp 2 -m 512M",
            "-kernel /k/vmlinux -append console=ttyS0 ip=1.2.3.4",
            "file=/w/sb-1/rootfs.ext4,format=raw",
            "ifname=mt4,script=no",
            "mac=06:00:ac:1f:00:04",
            "-serial file:/w/sb-1/console.log",
            "-sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
            "-runas nobody",
        ] {
            assert!(line.contains(part), "{part:?} missing from {line}");
        }
        let privileged = args(&spec, true, None).join(" ");
        assert!(privileged.contains("-accel kvm -cpu host"));
        assert!(privileged.contains("elevateprivileges=deny") && !privileged.contains("-runas"));
    }
}
