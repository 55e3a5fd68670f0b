//! Persistent tap devices, made and removed with ioctls (no `ip` processes on the create path).

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Errors of tap handling; each names the device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit in `IFNAMSIZ`.
    #[error("tap name {0:?} is not a valid interface name")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded, and are we root?): {0}")]
    OpenTun(#[source] io::Error),
    /// An ioctl on the device failed.
    #[error("{op} on tap {name} failed: {source}")]
    Ioctl {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
}

// Values from linux/if_tun.h and linux/sockios.h.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// How long removal waits for a tap that is still attached to an exiting process.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// A tap device owned by one sandbox. Dropping it does nothing: removal is explicit, because
/// a tap must outlive a server restart when its VM is re-adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapDevice {
    pub name: String,
}

impl TapDevice {
    /// Creates a persistent tap, gives it `host_ip/netmask` and brings it up.
    ///
    /// If the device is left half-made by a failure here, it is removed before returning.
    pub fn create(name: &str, host_ip: Ipv4Addr, netmask: Ipv4Addr) -> Result<TapDevice, TapError> {
        let tap = TapDevice {
            name: name.to_string(),
        };
        let tun = tap.attach()?;
        tap.ioctl_int(&tun, TUNSETPERSIST, 1, "TUNSETPERSIST")?;
        drop(tun);

        if let Err(e) = tap
            .disable_ipv6()
            .and_then(|()| tap.configure(host_ip, netmask))
        {
            let _ = tap.remove();
            return Err(e);
        }
        Ok(tap)
    }

    /// Removes the device. Succeeds if it is already gone.
    ///
    /// Attaching to a missing name creates a fresh tap, which closing the fd right away
    /// deletes again, so this needs no existence check. A tap still attached to a VMM that is
    /// exiting answers EBUSY for a moment; that is retried for up to [`BUSY_RETRY`].
    pub fn remove(&self) -> Result<(), TapError> {
        let deadline = std::time::Instant::now() + BUSY_RETRY;
        let tun = loop {
            match self.attach() {
                Ok(tun) => break tun,
                Err(TapError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        self.ioctl_int(&tun, TUNSETPERSIST, 0, "TUNSETPERSIST(0)")
        // Closing `tun` now drops the last reference and the kernel deletes the device.
    }

    /// Removes the tap called `name`, if it exists.
    pub fn remove_named(name: &str) -> Result<(), TapError> {
        TapDevice {
            name: name.to_string(),
        }
        .remove()
    }

    /// True if a link of this name exists in the calling thread's network namespace.
    pub fn exists(name: &str) -> bool {
        let Ok(c_name) = std::ffi::CString::new(name) else {
            return false;
        };
        // SAFETY: `c_name` is a valid NUL-terminated string for the duration of the call.
        unsafe { libc::if_nametoindex(c_name.as_ptr()) != 0 }
    }

    /// Names of all network links in the calling thread's namespace that start with `prefix`.
    pub fn list_with_prefix(prefix: &str) -> Vec<String> {
        let mut names = Vec::new();
        // SAFETY: if_nameindex returns a heap array terminated by an entry with index 0 and
        // a null name, or null on failure; we read it up to the terminator and free it once.
        unsafe {
            let list = libc::if_nameindex();
            if list.is_null() {
                return names;
            }
            let mut entry = list;
            while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
                let name = CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned();
                if name.starts_with(prefix) {
                    names.push(name);
                }
                entry = entry.add(1);
            }
            libc::if_freenameindex(list);
        }
        names.sort();
        names
    }

    /// Opens `/dev/net/tun` and binds it to this device (creating it if needed).
    fn attach(&self) -> Result<File, TapError> {
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = self.ifreq()?;
        req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: `tun` is an open tun fd and `req` is a valid, initialised ifreq that lives
        // for the duration of the call; TUNSETIFF reads and writes only that struct.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            return Err(self.ioctl_error("TUNSETIFF"));
        }
        Ok(tun)
    }

    fn ioctl_int(
        &self,
        tun: &File,
        op: libc::c_ulong,
        value: libc::c_ulong,
        what: &'static str,
    ) -> Result<(), TapError> {
        // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), op as _, value) };
        if rc < 0 {
            return Err(self.ioctl_error(what));
        }
        Ok(())
    }

    /// Turns IPv6 off on the host side of the tap before it comes up: no link-local address
    /// for a guest to reach the host on, and no router advertisements from a guest accepted.
    /// (Manta's filter rules are IPv4; this keeps IPv6 from going around them.)
    fn disable_ipv6(&self) -> Result<(), TapError> {
        let knob = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", self.name);
        match std::fs::write(&knob, "1") {
            Ok(()) => Ok(()),
            // A kernel without IPv6 has no such file, and nothing to turn off.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(TapError::Ioctl {
                op: "disable_ipv6",
                name: self.name.clone(),
                source,
            }),
        }
    }

    /// Sets the address and netmask, then sets IFF_UP.
    fn configure(&self, ip: Ipv4Addr, netmask: Ipv4Addr) -> Result<(), TapError> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(self.ioctl_error("socket(AF_INET)"));
        }
        // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };

        for (op, addr, what) in [
            (libc::SIOCSIFADDR, ip, "SIOCSIFADDR"),
            (libc::SIOCSIFNETMASK, netmask, "SIOCSIFNETMASK"),
        ] {
            let mut req = self.ifreq()?;
            req.ifr_ifru.ifru_addr = sockaddr_from(addr);
            // SAFETY: `req` is a valid ifreq holding an AF_INET sockaddr; the ioctl only
            // reads it.
            let rc = unsafe { libc::ioctl(sock.as_raw_fd(), op as _, &mut req) };
            if rc < 0 {
                return Err(self.ioctl_error(what));
            }
        }

        let mut req = self.ifreq()?;
        // SAFETY: SIOCGIFFLAGS fills `ifru_flags` of the valid ifreq we pass.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
            return Err(self.ioctl_error("SIOCGIFFLAGS"));
        }
        // SAFETY: the kernel just wrote `ifru_flags`, so reading that union field is sound.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: as above; SIOCSIFFLAGS only reads the struct.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req) } < 0 {
            return Err(self.ioctl_error("SIOCSIFFLAGS"));
        }
        Ok(())
    }

    fn ifreq(&self) -> Result<libc::ifreq, TapError> {
        let bytes = self.name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::BadName(self.name.clone()));
        }
        // SAFETY: ifreq is plain old data; all-zero is a valid value (empty name, zero union).
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        debug_assert!(
            // SAFETY: the name is NUL-terminated because the array was zeroed and we wrote
            // fewer than IFNAMSIZ bytes.
            unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }.to_bytes() == bytes
        );
        Ok(req)
    }

    fn ioctl_error(&self, op: &'static str) -> TapError {
        TapError::Ioctl {
            op,
            name: self.name.clone(),
            source: io::Error::last_os_error(),
        }
    }
}

fn sockaddr_from(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is the
    // generic view of it that the SIOCSIF* ioctls expect.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

// Values from linux/if_arp.h.
const ATF_COM: libc::c_int = 0x02;
const ATF_PERM: libc::c_int = 0x04;
const ARPHRD_ETHER: libc::sa_family_t = 1;

impl TapDevice {
    /// Adds a permanent ARP entry for the guest, so the host never waits on ARP resolution
    /// while the guest boots (a failed resolution would delay the first SSH connect by ~1 s).
    pub fn set_static_neighbor(&self, guest_ip: Ipv4Addr, mac: [u8; 6]) -> Result<(), TapError> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(self.ioctl_error("socket(AF_INET)"));
        }
        // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };

        // SAFETY: arpreq is plain old data; all-zero is a valid value.
        let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
        req.arp_pa = sockaddr_from(guest_ip);
        req.arp_ha.sa_family = ARPHRD_ETHER;
        for (dst, src) in req.arp_ha.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        req.arp_flags = ATF_COM | ATF_PERM;
        let name = self.ifreq()?.ifr_name;
        req.arp_dev = name;
        // SAFETY: `req` is a valid arpreq that outlives the call; SIOCSARP only reads it.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSARP as _, &mut req) } < 0 {
            return Err(self.ioctl_error("SIOCSARP"));
        }
        Ok(())
    }
}
