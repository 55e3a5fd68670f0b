//! `manta-server doctor`: what this host can run, and what the server would choose.

use std::process::{Command, ExitCode};

use crate::config::{Config, HostFacts, RealHost, VmmChoice};
use crate::vmm::HostCaps;

/// Prints the host report to stdout. Exits non-zero if the server could not start here.
pub fn print() -> ExitCode {
    let vars: std::collections::HashMap<String, String> = std::env::vars().collect();
    let get = |k: &str, d: &str| {
        vars.get(k)
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or_else(|| d.to_string())
    };
    let fc = std::path::PathBuf::from(get("MANTA_FIRECRACKER_BIN", "firecracker"));
    let qemu = std::path::PathBuf::from(get("MANTA_QEMU_BIN", "qemu-system-x86_64"));
    // The jailer is only used when MANTA_JAILER_BIN is set; report the one in PATH otherwise.
    let jailer = std::path::PathBuf::from(get("MANTA_JAILER_BIN", "jailer"));
    let caps = HostCaps::probe(&fc, &qemu, Some(&jailer));

    println!("manta doctor");
    println!("  /dev/kvm:                 {}", yes_no(caps.kvm_device));
    println!(
        "  hardware virtualisation:  {}",
        caps.hw_virt
            .as_deref()
            .unwrap_or("none (no vmx/svm in /proc/cpuinfo)")
    );
    println!("  KVM module kvm_pvm:       {}", yes_no(caps.pvm));
    match caps.kvm_unusable_reason() {
        None => println!("  standard guests on KVM:   yes"),
        Some(why) => println!("  standard guests on KVM:   no, {why}"),
    }
    println!(
        "  firecracker:              {}",
        version(caps.firecracker_bin.as_deref(), "--version")
    );
    println!(
        "  jailer:                   {}",
        version(caps.jailer_bin.as_deref(), "--version")
    );
    println!(
        "  qemu:                     {}",
        version(caps.qemu_bin.as_deref(), "--version")
    );
    println!(
        "  iptables:                 {}",
        version(Some(std::path::Path::new("iptables")), "--version")
    );
    let forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    println!("  ip_forward:               {}", forward.trim());
    println!(
        "  default route iface:      {}",
        RealHost
            .default_route_iface()
            .unwrap_or_else(|| "none".to_string())
    );

    for choice in [VmmChoice::Auto, VmmChoice::Firecracker, VmmChoice::Qemu] {
        let label = format!("{choice:?}").to_lowercase();
        match caps.choose(choice, &fc, &qemu) {
            Ok((backend, why)) => println!("  MANTA_VMM={label:<12} -> {} ({why})", backend.name()),
            Err(e) => println!("  MANTA_VMM={label:<12} -> refused: {e}"),
        }
    }
    match Config::from_env() {
        Ok(config) => {
            println!(
                "  configuration:            ok (listen {}, host iface {})",
                config.listen_addr, config.host_iface
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("  configuration:            error: {e}");
            ExitCode::from(1)
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn version(bin: Option<&std::path::Path>, flag: &str) -> String {
    let Some(bin) = bin else {
        return "not found".to_string();
    };
    match Command::new(bin).arg(flag).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let first = text.lines().next().unwrap_or("").trim().to_string();
            format!("{} ({})", first, bin.display())
        }
        Err(e) => format!("cannot run {}: {e}", bin.display()),
    }
}
