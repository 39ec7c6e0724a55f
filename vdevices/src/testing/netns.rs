//! Network namespaces for net tests (needs root and the `ip` tool).

use std::os::fd::OwnedFd;
use std::process::Command;

use crate::virtio::net::{NetError, Tap};

/// A network namespace this test created; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr))))
    }
}

impl NetNs {
    /// Creates namespace `name` with IPv6 off (so no link-local address ever appears).
    pub fn create(name: &str) -> std::io::Result<NetNs> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = NetNs { name: name.to_string() };
        for key in ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"] {
            let _ = Command::new("ip").args(["netns", "exec", name, "sysctl", "-qw", key]).status();
        }
        Ok(ns)
    }

    /// Creates tap `tap` inside the namespace (up, no address) and a raw packet socket bound
    /// to it there: the tap is the device's side, the socket is the wire's other end.
    /// With `vnet_hdr` the socket sends and receives a 10-byte virtio-net header per frame.
    pub fn tap_and_socket(&self, tap: &str, vnet_hdr: bool) -> std::io::Result<(Tap, OwnedFd)> {
        let path = std::path::PathBuf::from("/run/netns").join(&self.name);
        let name = tap.to_string();
        let ns = self.name.clone();
        std::thread::spawn(move || -> std::io::Result<(Tap, OwnedFd)> {
            crate::sys::enter_netns(&path)?;
            let t = Tap::open(&name).map_err(|e: NetError| std::io::Error::other(e.to_string()))?;
            // Up before the socket binds: a socket bound to a down link reports ENETDOWN.
            ip(&["-n", &ns, "link", "set", &name, "up"])?;
            let s = crate::sys::packet_socket(&name, vnet_hdr)?;
            Ok((t, s))
        })
        .join()
        .map_err(|_| std::io::Error::other("netns thread panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
