//! The event loop that runs device backends off the vCPU threads: one thread driving an
//! `event-manager` [`EventManager`] whose subscribers are the virtio transports.
//!
//! After handling events the loop keeps polling (non-blocking, yielding) for a short while before
//! it sleeps, like QEMU's iothread `poll-max-ns`: a driver that notifies again soon after a
//! completion (the usual pattern under load) then finds the loop awake, instead of paying a
//! wake-up of a sleeping thread, which on an idle (virtualized) host costs tens of microseconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventSubscriber, RemoteEndpoint, SubscriberId, SubscriberOps};

/// A subscriber of the event loop.
pub type Subscriber = Arc<dyn EventSubscriber + Send + Sync>;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// event-manager failed.
    #[error("event manager: {0}")]
    Manager(#[from] event_manager::Error),
    /// The loop thread could not be started.
    #[error("spawning the event loop thread")]
    Spawn(#[source] std::io::Error),
}

/// How long the loop polls after its last event before sleeping, by default.
pub const DEFAULT_POLL: Duration = Duration::from_micros(50);

/// A running event loop thread. Dropping it stops the thread.
pub struct EventLoop {
    endpoint: RemoteEndpoint<Subscriber>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop thread, polling for [`DEFAULT_POLL`] after each event.
    pub fn start() -> Result<Self, EventLoopError> {
        Self::start_polling(DEFAULT_POLL)
    }

    /// Starts the loop thread, polling for `poll` after each event before it sleeps
    /// (`Duration::ZERO`: sleep at once).
    pub fn start_polling(poll: Duration) -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new()?;
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vdevices-events".into())
            .spawn(move || {
                let mut last_event: Option<Instant> = None;
                while !flag.load(Ordering::Acquire) {
                    let polling = last_event.is_some_and(|t| t.elapsed() < poll);
                    match manager.run_with_timeout(if polling { 0 } else { 100 }) {
                        Ok(0) if polling => std::thread::yield_now(),
                        Ok(0) => last_event = None,
                        Ok(_) => last_event = Some(Instant::now()),
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(EventLoop { endpoint, stop, thread: Some(thread) })
    }

    /// Adds a subscriber (its `init` runs on the loop thread before this returns).
    pub fn add(&self, subscriber: Subscriber) -> Result<SubscriberId, EventLoopError> {
        let id =
            self.endpoint.call_blocking(move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| {
                Ok::<_, event_manager::Error>(ops.add_subscriber(subscriber))
            })?;
        Ok(id)
    }

    /// Removes a subscriber: the loop stops watching its fds.
    pub fn remove(&self, id: SubscriberId) -> Result<(), EventLoopError> {
        self.endpoint.call_blocking(move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| {
            ops.remove_subscriber(id).map(|_| ())
        })?;
        Ok(())
    }
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").field("running", &!self.stop.load(Ordering::Relaxed)).finish()
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.endpoint.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
