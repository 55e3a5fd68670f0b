//! QEMU `-M microvm`: the same kernel, disk, tap and command line as Firecracker, with KVM
//! where the host has hardware virtualisation and TCG software emulation elsewhere.

use std::path::Path;

use super::{CONSOLE_LOG, VMM_LOG, VmProcess, VmSpec, VmmError, create_log, spawn};

/// Starts QEMU for `spec`. QEMU opens the tap and disk itself, so once the process runs, the
/// guest is booting.
pub async fn start(bin: &Path, spec: &VmSpec, kvm: bool) -> Result<VmProcess, VmmError> {
    // QEMU writes the console itself (see `args`); its stdout stays empty.
    let stdout = create_log(spec, VMM_LOG)?;
    let stderr = stdout.try_clone().map_err(|source| VmmError::LogFile {
        sandbox_id: spec.sandbox_id.clone(),
        path: spec.work_dir.join(VMM_LOG),
        source,
    })?;
    create_log(spec, CONSOLE_LOG)?;

    let child = spawn(bin, &args(spec, kvm), stdout, stderr, &spec.sandbox_id)?;
    VmProcess::from_child(child).ok_or_else(|| VmmError::ExitedEarly {
        sandbox_id: spec.sandbox_id.clone(),
        bin: bin.display().to_string(),
        status: "exited before its pid could be read".to_string(),
        log_tail: super::log_tail(&spec.work_dir.join(VMM_LOG), 2000),
    })
}

/// The QEMU command line for `spec`.
pub fn args(spec: &VmSpec, kvm: bool) -> Vec<String> {
    let (accel, cpu) = if kvm { ("kvm", "host") } else { ("tcg", "max") };
    let console = spec.work_dir.join(CONSOLE_LOG);
    [
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
    ]
    .into()
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
        let line = args(&spec, false).join(" ");
        for part in [
            "-accel tcg -cpu max -smp 2 -m 512M",
            "-kernel /k/vmlinux -append console=ttyS0 ip=1.2.3.4",
            "file=/w/sb-1/rootfs.ext4,format=raw",
            "ifname=mt4,script=no",
            "mac=06:00:ac:1f:00:04",
            "-serial file:/w/sb-1/console.log",
        ] {
            assert!(line.contains(part), "{part:?} missing from {line}");
        }
        assert!(args(&spec, true).join(" ").contains("-accel kvm -cpu host"));
    }
}
