//! Failure detection: a phi accrual detector per peer (Hayashibara et al. 2004, as in Cassandra
//! and Akka) and the isolation test (a host that hears no peer and cannot reach the store).
//!
//! Pure arithmetic on timestamps the caller passes in; no clock, no I/O.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Settings of the phi accrual detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhiConfig {
    /// Suspicion level at which a peer is considered failed (Cassandra's default: 8).
    pub threshold: f64,
    /// Number of inter-arrival samples kept.
    pub window: usize,
    /// Floor for the standard deviation, so very regular heartbeats do not make the detector
    /// trigger on the first late packet.
    pub min_std_dev_ms: f64,
    /// Extra pause tolerated on top of the mean interval (GC pauses, scheduling).
    pub acceptable_pause_ms: f64,
    /// Interval assumed before any sample exists (normally the heartbeat interval).
    pub first_interval_ms: f64,
}

impl Default for PhiConfig {
    fn default() -> Self {
        Self {
            threshold: 8.0,
            window: 100,
            min_std_dev_ms: 100.0,
            acceptable_pause_ms: 0.0,
            first_interval_ms: 200.0,
        }
    }
}

/// Errors of the detector module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DetectorError {
    /// A setting is out of range.
    #[error("invalid detector setting {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        reason: &'static str,
    },
}

impl PhiConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), DetectorError> {
        let bad = |field, reason| Err(DetectorError::Invalid { field, reason });
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            return bad("threshold", "must be a positive number");
        }
        if self.window < 2 {
            return bad("window", "must keep at least 2 samples");
        }
        if !(self.min_std_dev_ms.is_finite() && self.min_std_dev_ms > 0.0) {
            return bad("min_std_dev_ms", "must be positive");
        }
        if !(self.acceptable_pause_ms.is_finite() && self.acceptable_pause_ms >= 0.0) {
            return bad("acceptable_pause_ms", "must be >= 0");
        }
        if !(self.first_interval_ms.is_finite() && self.first_interval_ms > 0.0) {
            return bad("first_interval_ms", "must be positive");
        }
        Ok(())
    }
}

/// Phi accrual failure detector for one peer.
#[derive(Debug, Clone)]
pub struct PhiDetector {
    cfg: PhiConfig,
    intervals: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last_ms: Option<u64>,
}

impl PhiDetector {
    /// A detector that has seen no heartbeat yet.
    pub fn new(cfg: PhiConfig) -> Self {
        Self { cfg, intervals: VecDeque::new(), sum: 0.0, sum_sq: 0.0, last_ms: None }
    }

    /// Records a heartbeat arrival at `now_ms`. Arrivals that go back in time are ignored.
    pub fn heartbeat(&mut self, now_ms: u64) {
        match self.last_ms {
            None => {
                // Seed with two samples around the expected interval (mean m, std m/4).
                let m = self.cfg.first_interval_ms;
                self.push(m - m / 4.0);
                self.push(m + m / 4.0);
            }
            Some(last) if now_ms >= last => self.push((now_ms - last) as f64),
            Some(_) => return,
        }
        self.last_ms = Some(now_ms);
    }

    fn push(&mut self, x: f64) {
        if self.intervals.len() == self.cfg.window
            && let Some(old) = self.intervals.pop_front()
        {
            self.sum -= old;
            self.sum_sq -= old * old;
        }
        self.intervals.push_back(x);
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// Time of the last heartbeat, if any.
    pub fn last_heartbeat_ms(&self) -> Option<u64> {
        self.last_ms
    }

    /// Mean inter-arrival time in ms.
    pub fn mean_ms(&self) -> f64 {
        if self.intervals.is_empty() {
            return self.cfg.first_interval_ms;
        }
        self.sum / self.intervals.len() as f64
    }

    /// Standard deviation of the inter-arrival time (floored at `min_std_dev_ms`).
    pub fn std_dev_ms(&self) -> f64 {
        let n = self.intervals.len() as f64;
        if n < 1.0 {
            return self.cfg.min_std_dev_ms;
        }
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        var.sqrt().max(self.cfg.min_std_dev_ms)
    }

    /// Suspicion level at `now_ms`: `-log10(P(a heartbeat is still coming))`, using the logistic
    /// approximation of the normal CDF (as Akka and Cassandra do). 0 before the first heartbeat.
    pub fn phi(&self, now_ms: u64) -> f64 {
        let Some(last) = self.last_ms else { return 0.0 };
        let elapsed = now_ms.saturating_sub(last) as f64;
        let mean = self.mean_ms() + self.cfg.acceptable_pause_ms;
        let y = (elapsed - mean) / self.std_dev_ms();
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let p = if elapsed > mean { e / (1.0 + e) } else { 1.0 - 1.0 / (1.0 + e) };
        if p <= 0.0 { f64::INFINITY } else { -p.log10() }
    }

    /// Whether the peer is suspected at `now_ms` (phi above the threshold).
    pub fn suspected(&self, now_ms: u64) -> bool {
        self.phi(now_ms) > self.cfg.threshold
    }
}

/// What an isolated host does with its VMs (vSphere's host isolation response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationResponse {
    /// Power the VMs off at once and give up the lease, so they restart elsewhere.
    #[default]
    PowerOff,
    /// Shut the VMs down cleanly, then give up the lease.
    Shutdown,
    /// Keep the VMs running; the lease watchdog still stops them before the lease can expire,
    /// so they can never run twice.
    LeaveRunning,
}

/// Isolation test: no peer heard and no store contact for `timeout_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationDetector {
    timeout_ms: u64,
    last_peer_ms: u64,
    last_store_ms: u64,
}

impl IsolationDetector {
    /// A detector that counts from `now_ms`.
    pub fn new(timeout_ms: u64, now_ms: u64) -> Self {
        Self { timeout_ms, last_peer_ms: now_ms, last_store_ms: now_ms }
    }
    /// A heartbeat from any peer arrived.
    pub fn peer_heard(&mut self, now_ms: u64) {
        self.last_peer_ms = self.last_peer_ms.max(now_ms);
    }
    /// A store request succeeded.
    pub fn store_ok(&mut self, now_ms: u64) {
        self.last_store_ms = self.last_store_ms.max(now_ms);
    }
    /// Milliseconds since the store last answered.
    pub fn store_silence_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_store_ms)
    }
    /// Whether the host is isolated at `now_ms`. A host with no peers at all is never isolated
    /// by the peer test alone; it then only needs the store.
    pub fn isolated(&self, now_ms: u64, has_peers: bool) -> bool {
        let no_store = now_ms.saturating_sub(self.last_store_ms) >= self.timeout_ms;
        let no_peer = !has_peers || now_ms.saturating_sub(self.last_peer_ms) >= self.timeout_ms;
        no_store && no_peer && has_peers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn phi_grows_with_silence_and_crosses_threshold() {
        let mut d = PhiDetector::new(PhiConfig::default());
        for i in 0..50 {
            d.heartbeat(i * 200);
        }
        let last = 49 * 200;
        assert!(d.phi(last + 200) < 1.0, "on time: {}", d.phi(last + 200));
        assert!(!d.suspected(last + 400));
        assert!(d.suspected(last + 1500), "1.5 s of silence at 200 ms interval is a failure");
        // Detection time with default settings: the first ms at which phi > 8.
        let t = (0..5000).find(|ms| d.suspected(last + ms)).unwrap();
        assert!((400..1200).contains(&t), "detected after {t} ms");
    }

    #[test]
    fn config_validation() {
        assert!(PhiConfig::default().validate().is_ok());
        let c = PhiConfig { threshold: f64::NAN, ..Default::default() };
        assert!(c.validate().is_err());
        let c = PhiConfig { window: 1, ..Default::default() };
        assert!(c.validate().is_err());
    }

    #[test]
    fn isolation_needs_both_channels_silent() {
        let mut d = IsolationDetector::new(1000, 0);
        assert!(!d.isolated(500, true));
        d.store_ok(900);
        assert!(!d.isolated(1500, true), "store still answers");
        assert!(d.isolated(1900, true));
        d.peer_heard(1950);
        assert!(!d.isolated(2000, true));
        assert!(!d.isolated(10_000, false), "a lone host is never isolated");
    }

    proptest! {
        /// Phi is finite or +inf, never negative, and non-decreasing in silence.
        #[test]
        fn phi_monotone(gaps in proptest::collection::vec(1u64..2000, 1..40), probe in 0u64..20_000) {
            let mut d = PhiDetector::new(PhiConfig::default());
            let mut t = 0;
            d.heartbeat(t);
            for g in gaps { t += g; d.heartbeat(t); }
            let a = d.phi(t + probe);
            let b = d.phi(t + probe + 100);
            prop_assert!(a >= 0.0 && b >= 0.0);
            prop_assert!(b >= a, "phi({}) = {a} > phi(+100) = {b}", probe);
        }
    }
}
