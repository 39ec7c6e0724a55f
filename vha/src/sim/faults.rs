//! Fault injection: crashes, pauses, partitions, store cuts and outages, loss and delay.

use super::Sim;

impl Sim {
    /// Crashes a host (its VMs die with it); it reboots after `reboot_after_ms` if given.
    pub fn crash(&mut self, h: usize, reboot_after_ms: Option<u64>) {
        let now = self.now;
        let Some(host) = self.hosts.get_mut(h) else {
            return;
        };
        if host.agent.take().is_some() {
            host.running.clear();
            host.paused = false;
            self.stats.crashes += 1;
        }
        host.reboot_at = reboot_after_ms.map(|d| now + d);
        self.note(format!("CRASH host-{h}"));
        self.fault_changed();
    }

    /// Boots a crashed host now.
    pub fn reboot(&mut self, h: usize) {
        if let Some(host) = self.hosts.get_mut(h)
            && !host.up()
        {
            host.reboot_at = Some(self.now);
        }
    }

    /// Pauses (`true`) or resumes a host's agent process.
    pub fn pause(&mut self, h: usize, paused: bool) {
        if let Some(host) = self.hosts.get_mut(h)
            && host.up()
        {
            host.paused = paused;
            self.note(format!("{} host-{h}", if paused { "PAUSE" } else { "RESUME" }));
            self.fault_changed();
        }
    }

    /// Blocks (`true`) or unblocks heartbeats from `from` to `to` (one way).
    pub fn block(&mut self, from: usize, to: usize, blocked: bool) {
        let c = self.blocked.entry((from, to)).or_default();
        if blocked {
            *c += 1;
        } else {
            *c = c.saturating_sub(1);
        }
        if *c == 0 {
            self.blocked.remove(&(from, to));
        }
        self.fault_changed();
    }

    /// Symmetric partition between host groups `a` and `b` (set `on` false to lift it).
    pub fn partition(&mut self, a: &[usize], b: &[usize], on: bool) {
        for &x in a {
            for &y in b {
                self.block(x, y, on);
                self.block(y, x, on);
            }
        }
        self.note(format!("PARTITION {a:?} | {b:?} {}", if on { "on" } else { "off" }));
    }

    /// Cuts (`true`) or restores a host's path to the store.
    pub fn cut_store(&mut self, h: usize, cut: bool) {
        if let Some(host) = self.hosts.get_mut(h) {
            if cut {
                host.cut += 1;
            } else {
                host.cut = host.cut.saturating_sub(1);
            }
        }
        self.note(format!("STORE-CUT host-{h} {cut}"));
        self.fault_changed();
    }

    /// Starts or ends a whole-store outage.
    pub fn store_outage(&mut self, on: bool) {
        if on {
            self.outages += 1;
        } else {
            self.outages = self.outages.saturating_sub(1);
        }
        self.store.set_available(self.outages == 0);
        self.note(format!("STORE-OUTAGE {on}"));
        self.fault_changed();
    }

    /// Adds (`Some`) or removes a message loss probability.
    pub fn set_loss(&mut self, add: Option<f64>) {
        match add {
            Some(p) => self.loss.push(p),
            None => {
                self.loss.pop();
            }
        }
        self.fault_changed();
    }

    /// Adds (`Some`) or removes a maximum message delay.
    pub fn set_delay(&mut self, add: Option<u64>) {
        match add {
            Some(d) => self.delays.push(d),
            None => {
                self.delays.pop();
            }
        }
    }

    /// Lifts every fault: links, loss, delay, store cuts and outages, pauses; reboots crashed
    /// hosts.
    pub fn heal(&mut self) {
        self.blocked.clear();
        self.loss.clear();
        self.delays.clear();
        self.outages = 0;
        self.store.set_available(true);
        let now = self.now;
        for h in &mut self.hosts {
            h.cut = 0;
            h.paused = false;
            if !h.up() {
                h.reboot_at = Some(now);
            }
        }
        self.note("HEAL".into());
        self.fault_changed();
    }
}
