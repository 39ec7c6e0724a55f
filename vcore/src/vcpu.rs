//! vCPU threads: `KVM_RUN`, exit dispatch to the buses, pause/resume/stop, throttling.
//!
//! Kicking a vCPU out of `KVM_RUN` (for a pause, a stop or a throttle slice) sets
//! `kvm_run.immediate_exit` and sends the thread a real-time signal with an empty handler. The
//! vCPU clears `immediate_exit` *before* it looks at the request flags, with a full fence on both
//! sides, so a kick can never be lost between the check and the next `KVM_RUN`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::Bus;
use crate::guest::IDLE_PORT;
use crate::sys::KickHandle;

/// Length of one throttle period: a throttled vCPU sleeps `percent` of it.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);
/// How long `pause()` spins for the vCPUs to park before it sleeps on the condition variable.
const PAUSE_SPIN: Duration = Duration::from_micros(500);
/// Longest idle a guest may ask for at once ([`IDLE_PORT`]).
const MAX_IDLE_US: u32 = 100_000;
/// CPUs this process may run on (cached).
fn host_cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `KVM_EXIT_DIRTY_RING_FULL`.
const EXIT_DIRTY_RING_FULL: u32 = 31;

/// Something a vCPU reports that the embedder should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`); the vCPU stopped.
    TripleFault {
        /// The vCPU.
        vcpu: u8,
    },
    /// KVM could not emulate something (`KVM_EXIT_INTERNAL_ERROR`); the vCPU stopped.
    InternalError {
        /// The vCPU.
        vcpu: u8,
    },
    /// The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`); the vCPU stopped.
    FailEntry {
        /// The vCPU.
        vcpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The guest asked for shutdown, reset or reported a crash (`KVM_EXIT_SYSTEM_EVENT`); the
    /// vCPU stopped.
    SystemEvent {
        /// The vCPU.
        vcpu: u8,
        /// `KVM_SYSTEM_EVENT_*` type.
        kind: u32,
    },
    /// An exit vcore does not handle; the vCPU stopped.
    UnexpectedExit {
        /// The vCPU.
        vcpu: u8,
        /// The exit, as text.
        exit: String,
    },
    /// `KVM_RUN` failed; the vCPU stopped.
    RunError {
        /// The vCPU.
        vcpu: u8,
        /// The errno.
        errno: i32,
    },
    /// The vCPU's dirty ring is full: the dirty-ring harvester must collect and reset it. The
    /// vCPU retries every millisecond until there is room; reported once per episode.
    DirtyRingFull {
        /// The vCPU.
        vcpu: u8,
    },
}

/// A queue of [`VmEvent`]s, written by vCPU threads, read by the embedder.
#[derive(Debug, Default)]
pub(crate) struct EventQueue {
    queue: Mutex<VecDeque<VmEvent>>,
    cond: Condvar,
}

impl EventQueue {
    pub(crate) fn push(&self, e: VmEvent) {
        lock(&self.queue).push_back(e);
        self.cond.notify_all();
    }

    pub(crate) fn pop(&self, timeout: Duration) -> Option<VmEvent> {
        let q = lock(&self.queue);
        let (mut q, _) =
            self.cond.wait_timeout_while(q, timeout, |q| q.is_empty()).unwrap_or_else(|e| e.into_inner());
        q.pop_front()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of one vCPU.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Returns from `KVM_RUN`.
    pub exits: AtomicU64,
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// I/O exits no device claimed.
    pub unhandled_io: AtomicU64,
    /// Throttle sleeps taken.
    pub throttled: AtomicU64,
    /// Full dirty rings harvested by this vCPU's thread (through the handler).
    pub ring_harvests: AtomicU64,
}

/// What the vCPU thread and the controlling threads share about one vCPU.
#[derive(Debug)]
pub(crate) struct VcpuShared {
    pub(crate) id: u8,
    pub(crate) raw_fd: std::os::fd::RawFd,
    pub(crate) fd: Mutex<VcpuFd>,
    pub(crate) kick: KickHandle,
    pub(crate) thread: Mutex<Option<libc::pthread_t>>,
    pub(crate) throttle_due: AtomicBool,
    pub(crate) stats: VcpuStats,
}

impl VcpuShared {
    pub(crate) fn new(id: u8, mut fd: VcpuFd) -> Self {
        let kick = KickHandle::new(&mut fd);
        VcpuShared {
            id,
            raw_fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            fd: Mutex::new(fd),
            kick,
            thread: Mutex::new(None),
            throttle_due: AtomicBool::new(false),
            stats: VcpuStats::default(),
        }
    }

    pub(crate) fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        lock(&self.fd)
    }

    /// Makes the vCPU leave `KVM_RUN` (or not enter it) as soon as possible.
    pub(crate) fn kick(&self) {
        self.kick.set_immediate_exit(true);
        if let Some(t) = *lock(&self.thread) {
            crate::sys::signal_thread(t);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct CtlState {
    target: Target,
    /// vCPU threads parked, stopped for good, or not started.
    out: usize,
}

/// Run control shared by all vCPU threads of a VM.
#[derive(Debug)]
pub(crate) struct Control {
    state: Mutex<CtlState>,
    /// Called by a vCPU thread whose dirty ring is full; see [`DirtyRingFullHandler`].
    pub(crate) ring_full_handler: HandlerSlot,
    cond: Condvar,
    /// Copy of `CtlState::out`, written under the lock, read without it by a spinning pauser.
    out_hint: AtomicUsize,
    request: AtomicBool,
    pub(crate) throttle_percent: AtomicU8,
}

impl Control {
    pub(crate) fn new(vcpus: usize) -> Self {
        Control {
            state: Mutex::new(CtlState { target: Target::Run, out: vcpus }),
            ring_full_handler: HandlerSlot(Mutex::new(None)),
            cond: Condvar::new(),
            out_hint: AtomicUsize::new(vcpus),
            request: AtomicBool::new(false),
            throttle_percent: AtomicU8::new(0),
        }
    }

    /// Called before the `n` vCPU threads are spawned: from now on they count as running.
    pub(crate) fn started(&self, n: usize) {
        let mut st = lock(&self.state);
        st.out -= n;
        self.out_hint.store(st.out, Ordering::Release);
    }

    /// Parks the calling vCPU while a pause lasts; returns false if it must stop.
    fn park(&self) -> bool {
        let mut st = lock(&self.state);
        if st.target == Target::Run {
            return true;
        }
        st.out += 1;
        self.out_hint.store(st.out, Ordering::Release);
        self.cond.notify_all();
        while st.target == Target::Pause {
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.target == Target::Stop {
            return false;
        }
        st.out -= 1;
        self.out_hint.store(st.out, Ordering::Release);
        true
    }

    /// Parks the calling vCPU for up to `dur` (a guest's idle, [`crate::guest::IDLE_PORT`]),
    /// returning early when a pause or stop is requested. Meanwhile it counts as out of
    /// `KVM_RUN`, so a pause need not wait for it to wake (a sleeping thread takes ~1 ms to wake
    /// on this nested host): it re-enters only through the run loop, which parks it first.
    fn idle(&self, dur: Duration) {
        let mut st = lock(&self.state);
        st.out += 1;
        self.out_hint.store(st.out, Ordering::Release);
        self.cond.notify_all();
        let (mut st, _) = self
            .cond
            .wait_timeout_while(st, dur, |_| !self.request.load(Ordering::SeqCst))
            .unwrap_or_else(|e| e.into_inner());
        st.out -= 1;
        self.out_hint.store(st.out, Ordering::Release);
    }

    /// The calling vCPU stopped for good (fatal exit); it counts as out from now on.
    fn retire(&self) {
        let mut st = lock(&self.state);
        st.out += 1;
        self.out_hint.store(st.out, Ordering::Release);
        self.cond.notify_all();
    }

    /// Asks every vCPU to pause and waits until all `total` are out of `KVM_RUN`.
    pub(crate) fn pause(&self, vcpus: &[Arc<VcpuShared>]) {
        self.call_out(Target::Pause, vcpus);
        // Poll (yielding) briefly before sleeping: vCPUs usually park within microseconds, and a sleeping
        // waiter costs a wake-up IPI to an idle CPU (tens of µs when the host is itself a VM).
        // Only while there are fewer vCPU threads than CPUs: otherwise the waiter's CPU time is
        // better left to the vCPU threads that have to reach their park.
        let spin_until =
            std::time::Instant::now() + if vcpus.len() < host_cpus() { PAUSE_SPIN } else { Duration::ZERO };
        while self.out_hint.load(Ordering::Acquire) < vcpus.len() && std::time::Instant::now() < spin_until {
            std::thread::yield_now();
        }
        let st = lock(&self.state);
        let _st = self.cond.wait_while(st, |s| s.out < vcpus.len()).unwrap_or_else(|e| e.into_inner());
    }

    pub(crate) fn resume(&self) {
        let mut st = lock(&self.state);
        st.target = Target::Run;
        self.request.store(false, Ordering::SeqCst);
        self.cond.notify_all();
    }

    pub(crate) fn stop(&self, vcpus: &[Arc<VcpuShared>]) {
        self.call_out(Target::Stop, vcpus);
    }

    /// Sets `target` and requests every vCPU out of `KVM_RUN`: kicks those inside it and wakes
    /// those idling. Under the lock, so that an idling vCPU (see `idle`) cannot miss it.
    fn call_out(&self, target: Target, vcpus: &[Arc<VcpuShared>]) {
        {
            let mut st = lock(&self.state);
            st.target = target;
            self.request.store(true, Ordering::SeqCst);
            self.cond.notify_all();
        }
        for v in vcpus {
            v.kick();
        }
    }
}

/// Everything a vCPU thread needs.
#[derive(Debug)]
pub(crate) struct VcpuRunner {
    pub(crate) vcpu: Arc<VcpuShared>,
    pub(crate) ctl: Arc<Control>,
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) events: Arc<EventQueue>,
    /// Set while the dirty ring is full, so the event is reported once per episode.
    pub(crate) ring_full: std::cell::Cell<bool>,
}

enum Flow {
    Continue,
    Retire(VmEvent),
}

impl VcpuRunner {
    /// The body of a vCPU thread.
    pub(crate) fn run(self) {
        loop {
            self.vcpu.kick.set_immediate_exit(false);
            if self.ctl.request.load(Ordering::SeqCst) {
                if !self.ctl.park() {
                    return;
                }
                continue;
            }
            if self.vcpu.throttle_due.swap(false, Ordering::AcqRel) {
                let pct = u32::from(self.ctl.throttle_percent.load(Ordering::Relaxed).min(99));
                if pct > 0 {
                    self.vcpu.stats.throttled.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(THROTTLE_PERIOD * pct / 100);
                }
                continue;
            }
            if let Flow::Retire(event) = self.run_once() {
                self.events.push(event);
                self.ctl.retire();
                return;
            }
        }
    }

    fn run_once(&self) -> Flow {
        let id = self.vcpu.id;
        let stats = &self.vcpu.stats;
        let mut fd = self.vcpu.fd();
        let exit = fd.run();
        stats.exits.fetch_add(1, Ordering::Relaxed);
        let handled = match exit {
            Ok(VcpuExit::IoOut(IDLE_PORT, data)) => {
                stats.pio.fetch_add(1, Ordering::Relaxed);
                let mut us = [0u8; 4];
                let n = data.len().min(4);
                us[..n].copy_from_slice(&data[..n]);
                let us = u32::from_le_bytes(us).min(MAX_IDLE_US);
                drop(fd);
                self.ctl.idle(Duration::from_micros(u64::from(us)));
                return Flow::Continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                stats.pio.fetch_add(1, Ordering::Relaxed);
                self.pio.write(u64::from(port), data)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                stats.pio.fetch_add(1, Ordering::Relaxed);
                self.pio.read(u64::from(port), data)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                stats.mmio.fetch_add(1, Ordering::Relaxed);
                self.mmio.write(addr, data)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                stats.mmio.fetch_add(1, Ordering::Relaxed);
                self.mmio.read(addr, data)
            }
            Ok(VcpuExit::Intr | VcpuExit::Hlt | VcpuExit::IrqWindowOpen) => true,
            Ok(VcpuExit::Shutdown) => return Flow::Retire(VmEvent::TripleFault { vcpu: id }),
            Ok(VcpuExit::InternalError) => return Flow::Retire(VmEvent::InternalError { vcpu: id }),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                return Flow::Retire(VmEvent::FailEntry { vcpu: id, reason });
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Flow::Retire(VmEvent::SystemEvent { vcpu: id, kind });
            }
            Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => {
                drop(fd);
                // The handler (a dirty-ring tracker) harvests the rings on this thread, as QEMU
                // does; without one, or when it frees nothing, the vCPU waits for a harvest.
                let handler = lock(&self.ctl.ring_full_handler.0).clone();
                if handler.is_some_and(|h| h(id)) {
                    self.vcpu.stats.ring_harvests.fetch_add(1, Ordering::Relaxed);
                    return Flow::Continue;
                }
                if !self.ring_full.replace(true) {
                    self.events.push(VmEvent::DirtyRingFull { vcpu: id });
                }
                std::thread::sleep(Duration::from_millis(1));
                return Flow::Continue;
            }
            Ok(other) => {
                return Flow::Retire(VmEvent::UnexpectedExit { vcpu: id, exit: format!("{other:?}") });
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => true,
            Err(e) => return Flow::Retire(VmEvent::RunError { vcpu: id, errno: e.errno() }),
        };
        if !handled {
            stats.unhandled_io.fetch_add(1, Ordering::Relaxed);
        }
        self.ring_full.set(false);
        Flow::Continue
    }
}

/// Kicks every vCPU once per [`THROTTLE_PERIOD`] while the throttle is above 0 %.
pub(crate) fn throttle_loop(ctl: Arc<Control>, vcpus: Vec<Arc<VcpuShared>>) {
    while ctl.throttle_percent.load(Ordering::Relaxed) > 0 && !ctl_stopping(&ctl) {
        for v in &vcpus {
            v.throttle_due.store(true, Ordering::Release);
            v.kick();
        }
        std::thread::sleep(THROTTLE_PERIOD);
    }
}

fn ctl_stopping(ctl: &Control) -> bool {
    lock(&ctl.state).target == Target::Stop
}

/// Called on a vCPU thread when that vCPU's dirty ring is full (`KVM_EXIT_DIRTY_RING_FULL`),
/// with the vCPU's id: it should harvest the rings and `KVM_RESET_DIRTY_RINGS`, and return
/// whether it made room. Then the vCPU re-enters the guest at once; otherwise it reports
/// [`VmEvent::DirtyRingFull`] (once per episode) and waits, retrying every millisecond.
pub type DirtyRingFullHandler = dyn Fn(u8) -> bool + Send + Sync;

/// Where the [`DirtyRingFullHandler`] lives.
pub(crate) struct HandlerSlot(pub(crate) Mutex<Option<Arc<DirtyRingFullHandler>>>);

impl std::fmt::Debug for HandlerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // try_lock: formatting must never wait (or deadlock) on a vCPU thread.
        let set = self.0.try_lock().ok().map(|h| h.is_some());
        f.debug_struct("HandlerSlot").field("set", &set).finish()
    }
}
