//! The completion side of the driver: interrupts, the used ring, waiting.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EpollEvent;

use super::{Completion, Driver, HarnessError, INT_CONFIG, INT_VRING, Pending, reg, status};

impl Driver {
    /// Waits up to `timeout` for an interrupt; reads and acknowledges `InterruptStatus`.
    /// Returns the status bits (0 on timeout).
    pub fn wait_interrupt(&mut self, timeout: Duration) -> u32 {
        let mut ev = [EpollEvent::default()];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        if matches!(self.epoll.wait(ms, &mut ev), Ok(n) if n > 0) {
            let _ = self.transport.irq_evt().read();
            self.interrupts += 1;
        }
        let st = self.read_reg(reg::INTERRUPT_STATUS);
        if st != 0 {
            self.write_reg(reg::INTERRUPT_ACK, st & (INT_VRING | INT_CONFIG));
        }
        st
    }

    /// Moves new used-ring entries of queue `q` into the completion table; returns how many.
    /// On a packed queue: the used descriptors at the driver's used position, by buffer ID.
    pub fn collect_used(&mut self, q: usize) -> Result<usize, HarnessError> {
        let Some(dq) = self.queues.get_mut(q) else { return self.collect_used_packed(q) };
        let mut used_idx: u16 = self.guest.read_obj(GuestAddress(dq.used + 2))?;
        let mut n = 0;
        loop {
            if dq.last_used == used_idx {
                // With VIRTIO_F_RING_EVENT_IDX: interrupt me on the next used entry
                // (used_event). Then look again, as Linux's `virtqueue_enable_cb` does: an entry
                // the device added before it could see the new used_event raised no interrupt.
                let used_event = GuestAddress(dq.avail + 4 + 2 * u64::from(dq.size));
                self.guest.write_obj(dq.last_used, used_event)?;
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                used_idx = self.guest.read_obj(GuestAddress(dq.used + 2))?;
                if dq.last_used == used_idx {
                    break;
                }
            }
            let slot = u64::from(dq.last_used % dq.size);
            let id: u32 = self.guest.read_obj(GuestAddress(dq.used + 4 + 8 * slot))?;
            let len: u32 = self.guest.read_obj(GuestAddress(dq.used + 8 + 8 * slot))?;
            let head = id as u16;
            // Emptied, so that a head completed twice frees nothing twice.
            if let Some(descs) = dq.chains.get_mut(usize::from(head)) {
                dq.free.extend_from_slice(descs);
                descs.clear();
            }
            // A head completed twice would be a device bug: the test sees the second insert.
            if self.done.insert((q, head), len).is_some() {
                self.done.insert((q, u16::MAX), len);
            }
            dq.last_used = dq.last_used.wrapping_add(1);
            n += 1;
        }
        Ok(n)
    }

    /// Takes the new used-ring entries of queue `q` as `(head, len)` pairs in ring order,
    /// appended to `out`, and frees their descriptors; returns how many. For drivers that
    /// track their own requests (a streaming benchmark): entries taken here never reach
    /// [`Driver::wait`] or [`Driver::wait_head`]. On a packed queue the pairs are
    /// `(buffer ID, len)`, in the order the device marked them used.
    pub fn reap(&mut self, q: usize, out: &mut Vec<(u16, u32)>) -> Result<usize, HarnessError> {
        let Some(dq) = self.queues.get_mut(q) else { return self.reap_packed(q, out) };
        let used_idx: u16 = self.guest.read_obj(GuestAddress(dq.used + 2))?;
        // The entries must be read after the index that published them.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let n = used_idx.wrapping_sub(dq.last_used);
        for _ in 0..n {
            let slot = u64::from(dq.last_used % dq.size);
            let mut e = [0u8; 8];
            self.guest.read_slice(&mut e, GuestAddress(dq.used + 4 + 8 * slot))?;
            let head = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as u16;
            // Emptied, so that a head completed twice frees nothing twice.
            if let Some(descs) = dq.chains.get_mut(usize::from(head)) {
                dq.free.extend_from_slice(descs);
                descs.clear();
            }
            out.push((head, u32::from_le_bytes([e[4], e[5], e[6], e[7]])));
            dq.last_used = dq.last_used.wrapping_add(1);
        }
        if n > 0 {
            // With VIRTIO_F_RING_EVENT_IDX: interrupt me on the next used entry (used_event).
            self.guest.write_obj(dq.last_used, GuestAddress(dq.avail + 4 + 2 * u64::from(dq.size)))?;
        }
        Ok(usize::from(n))
    }

    /// Waits until queue `q` has used entries not yet taken (see [`Driver::set_wait_poll`]).
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Result<(), HarnessError> {
        self.wait_for(timeout, |d| {
            let Some(dq) = d.queues.get(q) else { return Ok(d.has_used_packed(q)?.then_some(())) };
            let last = dq.last_used;
            Ok((d.used_idx(q)? != last).then_some(()))
        })
    }

    /// Whether queue `q` has used entries not yet taken: on a split queue, whether the used
    /// index moved past the driver's; on a packed queue, whether the descriptor at the
    /// driver's used position is marked used for its wrap counter.
    pub fn has_used(&self, q: usize) -> Result<bool, HarnessError> {
        match self.queues.get(q) {
            Some(dq) => Ok(self.used_idx(q)? != dq.last_used),
            None => self.has_used_packed(q),
        }
    }

    /// Calls `ready` until it returns a value: polls for up to the [`Driver::set_wait_poll`]
    /// time, then sleeps on the interrupt between calls; a timeout after `timeout`.
    fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut(&mut Self) -> Result<Option<T>, HarnessError>,
    ) -> Result<T, HarnessError> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            if let Some(v) = ready(self)? {
                return Ok(v);
            }
            if self.poll_interrupt(start) {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout("a used-ring entry"));
            }
            self.wait_interrupt(left.min(Duration::from_millis(50)));
        }
    }

    /// Polls for an interrupt until one is pending (acknowledges it and returns true) or the
    /// [`Driver::set_wait_poll`] time since `start` is over (returns false). Like a halted vCPU
    /// under KVM halt polling, it watches the interrupt state only (`InterruptStatus`, a word
    /// the device writes once per interrupt), never the rings, so it takes no cache line the
    /// device is writing away from it.
    fn poll_interrupt(&mut self, start: Instant) -> bool {
        while start.elapsed() < self.wait_poll {
            for _ in 0..32 {
                let st = self.read_reg(reg::INTERRUPT_STATUS);
                if st != 0 {
                    self.write_reg(reg::INTERRUPT_ACK, st & (INT_VRING | INT_CONFIG));
                    return true;
                }
                std::hint::spin_loop();
            }
        }
        false
    }

    /// The used index the device has published for queue `q`. Split queues only (a packed ring
    /// has no used index: see [`Driver::has_used`]); [`HarnessError::SplitOnly`] otherwise.
    pub fn used_idx(&self, q: usize) -> Result<u16, HarnessError> {
        let Some(dq) = self.queues.get(q) else { return Err(self.not_split(q)) };
        Ok(self.guest.read_obj(GuestAddress(dq.used + 2))?)
    }

    /// Whether some chain was completed twice (a device bug).
    pub fn saw_double_completion(&self) -> bool {
        self.done.keys().any(|&(_, h)| h == u16::MAX)
    }

    /// Makes the waits ([`Driver::wait`], [`Driver::wait_head`], [`Driver::wait_used`]) poll
    /// the used ring for up to `poll` before they sleep on the interrupt, as a halted vCPU does
    /// under KVM's halt polling (`halt_poll_ns`, 200 µs by default on x86). The default, zero,
    /// sleeps at once.
    pub fn set_wait_poll(&mut self, poll: Duration) {
        self.wait_poll = poll;
    }

    /// Waits until chain `head` of queue `q` completes; returns the length the device reported
    /// (without copying any buffer: for benchmarks that reuse their buffers).
    pub fn wait_head(&mut self, q: usize, head: u16, timeout: Duration) -> Result<u32, HarnessError> {
        self.wait_for(timeout, |d| {
            d.collect_used(q)?;
            Ok(d.done.remove(&(q, head)))
        })
    }

    /// Waits until `p` completes, then returns its writable buffers.
    pub fn wait(&mut self, p: &Pending, timeout: Duration) -> Result<Completion, HarnessError> {
        let len = self.wait_head(p.queue, p.head, timeout)?;
        let mut data = Vec::new();
        for &(a, l) in &p.in_bufs {
            let mut b = vec![0u8; l as usize];
            self.guest.read_slice(&mut b, GuestAddress(a))?;
            data.push(b);
        }
        Ok(Completion { len, data })
    }

    /// Posts, notifies and waits: one whole request.
    pub fn request(&mut self, q: usize, out: &[&[u8]], in_lens: &[u32]) -> Result<Completion, HarnessError> {
        let p = self.post(q, out, in_lens)?;
        self.kick(q)?;
        self.wait(&p, Duration::from_secs(5))
    }

    /// Waits until the device reports `DEVICE_NEEDS_RESET`.
    pub fn wait_broken(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.read_reg(reg::STATUS) & status::DEVICE_NEEDS_RESET != 0 {
                return true;
            }
            self.wait_interrupt(Duration::from_millis(20));
        }
        self.read_reg(reg::STATUS) & status::DEVICE_NEEDS_RESET != 0
    }
}
