//! Legacy PC devices: a 16550 UART (`vm-superio`) for the kernel console, and an i8042 whose
//! only job is the guest-initiated reset (`0xfe` written to the command port).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use event_manager::{EventOps, EventSet, EventSubscriber, Events};
use serde::{Deserialize, Serialize};
use vcore::{BusDevice, Snapshot, StateError};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// COM1's I/O port base.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line (GSI).
pub const COM1_GSI: u32 = 4;
/// Ports a 16550 occupies.
pub const SERIAL_PORTS: u64 = 8;
/// The i8042's data port; the command port is at `I8042_PORT + 4`.
pub const I8042_PORT: u16 = 0x60;
/// Ports the i8042 occupies (data at 0, command at 4).
pub const I8042_PORTS: u64 = 5;

/// An interrupt line as an event fd (an irqfd in a KVM VM).
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// A new line.
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqLine(EventFd::new(EFD_NONBLOCK)?))
    }
    /// The event fd (to register as an irqfd, or to wait on).
    pub fn evt(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

struct Out(Box<dyn Write + Send>);

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

type Uart = Serial<IrqLine, NoEvents, Out>;

struct SerialInner {
    uart: Uart,
    input: Option<File>,
    first_byte: Option<std::time::Instant>,
}

/// A 16550 UART on the port I/O bus. Cheap to clone (clones are one device).
#[derive(Clone)]
pub struct LegacySerial {
    inner: Arc<Mutex<SerialInner>>,
    bytes_out: Arc<AtomicU64>,
}

impl std::fmt::Debug for LegacySerial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacySerial").field("bytes_out", &self.bytes_out()).finish_non_exhaustive()
    }
}

/// Saved state of [`LegacySerial`]: the UART registers and its receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Receive FIFO.
    pub in_buffer: Vec<u8>,
    /// Bytes the guest wrote.
    pub bytes_out: u64,
}

/// What a serial port is connected to.
pub struct SerialIo {
    /// Interrupt line.
    pub irq: IrqLine,
    /// Host input (set non-blocking), if any.
    pub input: Option<OwnedFd>,
    /// Guest output.
    pub output: Box<dyn Write + Send>,
}

impl std::fmt::Debug for SerialIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialIo").field("irq", &self.irq).field("input", &self.input).finish_non_exhaustive()
    }
}

impl LegacySerial {
    /// A UART wired to `io`.
    pub fn new(io: SerialIo) -> std::io::Result<Self> {
        Self::build(io, None)
    }

    fn build(io: SerialIo, state: Option<&SerialSnapshot>) -> std::io::Result<Self> {
        let input = match io.input {
            Some(fd) => {
                crate::sys::set_nonblocking(fd.as_raw_fd())?;
                Some(File::from(fd))
            }
            None => None,
        };
        let out = Out(io.output);
        let (uart, bytes) = match state {
            None => (Serial::new(io.irq, out), 0),
            Some(s) => {
                let st = SerialState {
                    baud_divisor_low: s.baud_divisor_low,
                    baud_divisor_high: s.baud_divisor_high,
                    interrupt_enable: s.interrupt_enable,
                    interrupt_identification: s.interrupt_identification,
                    line_control: s.line_control,
                    line_status: s.line_status,
                    modem_control: s.modem_control,
                    modem_status: s.modem_status,
                    scratch: s.scratch,
                    in_buffer: s.in_buffer.clone(),
                };
                let uart = Serial::from_state(&st, io.irq, NoEvents, out)
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
                (uart, s.bytes_out)
            }
        };
        Ok(LegacySerial {
            inner: Arc::new(Mutex::new(SerialInner { uart, input, first_byte: None })),
            bytes_out: Arc::new(AtomicU64::new(bytes)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SerialInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes the guest has written to the transmit register.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }

    /// When the guest wrote its first byte, if it has.
    pub fn first_byte_at(&self) -> Option<std::time::Instant> {
        self.lock().first_byte
    }

    /// Queues `bytes` of host input into the receive FIFO; returns how many fit.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        self.lock().uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    fn pump_input(&self) {
        let mut inner = self.lock();
        let SerialInner { uart, input, .. } = &mut *inner;
        let Some(input) = input else { return };
        loop {
            let room = uart.fifo_capacity();
            if room == 0 {
                return;
            }
            let mut buf = [0u8; 64];
            match input.read(&mut buf[..room.min(64)]) {
                Ok(0) => return,
                Ok(n) => {
                    let _ = uart.enqueue_raw_bytes(&buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

impl BusDevice for LegacySerial {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let v = self.lock().uart.read(offset as u8);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
        if offset == 0 {
            // The guest drained a byte: there may be room for more input.
            self.pump_input();
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let mut inner = self.lock();
        // Writes to THR (offset 0 with DLAB clear) are output; count them for the embedder.
        let lcr_dlab = inner.uart.state().line_control & 0x80 != 0;
        let _ = inner.uart.write(offset as u8, v);
        if offset == 0 && !lcr_dlab {
            self.bytes_out.fetch_add(1, Ordering::Relaxed);
            if inner.first_byte.is_none() {
                inner.first_byte = Some(std::time::Instant::now());
            }
        }
    }
}

impl EventSubscriber for LegacySerial {
    fn init(&self, ops: &mut EventOps) {
        let fd = self.lock().input.as_ref().map(|f| f.as_raw_fd());
        if let Some(fd) = fd {
            let _ = ops.add(Events::new_raw(fd, EventSet::IN | EventSet::EDGE_TRIGGERED));
        }
        self.pump_input();
    }
    fn process(&self, _events: Events, _ops: &mut EventOps) {
        self.pump_input();
    }
}

impl Snapshot for LegacySerial {
    type State = SerialSnapshot;
    type Args = SerialIo;
    fn save(&self) -> SerialSnapshot {
        let s = self.lock().uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            bytes_out: self.bytes_out(),
        }
    }
    fn restore(io: SerialIo, s: &SerialSnapshot) -> Result<Self, StateError> {
        Self::build(io, Some(s))
            .map_err(|e| StateError::Device { device: "16550".into(), reason: e.to_string() })
    }
}

/// What the i8042 reports: the guest asked for a reset.
#[derive(Debug, Default)]
pub struct ResetFlag {
    requested: AtomicBool,
    count: AtomicU64,
    waiters: (Mutex<()>, std::sync::Condvar),
}

impl ResetFlag {
    /// Whether the guest has asked for a reset.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
    /// How many reset requests arrived.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
    /// Waits up to `timeout` for a reset request.
    pub fn wait(&self, timeout: Duration) -> bool {
        let (m, cv) = &self.waiters;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let _g = cv.wait_timeout_while(g, timeout, |_| !self.requested()).unwrap_or_else(|e| e.into_inner());
        self.requested()
    }
}

/// The trigger the i8042 pulls.
#[derive(Debug, Clone)]
pub struct ResetTrigger(Arc<ResetFlag>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        self.0.requested.store(true, Ordering::Release);
        let (m, cv) = &self.0.waiters;
        let _g = m.lock().unwrap_or_else(|e| e.into_inner());
        cv.notify_all();
        Ok(())
    }
}

/// An i8042 on the port I/O bus at [`I8042_PORT`] (5 ports): writing `0xfe` to the command port
/// sets the [`ResetFlag`] the embedder watches.
#[derive(Debug)]
pub struct I8042 {
    dev: Mutex<I8042Device<ResetTrigger>>,
    flag: Arc<ResetFlag>,
}

impl I8042 {
    /// A new controller.
    pub fn new() -> Self {
        let flag = Arc::new(ResetFlag::default());
        I8042 { dev: Mutex::new(I8042Device::new(ResetTrigger(flag.clone()))), flag }
    }
    /// The reset flag.
    pub fn reset_flag(&self) -> Arc<ResetFlag> {
        self.flag.clone()
    }
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let v = self.dev.lock().unwrap_or_else(|e| e.into_inner()).read(offset as u8);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            let _ = self.dev.lock().unwrap_or_else(|e| e.into_inner()).write(offset as u8, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_input_and_state() {
        let sink = Sink::default();
        let (host, dev) = std::os::unix::net::UnixStream::pair().unwrap();
        let irq = IrqLine::new().unwrap();
        let s = LegacySerial::new(SerialIo { irq, input: Some(dev.into()), output: Box::new(sink.clone()) })
            .unwrap();
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert_eq!(s.bytes_out(), 2);
        assert!(s.first_byte_at().is_some());
        // Enable the receive interrupt, then type: the byte arrives, the line is raised.
        s.write(1, &[1]);
        (&host).write_all(b"k").unwrap();
        s.pump_input();
        let mut b = [0u8];
        s.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data ready");
        let saved = s.save();
        assert_eq!(saved.in_buffer, b"k");
        s.read(0, &mut b);
        assert_eq!(b[0], b'k');
        let restored = LegacySerial::restore(
            SerialIo { irq: IrqLine::new().unwrap(), input: None, output: Box::new(std::io::sink()) },
            &saved,
        )
        .unwrap();
        restored.read(0, &mut b);
        assert_eq!(b[0], b'k');
        assert_eq!(restored.bytes_out(), 2);
        assert_eq!(restored.save().interrupt_enable, 1);
    }

    #[test]
    fn i8042_reset() {
        let k = I8042::new();
        let flag = k.reset_flag();
        k.write(0, &[0xfe]); // data port: not a reset
        assert!(!flag.requested());
        k.write(4, &[0xfe]);
        assert!(flag.wait(Duration::from_secs(1)));
        assert_eq!(flag.count(), 1);
    }
}
