//! The VM: KVM VM fd, irqchip and PIT, memory slots, buses and vCPU threads.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY, kvm_dirty_gfn, kvm_enable_cap, kvm_mp_state, kvm_pit_config,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::boot::{self, BootError, BootInfo, BootPayload};
use crate::bus::Bus;
use crate::config::{self, ConfigError, DirtyTracking, VmConfig};
use crate::cpu::{self, CpuError};
use crate::memory::{self, GuestMemory, MemSlot, MemoryError};
use crate::state::{self, StateError, VmSnapshot};
use crate::vcpu::{self, Control, EventQueue, VcpuRunner, VcpuShared, VcpuStats, VmEvent};

/// Where KVM's TSS pages go (three pages just below the identity-map page, under 4 GiB).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation on VMX.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Errors of building and driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("opening /dev/kvm")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A VM-level KVM call failed.
    #[error("{op}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A memory slot could not be (re)registered.
    #[error("registering memory slot {slot} at {guest_addr:#x}")]
    Slot {
        /// The slot.
        slot: u32,
        /// Its guest address.
        guest_addr: u64,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// No such memory slot.
    #[error("no memory slot {0}")]
    NoSuchSlot(u32),
    /// A vCPU could not be created or set up.
    #[error("{op} on vCPU {vcpu}")]
    Vcpu {
        /// The vCPU.
        vcpu: u8,
        /// The operation.
        op: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// CPU model setup failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// The boot payload could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Saving or restoring state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The operation is not allowed in the VM's current run state.
    #[error("cannot {op} a VM that is {state:?}")]
    BadRunState {
        /// The operation.
        op: &'static str,
        /// The VM's state.
        state: RunState,
    },
    /// A vCPU thread could not be spawned, or the kick signal installed.
    #[error("starting vCPU threads: {0}")]
    Thread(String),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Built; vCPU threads not started (state can be restored).
    Created,
    /// vCPUs running.
    Running,
    /// Every vCPU out of `KVM_RUN` and parked.
    Paused,
    /// vCPU threads joined; the VM cannot run again.
    Stopped,
}

/// Builds a [`Vm`] from a [`VmConfig`] and an optional boot payload.
#[derive(Debug)]
pub struct VmBuilder {
    config: VmConfig,
    payload: Option<Box<dyn BootPayload>>,
}

impl VmBuilder {
    /// A builder for `config`.
    pub fn new(config: VmConfig) -> Self {
        VmBuilder { config, payload: None }
    }

    /// Loads `payload` (a built-in guest or a Linux kernel) and sets the vCPUs to start it.
    pub fn payload(mut self, payload: impl BootPayload + 'static) -> Self {
        self.payload = Some(Box::new(payload));
        self
    }

    /// Boots a Linux kernel (ELF vmlinux or bzImage) with `cmdline` and an optional initramfs.
    pub fn kernel(
        self,
        kernel: impl Into<std::path::PathBuf>,
        cmdline: &str,
        initramfs: Option<std::path::PathBuf>,
    ) -> Self {
        self.payload(boot::linux::LinuxBoot {
            kernel: kernel.into(),
            initramfs,
            cmdline: cmdline.to_string(),
        })
    }

    /// Creates the VM: validates the config, then KVM VM, irqchip, PIT, memory slots, dirty
    /// tracking, vCPUs with CPUID and boot MSRs, and loads the payload. vCPUs start on
    /// [`Vm::start`].
    pub fn build(self) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
        self.config.validate(kvm.get_max_vcpus())?;
        let ranges = self.config.ram_ranges();
        config::check_ranges(&ranges)?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd.set_tss_address(KVM_TSS_ADDR as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let manual_protect = enable_dirty_tracking(&vm_fd, self.config.dirty_tracking)?;

        let memory = memory::create_guest_memory(&ranges)?;
        if self.config.huge_pages {
            memory::advise_huge_pages(&memory)?;
        }
        if self.config.prealloc {
            memory::prealloc(&memory)?;
        }
        let slots = memory::slots_of(&memory);
        for s in &slots {
            crate::sys::set_memory_slot(&vm_fd, &memory, s).map_err(|source| VmError::Slot {
                slot: s.slot,
                guest_addr: s.guest_addr,
                source,
            })?;
        }

        let supported = cpu::supported_cpuid(&kvm)?;
        let count = u8::try_from(self.config.vcpus).unwrap_or(u8::MAX); // validated: at most 255
        let mut vcpus = Vec::with_capacity(usize::from(count));
        for id in 0..count {
            let fd = vm_fd.create_vcpu(u64::from(id)).map_err(|source| VmError::Vcpu {
                vcpu: id,
                op: "KVM_CREATE_VCPU",
                source,
            })?;
            fd.set_cpuid2(&cpu::vcpu_cpuid(&supported, id))
                .map_err(|source| CpuError::SetCpuid { vcpu: id, source })?;
            cpu::set_msrs_checked(&fd, id, &cpu::boot_msrs())?;
            vcpus.push(Arc::new(VcpuShared::new(id, fd)));
        }
        let (tsc_khz, msr_indices) = {
            let fd0 = vcpus[0].fd();
            (fd0.get_tsc_khz().unwrap_or(0), cpu::saveable_msrs(&kvm, &fd0))
        };
        let mem_top = ranges.iter().map(|r| r.end()).max().unwrap_or(0);
        let vm = Vm {
            ctl: Arc::new(Control::new(vcpus.len())),
            vcpus,
            threads: Mutex::new(Vec::new()),
            throttle_thread: Mutex::new(None),
            run_state: Mutex::new(RunState::Created),
            events: Arc::new(EventQueue::default()),
            pio: Bus::new(),
            mmio: Bus::new(),
            slots: Mutex::new(slots),
            vm_fd,
            memory,
            kvm,
            config: self.config,
            manual_protect,
            tsc_khz,
            msr_indices,
        };
        if let Some(payload) = &self.payload {
            let info = BootInfo { mem_top, tsc_hz: u64::from(tsc_khz) * 1000, vcpus: count };
            let entry = payload.load(&vm.memory, &info)?;
            vm.set_entry(&entry)?;
        }
        Ok(vm)
    }
}

/// Enables the configured KVM dirty tracking; returns whether manual protection is on.
fn enable_dirty_tracking(vm: &VmFd, mode: DirtyTracking) -> Result<bool, VmError> {
    match mode {
        DirtyTracking::None => Ok(false),
        DirtyTracking::Log => {
            let caps = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
            if caps <= 0 {
                return Ok(false);
            }
            let wanted = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
            let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
            cap.args[0] = u64::from(caps as u32 & wanted);
            vm.enable_cap(&cap).map_err(kvm_err("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"))?;
            Ok(true)
        }
        DirtyTracking::Ring { entries } => {
            let acq_rel = vm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)) > 0;
            let which = if acq_rel { KVM_CAP_DIRTY_LOG_RING_ACQ_REL } else { KVM_CAP_DIRTY_LOG_RING };
            let mut cap = kvm_enable_cap { cap: which, ..Default::default() };
            cap.args[0] = u64::from(entries) * std::mem::size_of::<kvm_dirty_gfn>() as u64;
            vm.enable_cap(&cap).map_err(kvm_err("enabling KVM_CAP_DIRTY_LOG_RING"))?;
            Ok(false)
        }
    }
}

/// One KVM virtual machine on this host.
///
/// All methods take `&self`, so a `Vm` can be shared (`Arc<Vm>`) between the thread that runs
/// it and, say, a migration engine that pauses it from another thread.
pub struct Vm {
    // Field order is drop order: vCPUs (threads joined in `Drop`), then the VM fd, then memory.
    vcpus: Vec<Arc<VcpuShared>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    throttle_thread: Mutex<Option<JoinHandle<()>>>,
    ctl: Arc<Control>,
    run_state: Mutex<RunState>,
    events: Arc<EventQueue>,
    pio: Bus,
    mmio: Bus,
    slots: Mutex<Vec<MemSlot>>,
    vm_fd: VmFd,
    memory: GuestMemory,
    kvm: Kvm,
    config: VmConfig,
    manual_protect: bool,
    tsc_khz: u32,
    msr_indices: &'static [u32],
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("state", &self.run_state())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vm {
    fn set_entry(&self, entry: &boot::EntryPoint) -> Result<(), VmError> {
        for v in &self.vcpus {
            let fd = v.fd();
            let err = |op| move |source| VmError::Vcpu { vcpu: v.id, op, source };
            let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
            fd.set_sregs(&boot::long_mode_sregs(sregs, entry.cpl)).map_err(err("KVM_SET_SREGS"))?;
            fd.set_regs(&boot::entry_regs(entry, v.id)).map_err(err("KVM_SET_REGS"))?;
            let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
            fd.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;
            if entry.all_vcpus_run || v.id == 0 {
                let mp = kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE };
                fd.set_mp_state(mp).map_err(err("KVM_SET_MP_STATE"))?;
            }
        }
        Ok(())
    }

    /// The configuration the VM was built with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory (writes through it are tracked in the regions' dirty bitmaps).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The port I/O bus.
    pub fn pio_bus(&self) -> &Bus {
        &self.pio
    }

    /// The MMIO bus (addresses outside guest RAM).
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }

    /// The KVM VM fd, for dirty-log and interrupt plumbing in other crates.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// The `/dev/kvm` handle this VM was created from.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpus.len() as u8
    }

    /// Counters of vCPU `id`.
    pub fn vcpu_stats(&self, id: u8) -> Option<&VcpuStats> {
        self.vcpus.get(usize::from(id)).map(|v| &v.stats)
    }

    /// The raw fd of vCPU `id`, valid while the `Vm` lives: for mmapping its KVM dirty ring
    /// (`KVM_DIRTY_LOG_PAGE_OFFSET`). Do not close it or issue vCPU ioctls on it.
    pub fn vcpu_raw_fd(&self, id: u8) -> Option<std::os::fd::RawFd> {
        self.vcpus.get(usize::from(id)).map(|v| v.raw_fd)
    }

    /// Entries per vCPU dirty ring, when the VM was built with [`DirtyTracking::Ring`].
    pub fn dirty_ring_entries(&self) -> Option<u32> {
        match self.config.dirty_tracking {
            DirtyTracking::Ring { entries } => Some(entries),
            _ => None,
        }
    }

    /// Guest TSC frequency in kHz (0 if the host does not report it).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Whether `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` is enabled: `KVM_GET_DIRTY_LOG` then neither
    /// clears nor write-protects, and the caller clears with `KVM_CLEAR_DIRTY_LOG`.
    pub fn dirty_log_manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// The memory slots, with their current dirty-logging flag.
    pub fn slots(&self) -> Vec<MemSlot> {
        lock(&self.slots).clone()
    }

    /// Switches KVM dirty logging (`KVM_MEM_LOG_DIRTY_PAGES`) of `slot` on or off, at any time.
    pub fn set_dirty_logging(&self, slot: u32, on: bool) -> Result<(), VmError> {
        let mut slots = lock(&self.slots);
        let s = slots.get_mut(slot as usize).ok_or(VmError::NoSuchSlot(slot))?;
        let mut new = *s;
        new.dirty_log = on;
        crate::sys::set_memory_slot(&self.vm_fd, &self.memory, &new).map_err(|source| VmError::Slot {
            slot,
            guest_addr: new.guest_addr,
            source,
        })?;
        *s = new;
        Ok(())
    }

    /// Reads KVM's dirty bitmap of `slot` (`KVM_GET_DIRTY_LOG`): one bit per page, 64 per word.
    pub fn dirty_log(&self, slot: u32) -> Result<Vec<u64>, VmError> {
        let s = lock(&self.slots).get(slot as usize).copied().ok_or(VmError::NoSuchSlot(slot))?;
        self.vm_fd.get_dirty_log(slot, s.size as usize).map_err(kvm_err("KVM_GET_DIRTY_LOG"))
    }

    /// The VM's run state.
    pub fn run_state(&self) -> RunState {
        *lock(&self.run_state)
    }

    fn expect_state(&self, op: &'static str, ok: &[RunState]) -> Result<MutexGuard<'_, RunState>, VmError> {
        let st = lock(&self.run_state);
        if ok.contains(&st) { Ok(st) } else { Err(VmError::BadRunState { op, state: *st }) }
    }

    /// Starts one thread per vCPU.
    pub fn start(&self) -> Result<(), VmError> {
        let mut st = self.expect_state("start", &[RunState::Created])?;
        crate::sys::install_kick_handler()
            .map_err(|e| VmError::Thread(format!("kick signal handler: {e}")))?;
        self.ctl.started(self.vcpus.len());
        let mut threads = lock(&self.threads);
        for v in &self.vcpus {
            let runner = VcpuRunner {
                vcpu: Arc::clone(v),
                ctl: Arc::clone(&self.ctl),
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                events: Arc::clone(&self.events),
                ring_full: std::cell::Cell::new(false),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", v.id))
                .spawn(move || runner.run())
                .map_err(|e| VmError::Thread(e.to_string()))?;
            *lock(&v.thread) = Some(std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle));
            threads.push(handle);
        }
        *st = RunState::Running;
        Ok(())
    }

    /// Stops every vCPU and returns once all are out of `KVM_RUN` and parked.
    pub fn pause(&self) -> Result<(), VmError> {
        let mut st = self.expect_state("pause", &[RunState::Running, RunState::Paused])?;
        self.ctl.pause(&self.vcpus);
        *st = RunState::Paused;
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), VmError> {
        let mut st = self.expect_state("resume", &[RunState::Paused])?;
        self.ctl.resume();
        *st = RunState::Running;
        Ok(())
    }

    /// Stops and joins every vCPU thread; the VM cannot run again. Idempotent.
    pub fn shutdown(&self) {
        let mut st = lock(&self.run_state);
        if *st == RunState::Stopped {
            return;
        }
        self.ctl.throttle_percent.store(0, Ordering::Relaxed);
        self.ctl.stop(&self.vcpus);
        if let Some(t) = lock(&self.throttle_thread).take() {
            let _ = t.join();
        }
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        *st = RunState::Stopped;
    }

    /// Installs (or, with `None`, removes) the handler a vCPU thread calls when its dirty ring is
    /// full, so the vCPU need not wait for the next harvest (see [`DirtyRingFullHandler`](crate::DirtyRingFullHandler)).
    /// Dirty-ring trackers install one while they track.
    pub fn set_dirty_ring_full_handler(&self, handler: Option<Arc<crate::DirtyRingFullHandler>>) {
        *lock(&self.ctl.ring_full_handler.0) = handler;
    }

    /// Makes every vCPU sleep `percent` % (0 to 99) of each 10 ms period: auto-converge for
    /// live migration. 0 removes the throttle.
    pub fn set_throttle(&self, percent: u8) {
        let percent = percent.min(99);
        let previous = self.ctl.throttle_percent.swap(percent, Ordering::Relaxed);
        let mut slot = lock(&self.throttle_thread);
        if percent == 0 || (previous > 0 && slot.as_ref().is_some_and(|t| !t.is_finished())) {
            return;
        }
        if let Some(old) = slot.take() {
            let _ = old.join();
        }
        let (ctl, vcpus) = (Arc::clone(&self.ctl), self.vcpus.clone());
        *slot = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || vcpu::throttle_loop(ctl, vcpus))
            .ok();
    }

    /// The current throttle in percent.
    pub fn throttle(&self) -> u8 {
        self.ctl.throttle_percent.load(Ordering::Relaxed)
    }

    /// The next event from the vCPUs, waiting up to `timeout`.
    pub fn next_event(&self, timeout: Duration) -> Option<VmEvent> {
        self.events.pop(timeout)
    }

    /// Saves vCPU and VM state; the VM must be paused or not yet started.
    pub fn save_state(&self) -> Result<VmSnapshot, VmError> {
        let _st = self.expect_state("save the state of", &[RunState::Created, RunState::Paused])?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(state::save_vcpu(&self.vm_fd, &v.fd(), v.id, self.msr_indices)?);
        }
        Ok(VmSnapshot { config: self.config.clone(), vm: state::save_vm(&self.vm_fd)?, vcpus })
    }

    /// Restores vCPU and VM state saved from a VM with the same memory layout and vCPU count;
    /// the VM must be paused or not yet started. Guest memory is restored separately.
    pub fn restore_state(&self, snap: &VmSnapshot) -> Result<(), VmError> {
        let _st = self.expect_state("restore state into", &[RunState::Created, RunState::Paused])?;
        let mismatch = |what, saved: String, here: String| StateError::Mismatch { what, saved, here };
        if snap.vcpus.len() != self.vcpus.len() {
            return Err(
                mismatch("vCPU count", snap.vcpus.len().to_string(), self.vcpus.len().to_string()).into()
            );
        }
        if snap.config.ram_ranges() != self.config.ram_ranges() {
            return Err(mismatch(
                "memory size (MiB)",
                snap.config.mem_mib.to_string(),
                self.config.mem_mib.to_string(),
            )
            .into());
        }
        for (i, s) in snap.vcpus.iter().enumerate() {
            if usize::from(s.id) != i {
                return Err(mismatch("vCPU id", s.id.to_string(), i.to_string()).into());
            }
        }
        state::restore_vm(&self.vm_fd, &snap.vm)?;
        for (v, s) in self.vcpus.iter().zip(&snap.vcpus) {
            state::restore_vcpu(&self.vm_fd, &v.fd(), s)?;
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
