//! The host packet filter: Manta's own iptables chains, and one rule per sandbox.
//!
//! Layout (all chains are Manta's, so `iptables -S | grep MANTA` shows the whole policy):
//!
//! - `filter INPUT -i mt+ -j MANTA-INPUT`: guests may only answer connections the host opened.
//! - `filter FORWARD -i mt+ / -o mt+ -j MANTA-FORWARD`: one rule per sandbox sends traffic that
//!   comes from its tap *with its own address* to `MANTA-EGRESS`; anything else from a tap
//!   (spoofed sources) falls to the final DROP. Into a tap, only replies pass.
//! - `MANTA-EGRESS`: the egress policy (metadata, private ranges, host interface).
//! - `nat POSTROUTING -j MANTA-POSTROUTING`: masquerade the guest network out of the uplink.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use super::{GUEST_NET, GUEST_NET_PREFIX, Slot, TAP_WILDCARD};
use crate::config::EgressPolicy;

pub const CHAIN_INPUT: &str = "MANTA-INPUT";
pub const CHAIN_FORWARD: &str = "MANTA-FORWARD";
pub const CHAIN_EGRESS: &str = "MANTA-EGRESS";
pub const CHAIN_POSTROUTING: &str = "MANTA-POSTROUTING";

/// Destinations a guest may not reach under [`EgressPolicy::Internet`]: link-local (cloud
/// metadata lives at 169.254.169.254), RFC 1918, shared address space, loopback, this-network,
/// multicast and reserved.
const BLOCKED_UNDER_INTERNET: &[&str] = &[
    "169.254.0.0/16",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "0.0.0.0/8",
    "224.0.0.0/3",
];

/// Errors from driving iptables; each carries the command's own words.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The iptables binary could not be run at all.
    #[error("cannot run {bin} (install the iptables package): {source}")]
    Spawn {
        bin: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// iptables ran and refused.
    #[error("{bin} {args} failed: {stderr}")]
    Failed {
        bin: &'static str,
        args: String,
        stderr: String,
    },
}

/// Manta's packet-filter policy for one host interface.
#[derive(Debug, Clone)]
pub struct Firewall {
    host_iface: String,
    egress: EgressPolicy,
}

impl Firewall {
    pub fn new(host_iface: &str, egress: EgressPolicy) -> Self {
        Firewall {
            host_iface: host_iface.to_string(),
            egress,
        }
    }

    /// (Re)builds Manta's chains from scratch and hooks them into the built-in chains.
    ///
    /// Per-sandbox rules are dropped by this; callers re-add them for sandboxes they keep.
    pub fn install(&self) -> Result<(), FirewallError> {
        restore(&self.base_rules())?;
        for (table, chain, spec) in hooks() {
            let mut check = vec!["-t", table, "-C", chain];
            check.extend(&spec);
            if iptables(&check).is_err() {
                let mut insert = vec!["-t", table, "-I", chain, "1"];
                insert.extend(&spec);
                iptables(&insert)?;
            }
        }
        Ok(())
    }

    /// Removes every hook and chain that [`Firewall::install`] made.
    pub fn uninstall(&self) -> Result<(), FirewallError> {
        for (table, chain, spec) in hooks() {
            let mut delete = vec!["-t", table, "-D", chain];
            delete.extend(&spec);
            while iptables(&delete).is_ok() {}
        }
        for (table, chain) in [
            ("filter", CHAIN_INPUT),
            ("filter", CHAIN_FORWARD),
            ("filter", CHAIN_EGRESS),
            ("nat", CHAIN_POSTROUTING),
        ] {
            let _ = iptables(&["-t", table, "-F", chain]);
            let _ = iptables(&["-t", table, "-X", chain]);
        }
        Ok(())
    }

    /// Lets the sandbox on `slot` send traffic with its own address, under the egress policy.
    pub fn allow_sandbox(&self, slot: Slot, sandbox_id: &str) -> Result<(), FirewallError> {
        let mut args = vec!["-I".to_string(), CHAIN_FORWARD.to_string(), "1".to_string()];
        args.extend(sandbox_rule(slot, sandbox_id));
        iptables(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Removes the sandbox's rule. Succeeds if it is already gone.
    pub fn forget_sandbox(&self, slot: Slot, sandbox_id: &str) -> Result<(), FirewallError> {
        let mut args = vec!["-D".to_string(), CHAIN_FORWARD.to_string()];
        args.extend(sandbox_rule(slot, sandbox_id));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match iptables(&args) {
            Ok(()) => Ok(()),
            Err(_) if !self.has_sandbox_rule(sandbox_id) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// True if any rule in Manta's forward chain carries this sandbox's comment.
    pub fn has_sandbox_rule(&self, sandbox_id: &str) -> bool {
        list_rules("filter", CHAIN_FORWARD)
            .iter()
            .any(|r| r.contains(&comment_for(sandbox_id)))
    }

    /// Ids named by per-sandbox rules currently installed.
    pub fn sandbox_ids_in_rules(&self) -> Vec<String> {
        list_rules("filter", CHAIN_FORWARD)
            .iter()
            .filter_map(|r| {
                let start = r.find("manta:sb-")? + "manta:".len();
                let rest = &r[start..];
                let end = rest
                    .find(|c: char| c == '"' || c.is_whitespace())
                    .unwrap_or(rest.len());
                Some(rest[..end].to_string())
            })
            .collect()
    }

    fn base_rules(&self) -> String {
        let iface = &self.host_iface;
        let taps = TAP_WILDCARD;
        let guest_net = format!("{GUEST_NET}/{GUEST_NET_PREFIX}");
        let mut filter = vec![
            format!(":{CHAIN_INPUT} - [0:0]"),
            format!(":{CHAIN_FORWARD} - [0:0]"),
            format!(":{CHAIN_EGRESS} - [0:0]"),
            format!("-A {CHAIN_INPUT} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
            format!("-A {CHAIN_INPUT} -j DROP"),
            format!(
                "-A {CHAIN_FORWARD} -o {taps} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
            ),
            format!("-A {CHAIN_FORWARD} -o {taps} -j DROP"),
            format!("-A {CHAIN_FORWARD} -i {taps} -j DROP"),
        ];
        match self.egress {
            EgressPolicy::None => {}
            EgressPolicy::Internet => {
                for net in BLOCKED_UNDER_INTERNET {
                    filter.push(format!("-A {CHAIN_EGRESS} -d {net} -j DROP"));
                }
                filter.push(format!("-A {CHAIN_EGRESS} -o {iface} -j ACCEPT"));
            }
            EgressPolicy::All => filter.push(format!("-A {CHAIN_EGRESS} -o {iface} -j ACCEPT")),
        }
        filter.push(format!("-A {CHAIN_EGRESS} -j DROP"));

        let nat = [
            format!(":{CHAIN_POSTROUTING} - [0:0]"),
            format!("-A {CHAIN_POSTROUTING} -s {guest_net} -o {iface} -j MASQUERADE"),
        ];
        format!(
            "*filter\n{}\nCOMMIT\n*nat\n{}\nCOMMIT\n",
            filter.join("\n"),
            nat.join("\n")
        )
    }
}

/// The jumps from the built-in chains into Manta's: (table, chain, rule).
fn hooks() -> [(&'static str, &'static str, Vec<&'static str>); 4] {
    [
        (
            "filter",
            "INPUT",
            vec!["-i", TAP_WILDCARD, "-j", CHAIN_INPUT],
        ),
        (
            "filter",
            "FORWARD",
            vec!["-i", TAP_WILDCARD, "-j", CHAIN_FORWARD],
        ),
        (
            "filter",
            "FORWARD",
            vec!["-o", TAP_WILDCARD, "-j", CHAIN_FORWARD],
        ),
        ("nat", "POSTROUTING", vec!["-j", CHAIN_POSTROUTING]),
    ]
}

/// Every rule line in `table`'s `chain`, as `iptables -S` prints them (empty if none).
pub fn list_rules(table: &str, chain: &str) -> Vec<String> {
    Command::new("iptables")
        .args(["-w", "5", "-t", table, "-S", chain])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("-A"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn comment_for(sandbox_id: &str) -> String {
    format!("manta:{sandbox_id}")
}

fn sandbox_rule(slot: Slot, sandbox_id: &str) -> Vec<String> {
    let guest: Ipv4Addr = slot.guest_ip();
    [
        "-i",
        &slot.tap_name(),
        "-s",
        &format!("{guest}/32"),
        "-m",
        "comment",
        "--comment",
        &comment_for(sandbox_id),
        "-j",
        CHAIN_EGRESS,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn iptables(args: &[&str]) -> Result<(), FirewallError> {
    let output = Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FirewallError::Spawn {
            bin: "iptables",
            source,
        })?;
    if !output.status.success() {
        return Err(FirewallError::Failed {
            bin: "iptables",
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Loads `rules` with `iptables-restore --noflush`: chains declared in it are flushed and
/// refilled, all other chains are left as they are.
fn restore(rules: &str) -> Result<(), FirewallError> {
    let mut child = Command::new("iptables-restore")
        .args(["-w", "5", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| FirewallError::Spawn {
            bin: "iptables-restore",
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|source| FirewallError::Spawn {
                bin: "iptables-restore",
                source,
            })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| FirewallError::Spawn {
            bin: "iptables-restore",
            source,
        })?;
    if !output.status.success() {
        return Err(FirewallError::Failed {
            bin: "iptables-restore",
            args: "--noflush".to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_rules_follow_the_egress_policy() {
        let internet = Firewall::new("up0", EgressPolicy::Internet).base_rules();
        assert!(internet.contains("-A MANTA-EGRESS -d 169.254.0.0/16 -j DROP"));
        assert!(internet.contains("-A MANTA-EGRESS -o up0 -j ACCEPT"));
        assert!(internet.contains("-A MANTA-POSTROUTING -s 172.31.0.0/16 -o up0 -j MASQUERADE"));
        assert!(internet.ends_with("COMMIT\n"));

        let none = Firewall::new("up0", EgressPolicy::None).base_rules();
        assert!(
            !none.contains("ACCEPT\n-A MANTA-EGRESS -j DROP")
                && !none.contains("-A MANTA-EGRESS -o")
        );
        assert!(none.contains("-A MANTA-EGRESS -j DROP"));

        let all = Firewall::new("up0", EgressPolicy::All).base_rules();
        assert!(!all.contains("169.254.0.0/16"));
        assert!(all.contains("-A MANTA-EGRESS -o up0 -j ACCEPT"));
    }

    #[test]
    fn sandbox_rule_is_tied_to_tap_and_address() {
        let slot = Slot::from_index(3).unwrap();
        let rule = sandbox_rule(slot, "sb-abc").join(" ");
        assert_eq!(
            rule,
            "-i mt3 -s 172.31.0.14/32 -m comment --comment manta:sb-abc -j MANTA-EGRESS"
        );
    }
}
