//! A real network partition for one host agent: a network namespace of its own, linked to the
//! root namespace by a veth pair with private 10.213.0.0/16 addresses. Taking the namespace
//! side of the link down cuts the host's heartbeats (UDP), its store connection (TCP) and the
//! network path to its power control, for real. Needs root and `ip` (iproute2); the
//! namespace and the veth pair are removed when the [`NetnsLink`] is dropped, and namespaces
//! left by killed runs (whose process is gone) are removed by the next run.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

/// How a partition is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionMechanism {
    /// The victim runs in its own network namespace; its veth link is taken down.
    Netns,
    /// Emulated: the victim reads a flag file and drops its own traffic (no root or no `ip`).
    FlagFile,
}

/// A network namespace with a veth pair to the root namespace (see the module docs).
#[derive(Debug)]
pub struct NetnsLink {
    name: String,
    root_if: String,
    ns_if: String,
    root_addr: Ipv4Addr,
    ns_addr: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Whether any interface of the root namespace has an address in the /30 at `net`.
fn subnet_in_use(net: Ipv4Addr) -> Result<bool, String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "to", &format!("{net}/30")])
        .output()
        .map_err(|e| format!("running `ip`: {e}"))?;
    Ok(!out.status.success() || !out.stdout.is_empty())
}

/// Name of one end of the veth pair of run `pid`'s `n`-th namespace; at most 15 bytes for pid
/// <= 4194304 (6 hex digits) and n < 100000.
fn ifname(pid: u32, n: u32, side: char) -> String {
    format!("vh{pid:x}{n}{side}")
}

/// Deletes namespaces `vinfra-ha-<pid>-<n>` whose creating process is gone (a run killed before
/// its `Drop` could clean up); their veth pairs go with them.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ids = name.strip_prefix("vinfra-ha-").and_then(|r| {
            let (pid, n) = r.split_once('-')?;
            Some((pid.parse::<u32>().ok()?, n.parse::<u32>().ok()?))
        });
        if let Some((pid, n)) = ids
            && pid != std::process::id()
            && super::host::process_gone(pid)
        {
            let _ = ip(&["netns", "del", &name]);
            // The namespace may outlive its name (sockets still closing): cut the pair now.
            let _ = ip(&["link", "del", &ifname(pid, n, 'r')]);
        }
    }
}

impl NetnsLink {
    /// Creates the namespace `vinfra-ha-<pid>-<n>` and its veth pair, addresses them and brings
    /// them up. Fails with the reason when the machine does not allow it (not root, no `ip`,
    /// no netns support); whatever was created is removed again.
    pub fn create() -> Result<Self, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("vinfra-ha-{pid}-{n}");
        // Interface names are limited to 15 bytes: "vh" + pid in hex (<= 6) + n + side.
        let (root_if, ns_if) = (ifname(pid, n, 'r'), ifname(pid, n, 'n'));
        if root_if.len() > 15 {
            return Err(format!("interface name {root_if} too long"));
        }
        // A /30 in 10.213.0.0/16 chosen from the pid and counter; skip ones in use.
        let mut idx = (pid.wrapping_mul(64).wrapping_add(n)) % 16384;
        let mut tries = 0;
        let base = loop {
            let b = idx * 4;
            let net = Ipv4Addr::new(10, 213, (b >> 8) as u8, (b & 0xff) as u8);
            if !subnet_in_use(net)? {
                break u32::from(net);
            }
            tries += 1;
            if tries > 64 {
                return Err("no free /30 in 10.213.0.0/16".into());
            }
            idx = (idx + 1) % 16384;
        };
        let link = Self {
            name,
            root_if,
            ns_if,
            root_addr: Ipv4Addr::from(base + 1),
            ns_addr: Ipv4Addr::from(base + 2),
        };
        ip(&["netns", "add", &link.name])?;
        // From here on, dropping `link` cleans up whatever exists.
        link.setup()?;
        Ok(link)
    }

    fn setup(&self) -> Result<(), String> {
        let (ns, r, v) = (self.name.as_str(), self.root_if.as_str(), self.ns_if.as_str());
        ip(&["link", "add", r, "type", "veth", "peer", "name", v, "netns", ns])?;
        ip(&["addr", "add", &format!("{}/30", self.root_addr), "dev", r])?;
        ip(&["link", "set", r, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{}/30", self.ns_addr), "dev", v])?;
        ip(&["-n", ns, "link", "set", v, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The root namespace's end of the link (where the other agents and the store listen).
    pub fn root_addr(&self) -> Ipv4Addr {
        self.root_addr
    }
    /// The namespace's end of the link (the isolated host's address).
    pub fn ns_addr(&self) -> Ipv4Addr {
        self.ns_addr
    }

    /// Wraps `cmd` so that it runs inside the namespace (`ip netns exec NAME ...`; `ip` execs
    /// the program, so the child's pid is the program's).
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// Takes the namespace's end of the veth link down (`up == false`) or up again.
    pub fn set_link(&self, up: bool) -> Result<(), String> {
        ip(&["-n", &self.name, "link", "set", &self.ns_if, if up { "up" } else { "down" }])
    }
}

impl Drop for NetnsLink {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end and with it the pair; delete the root
        // end too in case the namespace deletion failed.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.root_if]);
    }
}
