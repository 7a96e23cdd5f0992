//! A simulated control plane: the source of truth the caches load from.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flagcache_core::{Error, FlagKey, Version};

/// What the simulated control plane's loader returns.
pub type LoadFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = flagcache_core::Result<Option<(String, Version)>>> + Send>,
>;

/// Flags with versions, a fixed answer latency, a call counter and an off switch.
#[derive(Debug)]
pub struct Source {
    flags: Mutex<HashMap<FlagKey, (String, Version)>>,
    latency: Duration,
    calls: AtomicU64,
    down: AtomicBool,
    first_call: std::sync::OnceLock<std::time::Instant>,
}

impl Source {
    pub fn new(latency: Duration) -> Arc<Self> {
        Arc::new(Source {
            flags: Mutex::new(HashMap::new()),
            latency,
            calls: AtomicU64::new(0),
            down: AtomicBool::new(false),
            first_call: std::sync::OnceLock::new(),
        })
    }

    pub fn set(&self, key: &FlagKey, value: String, version: Version) {
        self.flags
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), (value, version));
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// When the loader was first called.
    pub fn first_call(&self) -> Option<std::time::Instant> {
        self.first_call.get().copied()
    }

    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// From now on every load fails (the control plane is down).
    pub fn go_down(&self) {
        self.down.store(true, Ordering::SeqCst);
    }

    /// The loader a `FlagCache` calls.
    pub fn loader(self: &Arc<Self>) -> impl Fn(FlagKey) -> LoadFuture + Send + Sync + 'static {
        let me = self.clone();
        move |key: FlagKey| {
            let me = me.clone();
            Box::pin(async move {
                me.calls.fetch_add(1, Ordering::SeqCst);
                let _ = me.first_call.set(std::time::Instant::now());
                tokio::time::sleep(me.latency).await;
                if me.down.load(Ordering::SeqCst) {
                    return Err(Error::loader(
                        &key,
                        std::io::Error::other("the control plane is down"),
                    ));
                }
                let flags = me.flags.lock().unwrap_or_else(PoisonError::into_inner);
                Ok(flags.get(&key).cloned())
            })
        }
    }
}
