//! What this host can run: hardware virtualisation, the kind of KVM, which VMM binaries exist.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::VmmChoice;

/// Facts read from the host once at start.
#[derive(Debug, Clone, Serialize)]
pub struct HostCaps {
    /// `/dev/kvm` exists.
    pub kvm_device: bool,
    /// "vmx" (Intel) or "svm" (AMD) if the CPU exposes hardware virtualisation.
    pub hw_virt: Option<String>,
    /// The KVM module is `kvm_pvm` (paravirtualised KVM): standard guests cannot run on it.
    pub pvm: bool,
    pub firecracker_bin: Option<PathBuf>,
    pub qemu_bin: Option<PathBuf>,
    pub jailer_bin: Option<PathBuf>,
}

/// Which backend runs the guests, with the accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Firecracker,
    QemuKvm,
    QemuTcg,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Firecracker => "firecracker",
            Backend::QemuKvm => "qemu-kvm",
            Backend::QemuTcg => "qemu-tcg",
        }
    }
}

/// The backend could not be chosen; the message says what the host lacks.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    #[error(
        "MANTA_VMM=firecracker, but this host cannot run standard Firecracker guests: {reason}. \
         Use MANTA_VMM=qemu (or auto) to run the same kernel and rootfs under QEMU"
    )]
    FirecrackerUnsupported { reason: String },
    #[error(
        "MANTA_VMM=firecracker, but the Firecracker binary {0} was not found (guest/fetch-firecracker.sh installs it)"
    )]
    FirecrackerMissing(PathBuf),
    #[error(
        "no usable VMM: QEMU binary {0} not found (apt-get install qemu-system-x86) and Firecracker not usable here"
    )]
    NoVmm(PathBuf),
}

impl HostCaps {
    /// Reads the host. Binary names without a '/' are looked up in `PATH`.
    pub fn probe(firecracker: &Path, qemu: &Path, jailer: Option<&Path>) -> HostCaps {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostCaps {
            kvm_device: Path::new("/dev/kvm").exists(),
            hw_virt: hw_virt_flag(&cpuinfo).map(str::to_string),
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
            firecracker_bin: find_binary(firecracker),
            qemu_bin: find_binary(qemu),
            jailer_bin: jailer.and_then(find_binary),
        }
    }

    /// Why standard guests cannot use KVM here, or `None` if they can.
    pub fn kvm_unusable_reason(&self) -> Option<String> {
        if !self.kvm_device {
            return Some("/dev/kvm does not exist".to_string());
        }
        if self.hw_virt.is_none() {
            let pvm = if self.pvm {
                " (KVM here is the paravirtualised kvm_pvm module, whose guests must be PVM-aware \
                 kernels; a standard kernel falls into KVM's instruction emulator and dies)"
            } else {
                ""
            };
            return Some(format!(
                "the CPU exposes no vmx/svm hardware virtualisation{pvm}"
            ));
        }
        None
    }

    /// Picks the backend for `choice`, explaining the pick in the returned string.
    pub fn choose(
        &self,
        choice: VmmChoice,
        firecracker: &Path,
        qemu: &Path,
    ) -> Result<(Backend, String), ChoiceError> {
        let kvm_problem = self.kvm_unusable_reason();
        let qemu_backend = || match &kvm_problem {
            None => (Backend::QemuKvm, "QEMU microvm with KVM".to_string()),
            Some(why) => (
                Backend::QemuTcg,
                format!("QEMU microvm with TCG software emulation, because {why}"),
            ),
        };
        match choice {
            VmmChoice::Firecracker => {
                if self.firecracker_bin.is_none() {
                    return Err(ChoiceError::FirecrackerMissing(firecracker.to_path_buf()));
                }
                if let Some(reason) = kvm_problem {
                    return Err(ChoiceError::FirecrackerUnsupported { reason });
                }
                Ok((
                    Backend::Firecracker,
                    "Firecracker, as configured".to_string(),
                ))
            }
            VmmChoice::Qemu => {
                if self.qemu_bin.is_none() {
                    return Err(ChoiceError::NoVmm(qemu.to_path_buf()));
                }
                let (backend, why) = qemu_backend();
                Ok((backend, format!("{why}, as configured")))
            }
            VmmChoice::Auto => {
                if self.firecracker_bin.is_some() && kvm_problem.is_none() {
                    return Ok((
                        Backend::Firecracker,
                        "Firecracker: binary present and KVM usable".to_string(),
                    ));
                }
                if self.qemu_bin.is_none() {
                    return Err(ChoiceError::NoVmm(qemu.to_path_buf()));
                }
                let not_fc = match &self.firecracker_bin {
                    None => format!("Firecracker binary {} not found", firecracker.display()),
                    Some(_) => "Firecracker cannot boot standard guests here".to_string(),
                };
                let (backend, why) = qemu_backend();
                Ok((backend, format!("{not_fc}; using {why}")))
            }
        }
    }
}

fn hw_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let mut words = flags.split_whitespace();
    if words.clone().any(|w| w == "vmx") {
        return Some("vmx");
    }
    words.any(|w| w == "svm").then_some("svm")
}

/// Resolves a binary: a path with '/' must exist; a bare name is searched in `PATH`.
pub fn find_binary(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 || name.is_absolute() {
        return name.is_file().then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(hw: Option<&str>, pvm: bool, fc: bool, qemu: bool) -> HostCaps {
        HostCaps {
            kvm_device: true,
            hw_virt: hw.map(str::to_string),
            pvm,
            firecracker_bin: fc.then(|| PathBuf::from("/bin/fc")),
            qemu_bin: qemu.then(|| PathBuf::from("/bin/qemu")),
            jailer_bin: None,
        }
    }

    fn pick(c: &HostCaps, choice: VmmChoice) -> Result<Backend, String> {
        c.choose(choice, Path::new("firecracker"), Path::new("qemu"))
            .map(|(b, _)| b)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn backend_choice_table() {
        let pvm_host = caps(None, true, true, true);
        let hw_host = caps(Some("vmx"), false, true, true);
        let hw_no_fc = caps(Some("svm"), false, false, true);
        let nothing = caps(None, false, false, false);

        assert_eq!(pick(&pvm_host, VmmChoice::Auto), Ok(Backend::QemuTcg));
        assert_eq!(pick(&pvm_host, VmmChoice::Qemu), Ok(Backend::QemuTcg));
        let err = pick(&pvm_host, VmmChoice::Firecracker).unwrap_err();
        assert!(err.contains("kvm_pvm") && err.contains("vmx/svm"), "{err}");

        assert_eq!(pick(&hw_host, VmmChoice::Auto), Ok(Backend::Firecracker));
        assert_eq!(pick(&hw_host, VmmChoice::Qemu), Ok(Backend::QemuKvm));
        assert_eq!(pick(&hw_no_fc, VmmChoice::Auto), Ok(Backend::QemuKvm));
        assert!(
            pick(&hw_no_fc, VmmChoice::Firecracker)
                .unwrap_err()
                .contains("not found")
        );
        assert!(
            pick(&nothing, VmmChoice::Auto)
                .unwrap_err()
                .contains("qemu-system-x86")
        );
    }

    #[test]
    fn cpu_flags() {
        assert_eq!(hw_virt_flag("flags\t: fpu vme vmx sse\n"), Some("vmx"));
        assert_eq!(hw_virt_flag("flags\t: fpu svm\n"), Some("svm"));
        assert_eq!(hw_virt_flag("flags\t: fpu vmxnet\n"), None);
        assert_eq!(hw_virt_flag(""), None);
    }
}
