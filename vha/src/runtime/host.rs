//! One host agent process: the core agent on a real clock, UDP heartbeats, a store client,
//! a process-kill fence agent, and VMs that write their shared state with fencing tokens.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Report, ReportLine, RuntimeError, StoreEndpoint, UnixClock, connect_store, partition_flag};
use crate::agent::{Action, Event, HaConfig, HostAgent};
use crate::fence::{FenceAgent, FenceError};
use crate::model::{HostId, HostSpec, Keys, VmId};
use crate::restart::WorstFit;

/// Everything a host agent process needs (passed as JSON by its parent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRunConfig {
    /// The host; `addr` is its UDP heartbeat address, `pid` is filled in by the process.
    pub spec: HostSpec,
    /// Agent settings.
    pub ha: HaConfig,
    /// The store.
    pub store: StoreEndpoint,
    /// Store key prefix of this cluster.
    pub prefix: String,
    /// Directory of the partition flag files.
    pub control_dir: PathBuf,
    /// Agent loop period in ms.
    pub tick_ms: u64,
    /// Period of each VM's shared-state write in ms.
    pub write_interval_ms: u64,
    /// Store request timeout in ms.
    pub store_timeout_ms: u64,
}

/// Power fencing by process kill: `kill -9 <pid>`, confirmed when the process is gone or a
/// zombie. The power control is reached over the host's network: the agent first probes the
/// host's address over TCP and refuses when it gets no answer (a refused connection is an
/// answer), as when the host's link is down; it also refuses when the target is behind an
/// emulated partition (flag file).
#[derive(Debug, Clone)]
pub struct ProcessFenceAgent {
    /// Directory of the partition flag files.
    pub control_dir: PathBuf,
}

/// Whether process `pid` is gone or a zombie.
pub(super) fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // Field 3 (after the parenthesized command name) is the state; Z = zombie, X = dead.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|s| s == "Z" || s == "X"),
    }
}

impl FenceAgent for ProcessFenceAgent {
    fn fence(&mut self, host: &HostSpec) -> Result<(), FenceError> {
        let name = host.id.to_string();
        if partition_flag(&self.control_dir, host.id).exists() {
            return Err(FenceError::Unreachable {
                host: name,
                reason: "power control behind the partition".into(),
            });
        }
        if let Err(reason) = probe(&host.addr) {
            return Err(FenceError::Unreachable { host: name, reason });
        }
        if host.pid == 0 {
            return Err(FenceError::Unreachable { host: name, reason: "no process id published".into() });
        }
        if !process_gone(host.pid) {
            let st = std::process::Command::new("kill").arg("-9").arg(host.pid.to_string()).status();
            if let Err(e) = st {
                return Err(FenceError::Unreachable { host: name, reason: format!("kill: {e}") });
            }
        }
        for _ in 0..100 {
            if process_gone(host.pid) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(FenceError::NotConfirmed { host: name, reason: format!("pid {} still alive", host.pid) })
    }
}

/// Whether the network path to `addr` works: a TCP connection is accepted or refused (the
/// host's kernel answered) within 300 ms.
fn probe(addr: &str) -> Result<(), String> {
    let a: std::net::SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    match std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(format!("power control unreachable over the network ({addr}): {e}")),
    }
}

const MAGIC: &[u8; 4] = b"VHA1";

fn encode_hb(from: HostId, seq: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(MAGIC);
    b[4..8].copy_from_slice(&from.0.to_le_bytes());
    b[8..].copy_from_slice(&seq.to_le_bytes());
    b
}

fn decode_hb(b: &[u8]) -> Option<HostId> {
    if b.len() != 16 || &b[..4] != MAGIC {
        return None;
    }
    let mut id = [0u8; 4];
    id.copy_from_slice(&b[4..8]);
    Some(HostId(u32::from_le_bytes(id)))
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io { what: what.to_string(), source }
}

/// Runs a host agent until the process is killed. Every report goes to `emit`.
pub fn run_host(cfg: HostRunConfig, emit: &mut dyn FnMut(ReportLine)) -> Result<(), RuntimeError> {
    let clock = UnixClock::new();
    let me = cfg.spec.id;
    let mut say = |report: Report| emit(ReportLine { unix_ms: clock.now_ms(), host: me, report });
    let sock = UdpSocket::bind(&cfg.spec.addr).map_err(io("binding heartbeat socket"))?;
    sock.set_nonblocking(true).map_err(io("non-blocking socket"))?;
    let blocked = Arc::new(AtomicBool::new(false));
    let timeout = Duration::from_millis(cfg.store_timeout_ms);
    let store = connect_store(&cfg.store, timeout, blocked.clone())?;
    let mut spec = cfg.spec.clone();
    spec.pid = std::process::id();
    let mut agent = HostAgent::new(cfg.ha.clone(), spec, Keys::new(cfg.prefix.clone()), clock.now_ms())?;
    say(Report::Ready { pid: std::process::id() });
    let flag = partition_flag(&cfg.control_dir, me);
    let (fence_tx, fence_rx) = mpsc::channel::<Event>();
    let mut actions = Vec::new();
    let mut seq = 0u64;
    let mut next_write: BTreeMap<VmId, u64> = BTreeMap::new();
    let mut buf = [0u8; 64];
    loop {
        let partitioned = flag.exists();
        blocked.store(partitioned, Ordering::Relaxed);
        let now = clock.now_ms();
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let (Some(from), false) = (decode_hb(&buf[..n]), partitioned) {
                agent.handle(now, Event::Heartbeat { from });
            }
        }
        while let Ok(ev) = fence_rx.try_recv() {
            agent.handle(now, ev);
        }
        agent.tick(now, &*store, &mut WorstFit, &mut actions);
        // Store calls inside tick may have blocked: check the deadline again before VM I/O.
        agent.check_watchdog(clock.now_ms(), &mut actions);
        for a in actions.drain(..) {
            match a {
                Action::SendHeartbeat { addr, .. } => {
                    seq += 1;
                    if !partitioned {
                        let _ = sock.send_to(&encode_hb(me, seq), &addr);
                    }
                }
                Action::StartVm { vm, token } => {
                    next_write.insert(vm, now);
                    say(Report::Started { vm, token });
                }
                Action::StopVm { vm, reason } => {
                    next_write.remove(&vm);
                    say(Report::Stopped { vm, reason });
                }
                Action::Fence { host } => {
                    let tx = fence_tx.clone();
                    let mut fa = ProcessFenceAgent { control_dir: cfg.control_dir.clone() };
                    std::thread::spawn(move || {
                        let result = fa.fence(&host).map_err(|e| e.to_string());
                        let _ = tx.send(Event::FenceDone { host: host.id, result });
                    });
                }
                Action::Log(d) => say(Report::Decision(d)),
            }
        }
        // The VMs' own I/O: each writes its shared state with its fencing token.
        let now = clock.now_ms();
        for (vm, due) in next_write.iter_mut() {
            if now >= *due {
                *due = now + cfg.write_interval_ms;
                let r = agent.write_shared(now, &*store, *vm, now.to_le_bytes().to_vec());
                let stale_token = matches!(r, Err(FenceError::StaleToken { .. }));
                say(Report::SharedWrite { vm: *vm, ok: r.is_ok(), stale_token });
            }
        }
        std::thread::sleep(Duration::from_millis(cfg.tick_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Heartbeat packets round-trip, and arbitrary datagrams never panic the decoder.
        #[test]
        fn heartbeat_codec(id in any::<u32>(), seq in any::<u64>(), junk in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(decode_hb(&encode_hb(HostId(id), seq)), Some(HostId(id)));
            let d = decode_hb(&junk);
            prop_assert!(d.is_none() || (junk.len() == 16 && &junk[..4] == MAGIC));
        }
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let mut v = serde_json::to_value(HaConfig::default()).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("heartbeat_ms".into(), 5.into());
        }
        assert!(serde_json::from_value::<HaConfig>(v).is_err());
        let partial: HaConfig = serde_json::from_str(r#"{"lease_ttl_ms": 3000}"#).unwrap_or_default();
        assert_eq!(partial.lease_ttl_ms, 3000, "missing fields take defaults");
        let bad = HaConfig { keepalive_interval_ms: 1500, ..HaConfig::default() };
        assert!(bad.validate().is_err(), "keep-alive must fit 3 times in the TTL");
    }
}
