//! Runs a cluster of host agents as separate OS processes on loopback, with the store in the
//! calling process (or etcd), and collects their reports. With a network namespace for one host,
//! the others and the store use the root end of its veth link instead of 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use super::{
    HostRunConfig, NetnsLink, PartitionMechanism, Report, ReportLine, RuntimeError, StoreEndpoint,
    StoreServer, connect_store, partition_flag, unix_ms,
};
use crate::agent::{DecisionKind, HaConfig};
use crate::model::{HostId, HostSpec, Keys, Priority, VmId, VmSpec};
use crate::restart::{AdmissionPolicy, WorstFit, power_on};
use crate::store::{ClusterStore, MemStore};

/// Settings of a process cluster.
#[derive(Debug, Clone)]
pub struct HarnessConfig {
    /// Number of host agent processes.
    pub hosts: usize,
    /// VMs powered on per host.
    pub vms_per_host: usize,
    /// Agent settings.
    pub ha: HaConfig,
    /// Admission control policy.
    pub policy: AdmissionPolicy,
    /// etcd endpoints; `None` serves the embedded store from this process.
    pub etcd: Option<Vec<String>>,
    /// Agent loop period in ms.
    pub tick_ms: u64,
    /// Shared-state write period of each VM in ms.
    pub write_interval_ms: u64,
    /// Store request timeout in ms.
    pub store_timeout_ms: u64,
    /// Run one host (the last one that is not a dedicated failover host) in a network
    /// namespace of its own, so that [`ClusterHarness::partition`] cuts its link for real.
    /// Needs root, `ip` and the embedded store; otherwise partitions fall back to flag files.
    pub netns_host: bool,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        Self {
            hosts: 4,
            vms_per_host: 3,
            ha: HaConfig::default(),
            policy: AdmissionPolicy::HostFailuresTolerated { hosts: 1 },
            etcd: None,
            tick_ms: 10,
            write_interval_ms: 200,
            store_timeout_ms: 300,
            netns_host: false,
        }
    }
}

/// A running process cluster (see the module docs). Dropping it kills every host process.
#[derive(Debug)]
pub struct ClusterHarness {
    cfg: HarnessConfig,
    _server: Option<StoreServer>,
    store: Box<dyn ClusterStore + Send + Sync>,
    keys: Keys,
    control_dir: PathBuf,
    /// Host processes in spawn order.
    children: Vec<(HostId, Child)>,
    rx: Receiver<ReportLine>,
    /// Every report received so far, in arrival order.
    pub reports: Vec<ReportLine>,
    vms: Vec<VmSpec>,
    /// The namespace of the isolated host (dropped after the processes: see `Drop`).
    netns: Option<NetnsLink>,
    /// The host running in `netns`.
    netns_id: Option<HostId>,
    /// Why partitions are emulated, when they are.
    mechanism_note: Option<String>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> RuntimeError {
    move |source| RuntimeError::Io { what, source }
}

fn free_udp_port(ip: &str) -> Result<u16, RuntimeError> {
    let s = UdpSocket::bind(format!("{ip}:0")).map_err(io("finding a free UDP port".into()))?;
    Ok(s.local_addr().map_err(io("local address".into()))?.port())
}

impl ClusterHarness {
    /// The namespace for the isolated host, or why there is none.
    fn make_netns(cfg: &HarnessConfig) -> (Option<NetnsLink>, Option<String>) {
        if !cfg.netns_host {
            return (None, None);
        }
        if cfg.etcd.is_some() {
            return (None, Some("etcd listens on loopback, out of reach of a network namespace".into()));
        }
        if cfg.hosts < 2 {
            return (None, Some("a partition needs at least 2 hosts".into()));
        }
        match NetnsLink::create() {
            Ok(l) => (Some(l), None),
            Err(e) => (None, Some(e)),
        }
    }

    /// The host put in the namespace: the last one that runs VMs (not a dedicated failover host).
    fn netns_victim(cfg: &HarnessConfig) -> HostId {
        let dedicated = matches!(cfg.policy, AdmissionPolicy::DedicatedFailoverHosts);
        HostId((cfg.hosts - if dedicated { 2 } else { 1 }) as u32)
    }

    /// Starts the store and `cfg.hosts` host processes. `spawn` turns a host's configuration
    /// into the command that runs it (e.g. the current executable with a hidden subcommand);
    /// the harness pipes the command's stdout and reads one JSON [`ReportLine`] per line.
    ///
    /// With [`HarnessConfig::netns_host`] and a machine that allows it, one host runs in a
    /// network namespace of its own; it is started after the others elected a coordinator, so
    /// it is never the coordinator at the start.
    pub fn start(
        cfg: HarnessConfig,
        spawn: &dyn Fn(&HostRunConfig) -> Command,
    ) -> Result<Self, RuntimeError> {
        // Unique per harness, even for several harnesses started in one process at once.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let run = format!("{}-{}-{}", std::process::id(), unix_ms(), NEXT.fetch_add(1, Ordering::Relaxed));
        let prefix = format!("/vha-demo/{run}/");
        let keys = Keys::new(prefix.clone());
        let control_dir = std::env::temp_dir().join(format!("vha-{run}"));
        std::fs::create_dir_all(&control_dir).map_err(io(format!("creating {}", control_dir.display())))?;
        let (netns, mechanism_note) = Self::make_netns(&cfg);
        let netns_id = netns.as_ref().map(|_| Self::netns_victim(&cfg));
        // Agents and the store listen on the root end of the veth link when there is one.
        let local_ip = netns.as_ref().map_or("127.0.0.1".to_string(), |l| l.root_addr().to_string());
        let timeout = Duration::from_millis(cfg.store_timeout_ms);
        let (server, store, endpoint): (_, Box<dyn ClusterStore + Send + Sync>, _) = match &cfg.etcd {
            None => {
                let mem = Arc::new(MemStore::new());
                let server = StoreServer::start(&format!("{local_ip}:0"), mem.clone())?;
                let ep = StoreEndpoint::Embedded { addr: server.addr().to_string() };
                (Some(server), Box::new(mem), ep)
            }
            Some(eps) => {
                let ep = StoreEndpoint::Etcd { endpoints: eps.clone() };
                let s = connect_store(&ep, Duration::from_secs(2), Arc::default())?;
                (None, s, ep)
            }
        };
        let (tx, rx) = mpsc::channel();
        let mut h = Self {
            cfg: cfg.clone(),
            _server: server,
            store,
            keys,
            control_dir: control_dir.clone(),
            children: Vec::new(),
            rx,
            reports: Vec::new(),
            vms: Vec::new(),
            netns,
            netns_id,
            mechanism_note,
        };
        let mut order: Vec<usize> = (0..cfg.hosts).filter(|i| Some(HostId(*i as u32)) != netns_id).collect();
        order.extend(netns_id.map(|x| x.0 as usize));
        for i in order {
            let id = HostId(i as u32);
            let isolated = Some(id) == netns_id;
            if isolated {
                // Let the root-namespace hosts elect a coordinator first.
                h.wait_until(10_000, "a coordinator", |rs| {
                    rs.iter().any(|r| {
                        matches!(&r.report, Report::Decision(d) if matches!(d.kind, DecisionKind::Elected { .. }))
                    })
                })?;
            }
            let port = free_udp_port(&local_ip)?;
            let ip = match (&h.netns, isolated) {
                (Some(l), true) => l.ns_addr().to_string(),
                _ => local_ip.clone(),
            };
            let hc = HostRunConfig {
                spec: HostSpec {
                    id,
                    cpu_mhz: 8000,
                    mem_mib: 16384,
                    failover: matches!(cfg.policy, AdmissionPolicy::DedicatedFailoverHosts)
                        && i + 1 == cfg.hosts,
                    addr: format!("{ip}:{port}"),
                    pid: 0,
                },
                ha: cfg.ha.clone(),
                store: endpoint.clone(),
                prefix: prefix.clone(),
                control_dir: control_dir.clone(),
                tick_ms: cfg.tick_ms,
                write_interval_ms: cfg.write_interval_ms,
                store_timeout_ms: timeout.as_millis() as u64,
            };
            let mut cmd = match (&h.netns, isolated) {
                (Some(l), true) => l.wrap(&spawn(&hc)),
                _ => spawn(&hc),
            };
            cmd.stdout(Stdio::piped()).stdin(Stdio::null());
            let mut child = cmd.spawn().map_err(io(format!("spawning host {i}")))?;
            let out = child.stdout.take();
            let tx = tx.clone();
            std::thread::spawn(move || {
                let Some(out) = out else { return };
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    if let Ok(r) = serde_json::from_str::<ReportLine>(&line)
                        && tx.send(r).is_err()
                    {
                        return;
                    }
                }
            });
            h.children.push((id, child));
        }
        Ok(h)
    }
    /// The parent's store client.
    pub fn store(&self) -> &dyn ClusterStore {
        &*self.store
    }
    /// The VMs powered on.
    pub fn vms(&self) -> &[VmSpec] {
        &self.vms
    }
    /// Process id of a host agent.
    pub fn pid(&self, h: HostId) -> Option<u32> {
        self.children.iter().find(|(id, _)| *id == h).map(|(_, c)| c.id())
    }
    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.cfg.hosts
    }

    /// Receives reports until `pred` holds over all reports, or fails after `timeout_ms`.
    pub fn wait_until(
        &mut self,
        timeout_ms: u64,
        what: &str,
        mut pred: impl FnMut(&[ReportLine]) -> bool,
    ) -> Result<(), RuntimeError> {
        let end = Instant::now() + Duration::from_millis(timeout_ms);
        loop {
            if pred(&self.reports) {
                return Ok(());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RuntimeError::Timeout { what: what.to_string(), ms: timeout_ms });
            }
            if let Ok(r) = self.rx.recv_timeout(left.min(Duration::from_millis(50))) {
                self.reports.push(r);
                while let Ok(r) = self.rx.try_recv() {
                    self.reports.push(r);
                }
            }
        }
    }

    /// Collects reports for `ms` milliseconds.
    pub fn collect_for(&mut self, ms: u64) {
        let _ = self.wait_until(ms, "nothing", |_| false);
    }

    /// Waits for every host to join, powers on the VMs through admission control, and waits
    /// until each one runs.
    pub fn power_on_all(&mut self) -> Result<(), RuntimeError> {
        let n = self.cfg.hosts;
        self.wait_until(10_000, "every host to join", |rs| {
            let joined: std::collections::BTreeSet<HostId> = rs
                .iter()
                .filter(|r| matches!(&r.report, Report::Decision(d) if matches!(d.kind, DecisionKind::Joined { .. })))
                .map(|r| r.host)
                .collect();
            joined.len() == n
        })?;
        let prios = [Priority::High, Priority::Medium, Priority::Low];
        for v in 0..self.cfg.vms_per_host * n {
            let spec = VmSpec { id: VmId(v as u32), cpu_mhz: 1000, mem_mib: 2048, priority: prios[v % 3] };
            power_on(&*self.store, &self.keys, &self.cfg.policy, &mut WorstFit, spec.clone())?;
            self.vms.push(spec);
        }
        let ids: Vec<VmId> = self.vms.iter().map(|v| v.id).collect();
        self.wait_until(10_000, "every VM to start", |rs| {
            ids.iter()
                .all(|vm| rs.iter().any(|r| matches!(r.report, Report::Started { vm: v, .. } if v == *vm)))
        })
    }

    /// The coordinator according to the store.
    pub fn coordinator(&self) -> Option<HostId> {
        let kv = self.store.get(&self.keys.coordinator()).ok()??;
        let s = String::from_utf8(kv.value).ok()?;
        s.strip_prefix("host-")?.parse().ok().map(HostId)
    }

    /// VMs each host runs according to the reports so far.
    pub fn running(&self) -> std::collections::BTreeMap<VmId, Vec<HostId>> {
        let mut m: std::collections::BTreeMap<VmId, Vec<HostId>> = Default::default();
        for r in &self.reports {
            match r.report {
                Report::Started { vm, .. } => m.entry(vm).or_default().push(r.host),
                Report::Stopped { vm, .. } => m.entry(vm).or_default().retain(|h| *h != r.host),
                _ => {}
            }
        }
        m
    }

    /// Kills a host process with SIGKILL.
    pub fn kill(&mut self, h: HostId) -> Result<(), RuntimeError> {
        let c = self.child(h)?;
        c.kill().map_err(io(format!("killing {h}")))
    }

    /// Sends a signal (`"STOP"`, `"CONT"`, ...) to a host process.
    pub fn signal(&self, h: HostId, sig: &str) -> Result<(), RuntimeError> {
        let pid = self.pid(h).ok_or(RuntimeError::Config(format!("no {h}")))?;
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .map_err(io(format!("kill -{sig} {pid}")))?;
        Ok(())
    }

    fn child(&mut self, h: HostId) -> Result<&mut Child, RuntimeError> {
        let c = self.children.iter_mut().find(|(id, _)| *id == h);
        c.map(|(_, c)| c).ok_or(RuntimeError::Config(format!("no {h}")))
    }

    /// The host that runs in a network namespace of its own, if any.
    pub fn netns_host(&self) -> Option<HostId> {
        self.netns_id
    }

    /// How [`Self::partition`] isolates `h`: for real (its veth link goes down) or emulated.
    pub fn partition_mechanism(&self, h: HostId) -> PartitionMechanism {
        if self.netns.is_some() && self.netns_id == Some(h) {
            PartitionMechanism::Netns
        } else {
            PartitionMechanism::FlagFile
        }
    }

    /// Why partitions are emulated with flag files although a namespace was asked for.
    pub fn netns_unavailable(&self) -> Option<&str> {
        self.mechanism_note.as_deref()
    }

    /// Isolates a host (heartbeats, store and power control) or lifts the isolation: the host in
    /// the network namespace by taking its veth link down (up); any other by a flag file the
    /// host reads and obeys (emulated).
    pub fn partition(&self, h: HostId, on: bool) -> Result<(), RuntimeError> {
        if let (Some(l), true) = (&self.netns, self.netns_id == Some(h)) {
            return l.set_link(!on).map_err(|e| RuntimeError::Io {
                what: format!("partitioning {h}"),
                source: std::io::Error::other(e),
            });
        }
        let f = partition_flag(&self.control_dir, h);
        if on {
            std::fs::write(&f, b"").map_err(io(format!("creating {}", f.display())))
        } else {
            std::fs::remove_file(&f).map_err(io(format!("removing {}", f.display())))
        }
    }

    /// Whether a host process has exited (reaping it if so).
    pub fn exited(&mut self, h: HostId) -> bool {
        self.child(h).is_ok_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }
}

impl Drop for ClusterHarness {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = Command::new("kill").arg("-CONT").arg(c.id().to_string()).status();
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.control_dir);
        // Only now that no process is left inside it: delete the namespace and the veth pair.
        self.netns = None;
    }
}
