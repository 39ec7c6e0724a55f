//! vSphere-HA-style failover on loopback: host agents as separate OS processes, UDP
//! heartbeats, the embedded store served by this process (or etcd with `--etcd`).
//!
//! Default: start 4 host agents, power on 12 VMs through admission control, `kill -9` one host
//! (not the coordinator), and show how its VMs are restarted elsewhere: a timeline (last
//! heartbeat, suspicion, fence, restart of each VM on which host) and a summary table.
//!
//! ```text
//! cargo run --release --example ha                   # kill -9 a host
//! cargo run --release --example ha -- --partition    # isolate a host: it fences itself
//! cargo run --release --example ha -- --stop         # SIGSTOP a host past its lease, then wake it
//! cargo run --release --example ha --features vha/etcd -- --etcd   # etcd as the store
//! cargo run --release --example ha -- --json         # the summary as one JSON object
//! ```
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use vha::runtime::{
    ClusterHarness, ETCD_SUPPORTED, HarnessConfig, HostRunConfig, Outcome, PartitionMechanism, Scenario,
    run_host, run_scenario,
};

/// Kill (or isolate, or freeze) one host of a 4-host cluster and watch HA restart its VMs.
#[derive(Debug, Parser)]
#[command(name = "ha")]
struct Args {
    /// Isolate the victim (no heartbeats, no store, no power control) instead of killing it;
    /// it must fence itself, and its VMs restart once its lease expired. As root with `ip`
    /// (iproute2) the victim runs in a network namespace of its own, linked by a veth pair
    /// (10.213.0.0/16), and the link is taken down; elsewhere the partition is emulated with a
    /// flag file the victim obeys.
    #[arg(long, conflicts_with = "stop")]
    partition: bool,
    /// SIGSTOP the victim past its lease, then SIGCONT it: the woken zombie must not run or
    /// write for its VMs. Turns power fencing off so the restart waits for the lease.
    #[arg(long)]
    stop: bool,
    /// Use etcd as the cluster store: VINFRA_ETCD_ENDPOINTS, else 127.0.0.1:2379, else start
    /// the `etcd` binary on free loopback ports (needs `--features vha/etcd`).
    #[arg(long)]
    etcd: bool,
    /// Number of host agent processes.
    #[arg(long, default_value_t = 4)]
    hosts: usize,
    /// VMs per host.
    #[arg(long, default_value_t = 3)]
    vms_per_host: usize,
    /// Disable power fencing (restart only after the victim's lease expires).
    #[arg(long)]
    no_power_fence: bool,
    /// Print the summary as one JSON object on stdout (progress and tables are not printed).
    #[arg(long)]
    json: bool,
    /// Internal: run as a host agent with this JSON configuration.
    #[arg(long, hide = true)]
    host_agent: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(cfg) = &args.host_agent {
        return host_agent(cfg);
    }
    let scenario = if args.partition {
        Scenario::Partition
    } else if args.stop {
        Scenario::Stop
    } else {
        Scenario::Kill
    };
    let pb = if args.json { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    pb.set_style(ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")?);
    pb.enable_steady_tick(Duration::from_millis(100));

    let mut _etcd_proc = None;
    let etcd = if args.etcd {
        if !ETCD_SUPPORTED {
            bail!("--etcd needs vha's etcd backend: cargo run --example ha --features vha/etcd -- --etcd");
        }
        pb.set_message("finding etcd");
        let (eps, proc_) = find_or_start_etcd()?;
        _etcd_proc = proc_;
        Some(eps)
    } else {
        None
    };
    let mut cfg = HarnessConfig {
        hosts: args.hosts,
        vms_per_host: args.vms_per_host,
        etcd,
        netns_host: scenario == Scenario::Partition,
        ..Default::default()
    };
    if args.no_power_fence || scenario == Scenario::Stop {
        cfg.ha.power_fencing = false;
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let spawn = |hc: &HostRunConfig| {
        let mut c = Command::new(&exe);
        c.arg("--host-agent").arg(serde_json::to_string(hc).unwrap_or_default());
        c
    };
    pb.set_message(format!("starting {} host agent processes", cfg.hosts));
    let t = Instant::now();
    let mut h = ClusterHarness::start(cfg.clone(), &spawn)?;
    if let Some(why) = h.netns_unavailable() {
        pb.suspend(|| eprintln!("note: the partition is emulated with a flag file ({why})"));
    }
    pb.set_message("hosts joining, powering on VMs through admission control");
    h.power_on_all()?;
    let setup_ms = t.elapsed().as_millis();
    pb.set_message(format!("injecting {scenario:?} and waiting for restarts"));
    let o = run_scenario(&mut h, scenario)?;
    pb.finish_and_clear();
    let store = if cfg.etcd.is_some() { "etcd" } else { "embedded" };
    if args.json {
        let v = serde_json::json!({
            "store": store,
            "hosts": cfg.hosts,
            "vms": h.vms().len(),
            "power_fencing": cfg.ha.power_fencing,
            "lease_ttl_ms": cfg.ha.lease_ttl_ms,
            "heartbeat_interval_ms": cfg.ha.heartbeat_interval_ms,
            "phi_threshold": cfg.ha.phi.threshold,
            "setup_ms": setup_ms,
            "partition": o.partition,
            "outcome": o,
        });
        println!("{v}");
    } else {
        print_human(&o, store, &cfg, h.vms().len());
    }
    if o.double_runs > 0 || o.stale_writes_accepted > 0 {
        bail!("safety violated: {} double runs, {} stale writes", o.double_runs, o.stale_writes_accepted);
    }
    Ok(())
}

fn host_agent(cfg: &str) -> Result<()> {
    let cfg: HostRunConfig = serde_json::from_str(cfg).context("host agent config")?;
    let mut out = std::io::stdout();
    run_host(cfg, &mut |line| {
        // The parent is gone (its end of the pipe closed): stop instead of running orphaned.
        if writeln!(out, "{}", serde_json::to_string(&line).unwrap_or_default())
            .and_then(|_| out.flush())
            .is_err()
        {
            std::process::exit(1);
        }
    })?;
    Ok(())
}

fn ms(v: Option<u64>) -> String {
    v.map_or("-".into(), |x| format!("{x} ms"))
}

fn print_human(o: &Outcome, store: &str, cfg: &HarnessConfig, vms: usize) {
    println!(
        "vha: {} hosts, {vms} VMs, {store} store, heartbeat {} ms, phi threshold {}, lease {} ms, power fencing {}",
        cfg.hosts,
        cfg.ha.heartbeat_interval_ms,
        cfg.ha.phi.threshold,
        cfg.ha.lease_ttl_ms,
        if cfg.ha.power_fencing { "on" } else { "off" }
    );
    println!(
        "scenario {:?}{}: victim {}, coordinator {}\n",
        o.scenario,
        match o.partition {
            Some(PartitionMechanism::Netns) => " (network namespace, veth link down)",
            Some(PartitionMechanism::FlagFile) => " (emulated with a flag file)",
            None => "",
        },
        o.victim,
        o.coordinator.map_or("-".into(), |c| c.to_string())
    );
    println!("timeline (ms relative to the fault)");
    for e in &o.timeline {
        println!("  {:>+7}  {:<7}  {}", e.at_ms, e.host.to_string(), e.what);
    }
    println!("\n{:<7} {:<9} {:<8} {:>16} {:>14}", "VM", "priority", "to", "restart begun", "running again");
    for v in &o.vms {
        println!(
            "{:<7} {:<9} {:<8} {:>16} {:>14}",
            v.vm.to_string(),
            format!("{:?}", v.priority),
            v.to.map_or("-".into(), |h| h.to_string()),
            ms(v.restart_begun_ms),
            ms(v.running_ms)
        );
    }
    println!("\nsummary");
    println!(
        "  {:<44} {}",
        "last heartbeat received (before fault)",
        o.last_heartbeat_ms.map_or("-".into(), |x| format!("{x} ms"))
    );
    println!("  {:<44} {}", "fault -> suspected (phi > threshold)", ms(o.detection_ms));
    println!("  {:<44} {}", "fault -> fenced (power fence or self-fence)", ms(o.fence_ms));
    println!("  {:<44} {}", "host death -> restart begun (first VM)", ms(o.first_restart_ms));
    println!("  {:<44} {}", "fault -> every protected VM running again", ms(o.all_running_ms));
    println!("  {:<44} {}", "VMs running on two hosts at once", o.double_runs);
    println!("  {:<44} {}", "stale shared writes accepted (split brain)", o.stale_writes_accepted);
    println!("  {:<44} {}", "victim writes refused (stale fencing token)", o.victim_writes_refused);
}

struct EtcdProc {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn reachable(ep: &str) -> bool {
    let hostport = ep.trim_start_matches("http://").trim_start_matches("https://");
    hostport.parse().ok().is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

fn find_or_start_etcd() -> Result<(Vec<String>, Option<EtcdProc>)> {
    if let Ok(eps) = std::env::var("VINFRA_ETCD_ENDPOINTS") {
        return Ok((eps.split(',').map(|s| s.trim().to_string()).collect(), None));
    }
    if reachable("127.0.0.1:2379") {
        return Ok((vec!["http://127.0.0.1:2379".into()], None));
    }
    let (client, peer) = (free_port()?, free_port()?);
    let dir = std::env::temp_dir().join(format!("vha-etcd-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let c = format!("http://127.0.0.1:{client}");
    let p = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "vha", "--data-dir"])
        .arg(&dir)
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
        .args(["--initial-cluster", &format!("vha={p}")])
        .args(["--heartbeat-interval", "100", "--election-timeout", "500"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting etcd (Debian: apt-get install etcd-server, or run .ci/etcd.sh)")?;
    let proc_ = EtcdProc { child, dir };
    let t = Instant::now();
    while !reachable(&format!("127.0.0.1:{client}")) {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("etcd did not start on {c}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok((vec![c], Some(proc_)))
}
