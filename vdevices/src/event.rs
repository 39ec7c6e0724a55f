//! The event loop that runs device backends off the vCPU threads: one thread driving an
//! `event-manager` [`EventManager`] whose subscribers are the virtio transports.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

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

/// A running event loop thread. Dropping it stops the thread.
pub struct EventLoop {
    endpoint: RemoteEndpoint<Subscriber>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop thread.
    pub fn start() -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new()?;
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vdevices-events".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    if manager.run_with_timeout(100).is_err() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
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
