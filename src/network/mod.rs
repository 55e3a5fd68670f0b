//! Guest networking: the address pool, tap devices and the host's packet filter.
//!
//! Each sandbox owns one slot of the pool. A slot is a /30 inside [`GUEST_NET`]: `.1` is the
//! host end (on the tap), `.2` is the guest. Everything a slot needs (tap name, addresses, MAC,
//! kernel `ip=` argument) is derived from its index, so a record on disk only needs the index.

pub mod firewall;
pub mod tap;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

/// The network guests live in: 172.31.0.0/16, split into /30 slots.
pub const GUEST_NET: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 0);
/// Prefix length of [`GUEST_NET`].
pub const GUEST_NET_PREFIX: u8 = 16;
/// Prefix length of one slot.
pub const SLOT_PREFIX: u8 = 30;
/// Tap names are this prefix plus the slot index; reconcile treats any link with it as ours.
pub const TAP_PREFIX: &str = "mt";
/// iptables interface pattern matching every tap of ours.
pub const TAP_WILDCARD: &str = "mt+";
/// Highest slot index: a /16 holds 16384 /30s, and index 0 is never handed out.
const MAX_SLOT: u16 = (1 << (32 - GUEST_NET_PREFIX - (32 - SLOT_PREFIX))) - 1;

/// One /30 of the guest network, identified by its index (1..=16383).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(u16);

impl Slot {
    /// The slot with this index, if the index is in range.
    pub fn from_index(index: u16) -> Option<Slot> {
        (1..=MAX_SLOT).contains(&index).then_some(Slot(index))
    }

    pub fn index(self) -> u16 {
        self.0
    }

    fn base(self) -> u32 {
        u32::from(GUEST_NET) + u32::from(self.0) * 4
    }

    /// The host end of the link, assigned to the tap.
    pub fn host_ip(self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 1)
    }

    /// The guest's address.
    pub fn guest_ip(self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 2)
    }

    /// The netmask of a slot (255.255.255.252).
    pub fn netmask() -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - SLOT_PREFIX))
    }

    pub fn tap_name(self) -> String {
        format!("{TAP_PREFIX}{}", self.0)
    }

    /// A locally administered unicast MAC that embeds the slot index.
    pub fn guest_mac(self) -> String {
        let m = self.guest_mac_bytes();
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }

    pub fn guest_mac_bytes(self) -> [u8; 6] {
        let [hi, lo] = self.0.to_be_bytes();
        [0x06, 0x00, 0xac, 0x1f, hi, lo]
    }

    /// The kernel's `ip=` argument: static address, gateway and mask, no autoconf protocol.
    pub fn kernel_ip_arg(self) -> String {
        format!(
            "ip={}::{}:{}::eth0:off",
            self.guest_ip(),
            self.host_ip(),
            Self::netmask()
        )
    }

    /// The slot a tap name belongs to, if the name is one of ours.
    pub fn from_tap_name(name: &str) -> Option<Slot> {
        let digits = name.strip_prefix(TAP_PREFIX)?;
        if digits.is_empty() || digits.starts_with('0') {
            return None;
        }
        Slot::from_index(digits.parse().ok()?)
    }
}

/// Hands out slots; a slot is never given to two live sandboxes.
#[derive(Debug)]
pub struct AddressPool {
    free: Mutex<BTreeSet<u16>>,
}

impl Default for AddressPool {
    fn default() -> Self {
        AddressPool {
            free: Mutex::new((1..=MAX_SLOT).collect()),
        }
    }
}

impl AddressPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the lowest free slot, or `None` when all are in use.
    pub fn allocate(&self) -> Option<Slot> {
        self.lock().pop_first().map(Slot)
    }

    /// Marks a slot as used (for sandboxes adopted at start); false if it already was.
    pub fn claim(&self, slot: Slot) -> bool {
        self.lock().remove(&slot.0)
    }

    pub fn release(&self, slot: Slot) {
        self.lock().insert(slot.0);
    }

    pub fn in_use(&self) -> usize {
        usize::from(MAX_SLOT) - self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u16>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn slot_addresses() {
        let slot = Slot::from_index(1).unwrap();
        assert_eq!(slot.host_ip(), Ipv4Addr::new(172, 31, 0, 5));
        assert_eq!(slot.guest_ip(), Ipv4Addr::new(172, 31, 0, 6));
        assert_eq!(slot.tap_name(), "mt1");
        assert_eq!(slot.guest_mac(), "06:00:ac:1f:00:01");
        assert_eq!(
            slot.kernel_ip_arg(),
            "ip=172.31.0.6::172.31.0.5:255.255.255.252::eth0:off"
        );

        let last = Slot::from_index(MAX_SLOT).unwrap();
        assert_eq!(last.guest_ip(), Ipv4Addr::new(172, 31, 255, 254));
        assert!(Slot::from_index(0).is_none());
        assert!(Slot::from_index(MAX_SLOT + 1).is_none());
    }

    #[test]
    fn tap_wildcard_matches_the_prefix() {
        assert_eq!(TAP_WILDCARD, format!("{TAP_PREFIX}+"));
    }

    #[test]
    fn tap_names_round_trip() {
        for index in [1, 9, 10, 16383] {
            let slot = Slot::from_index(index).unwrap();
            assert_eq!(Slot::from_tap_name(&slot.tap_name()), Some(slot));
        }
        for bad in ["mt", "mt0", "mt01", "mtx", "eth0", "mt16384", "mt-1"] {
            assert_eq!(Slot::from_tap_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn pool_never_hands_out_a_slot_twice() {
        let pool = Arc::new(AddressPool::new());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    (0..200)
                        .map(|_| pool.allocate().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<Slot> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 1600);
        assert_eq!(pool.in_use(), 1600);

        let freed = Slot::from_index(5).unwrap();
        pool.release(freed);
        assert_eq!(
            pool.allocate(),
            Some(freed),
            "the lowest free slot is reused first"
        );
    }

    #[test]
    fn pool_exhaustion_and_claim() {
        let pool = AddressPool::new();
        for _ in 0..MAX_SLOT {
            pool.allocate().unwrap();
        }
        assert_eq!(pool.allocate(), None);
        let slot = Slot::from_index(7).unwrap();
        assert!(!pool.claim(slot));
        pool.release(slot);
        assert!(pool.claim(slot));
        assert_eq!(pool.allocate(), None);
    }
}
