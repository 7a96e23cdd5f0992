//! The cross-process stampede lock ([`RedisLock`]): its keys, taking and releasing
//! it, the absence marker its holder leaves, and waking its waiters on a release.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flagcache_core::{
    BoxFuture, Coalesced, Coalescer, Entry, FlagKey, FlagStore, Lease, LoadOutcome, ReleaseLease,
    Result, Turn,
};
use futures_util::StreamExt;
use redis::{Script, Value};
use tokio::sync::Notify;

use crate::connection::answers_ping;
use crate::{scripts, KeyLayout, RedisStore};

/// The Redis keys of one store's stampede locks, all in the cluster slot of the flag
/// they guard (see [`KeyLayout`]): a flag's lock, and the marker its holder leaves when
/// the source has no such flag; and the channel releases are announced on,
/// `<namespace>:lock:released`.
#[derive(Debug)]
pub(crate) struct LockKeys {
    layout: KeyLayout,
    release_channel: String,
}

impl LockKeys {
    pub(crate) fn new(namespace: &str, layout: KeyLayout) -> Self {
        LockKeys {
            layout,
            release_channel: format!("{namespace}:lock:released"),
        }
    }

    /// The key of `key`'s lock: in the flag's slot where a key can be (a lock alone
    /// needs no slot of its own kind: it is taken with the fence only when the flag has
    /// one, and both then share the slot).
    pub(crate) fn lock(&self, key: &FlagKey) -> String {
        self.layout
            .companion("lock", key)
            .unwrap_or_else(|| format!("{}:lock", self.layout.key(key)))
    }

    /// The key of `key`'s absence marker; `None` when no key shares the flag's slot
    /// (see [`KeyLayout`]). Such keys get no marker.
    pub(crate) fn absent(&self, key: &FlagKey) -> Option<String> {
        self.layout.companion("absent", key)
    }

    /// The channel lock holders publish a released lock's key on.
    pub(crate) fn release_channel(&self) -> &str {
        &self.release_channel
    }
}

/// Cross-process stampede protection: when many replicas miss the same key at once,
/// one takes `SET <namespace>:lock:{<key>} <random token> NX PX <ttl>` and loads from
/// the source; the others wait for the lock's release and then read the value from
/// L2. The holder announces the release over pub/sub (one subscription per
/// `RedisLock`, opened when it first waits), so waiters wake within a round trip;
/// they also poll, in case the announcement is lost. When the source has no such
/// flag, the holder leaves a short-lived marker that tells the waiters so. If the
/// lock is released or expires with neither a value nor a marker (its holder died,
/// say), a waiter takes it over; a waiter that has waited twice the lock's TTL loads
/// by itself. The holder releases the lock with a compare-and-delete script, so it
/// never deletes a lock another process took over.
///
/// If Redis cannot be asked, `acquire` hands out an unguarded lease (the load runs
/// without the lock): slower for the source, never broken for the caller. A holder that
/// panics or is dropped mid-load releases the lock as it unwinds.
///
/// ```no_run
/// # async fn demo(store: flagcache::redis::RedisStore) -> flagcache::Result<()> {
/// use flagcache::{FlagCache, FlagKey, Version};
/// use flagcache::redis::RedisLock;
///
/// let loader = |_k: FlagKey| async { Ok(Some((true, Version::new(1)))) };
/// let cache = FlagCache::<bool>::builder(store.clone(), loader)
///     .coalescer(RedisLock::new(&store))
///     .build()
///     .await?;
/// # let _ = cache; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisLock {
    store: RedisStore,
    ttl: Duration,
    poll: Duration,
    /// Takes the lock and reads the fence.
    take: Arc<Script>,
    release: Arc<Script>,
    release_plain: Arc<Script>,
    releases: Arc<Releases>,
}

impl fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock")
            .field("ttl", &self.ttl)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl RedisLock {
    /// A lock over `store`'s keys, with a 10 s TTL (above `FlagCache`'s default loader
    /// timeout plus an L2 write) and 20 ms polling.
    pub fn new(store: &RedisStore) -> Self {
        RedisLock {
            store: store.clone(),
            ttl: Duration::from_secs(10),
            poll: Duration::from_millis(20),
            take: Arc::new(scripts::lock()),
            release: Arc::new(scripts::release()),
            release_plain: Arc::new(scripts::release_plain()),
            releases: Arc::new(Releases {
                store: store.clone(),
                waiting: Mutex::default(),
                listener: Mutex::default(),
                idle: Notify::new(),
            }),
        }
    }

    /// How long a lock lives (and so how long waiters wait for a holder that died):
    /// longer than a load and its L2 write take. Default 10 s.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// How often waiters look for the holder's value (jittered ±50 %) when no release
    /// announcement woke them. Default 20 ms.
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(1));
        self
    }

    /// Takes `lock` with `token` if it is free: `Some(fence)` — the key's fence at
    /// that moment, which the release compares — or `None` when another holds it.
    async fn try_lock(&self, key: &FlagKey, lock: &str, token: &str) -> Result<Option<Vec<u8>>> {
        let ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut inv = self.take.prepare_invoke();
        inv.key(lock).arg(token).arg(ms);
        if let Some(fence) = self.store.fence_key(key) {
            inv.key(fence);
        }
        match self.store.connection().script("lock", inv).await? {
            Value::Nil => Ok(None),
            Value::BulkString(fence) => Ok(Some(fence)),
            Value::Okay | Value::SimpleString(_) => Ok(Some(Vec::new())),
            other => Err(flagcache_core::Error::corrupt(format!(
                "unexpected lock reply {other:?}"
            ))),
        }
    }

    async fn held(&self, lock: &str) -> Result<bool> {
        let n: i64 = self
            .store
            .connection()
            .query("lock", redis::cmd("EXISTS").arg(lock))
            .await?;
        Ok(n > 0)
    }

    /// Releases `lock` if still held with `token`, announcing it; `absent`: the
    /// source has no such flag, which waiters learn from a short-lived marker.
    async fn release(&self, key: &FlagKey, lock: &str, token: &str, fence: &[u8], absent: bool) {
        let keys = self.store.lock_keys();
        let inv = match keys.absent(key) {
            None => {
                let mut inv = self.release_plain.prepare_invoke();
                inv.key(lock).arg(token).arg(keys.release_channel());
                inv
            }
            Some(marker) => {
                // Long enough for this round's waiters to read it, and no longer: a
                // flag created meanwhile is then found by the next load.
                let marker_ms = if absent {
                    let ms = (self.poll * 4).max(Duration::from_secs(1)).as_millis();
                    u64::try_from(ms).unwrap_or(u64::MAX).to_string()
                } else {
                    String::new()
                };
                let mut inv = self.release.prepare_invoke();
                inv.key(lock)
                    .key(marker)
                    // A key with a marker has a fence: both share the lock's slot.
                    .key(self.store.fence_key(key).unwrap_or_default())
                    .arg(token)
                    .arg(keys.release_channel())
                    .arg(marker_ms)
                    .arg(fence);
                inv
            }
        };
        if let Err(e) = self.store.connection().script("unlock", inv).await {
            // The lock expires by itself.
            tracing::debug!(error = %e, "lock release failed");
        }
    }

    /// `key`'s entry, and whether a lock holder marked it absent: one round trip.
    async fn entry_or_absent(&self, key: &FlagKey) -> Result<(Option<Entry>, bool)> {
        let Some(marker) = self.store.lock_keys().absent(key) else {
            return Ok((self.store.get(key).await?, false));
        };
        let mut cmd = redis::cmd("MGET");
        cmd.arg(self.store.key_arg(key)).arg(marker);
        let raw: Vec<Option<Vec<u8>>> = self.store.connection().query("get", &cmd).await?;
        let mut raw = raw.into_iter();
        let entry = raw
            .next()
            .flatten()
            .map(|b| self.store.decode(key, b))
            .transpose()?;
        Ok((entry, raw.next().flatten().is_some()))
    }
}

#[async_trait]
impl Coalescer for RedisLock {
    /// Takes the lock, or waits for its holder's release and answers with what the
    /// holder stored — or, when the holder found that the source has no such flag,
    /// with [`Coalesced::Absent`] from the marker it left, instead of each waiter
    /// taking the lock in turn to ask the source again.
    async fn acquire(&self, key: &FlagKey) -> Result<Turn> {
        let lock = self.store.lock_keys().lock(key);
        let watch = self.releases.watch(&lock);
        let give_up = Instant::now() + self.ttl * 2;
        // Armed before each look at the lock, so a release right after it still wakes
        // this waiter. An announcement only cuts the wait short: it may be a late one
        // from an earlier holder, so the lock is still looked at before L2 is read.
        let released = watch.notify().notified();
        let mut released = std::pin::pin!(released);
        loop {
            released.as_mut().enable();
            let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            match self.try_lock(key, &lock, &token).await {
                Ok(Some(fence)) => {
                    return Ok(Turn::Load(Lease::new(HeldLock {
                        lock: self.clone(),
                        key: key.clone(),
                        lock_key: lock.clone(),
                        token,
                        fence,
                    })));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%key, error = %e, "stampede lock unavailable; loading unguarded");
                    return Ok(Turn::Load(Lease::unguarded()));
                }
            }
            // Someone else is loading. Wait until they release the lock, then read L2
            // once: what was there before (possibly the very value that missed, e.g. an
            // older version) must not be mistaken for theirs.
            loop {
                let pause = self.poll.mul_f64(0.5 + fastrand::f64());
                tokio::select! {
                    () = released.as_mut() => {}
                    () = tokio::time::sleep(pause) => {}
                }
                released.set(watch.notify().notified());
                released.as_mut().enable();
                if Instant::now() > give_up {
                    tracing::warn!(%key, "waited twice the lock's TTL; loading");
                    return Ok(Turn::Load(Lease::unguarded()));
                }
                if self.held(&lock).await.unwrap_or(false) {
                    continue;
                }
                match self.entry_or_absent(key).await {
                    Ok((Some(entry), _)) => {
                        return Ok(Turn::Answered(Coalesced::Fresh(Some(entry))))
                    }
                    Ok((None, true)) => return Ok(Turn::Answered(Coalesced::Absent)),
                    _ => {}
                }
                break; // released or expired without a value: try to take it over
            }
        }
    }
}

/// A held lock, as a [`Lease`]: released with the compare-and-delete script, leaving
/// the absence marker when the source has no such flag.
struct HeldLock {
    lock: RedisLock,
    key: FlagKey,
    lock_key: String,
    token: String,
    /// The key's fence when the lock was taken.
    fence: Vec<u8>,
}

impl ReleaseLease for HeldLock {
    fn release(self: Box<Self>, outcome: LoadOutcome) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let absent = matches!(outcome, LoadOutcome::Absent);
            self.lock
                .release(&self.key, &self.lock_key, &self.token, &self.fence, absent)
                .await;
        })
    }
}

/// The locks this process waits on, woken by the release announcements a listener
/// task hears on the store's release channel.
struct Releases {
    store: RedisStore,
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
    listener: Mutex<Listener>,
    /// Never notified: what a `Watch` hands out once withdrawn.
    idle: Notify,
}

#[derive(Default)]
struct Listener {
    /// Ends the listener when the `RedisLock` (every clone) is dropped.
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: bool,
    failed_at: Option<Instant>,
    /// Which of the store's nodes to subscribe on next: rotates after a failure.
    attempt: usize,
}

/// A waiter's interest in one lock's release; withdrawn when dropped.
struct Watch<'a> {
    releases: &'a Releases,
    lock: &'a str,
    notify: Option<Arc<Notify>>,
}

impl Watch<'_> {
    fn notify(&self) -> &Notify {
        // Set from creation until drop.
        self.notify.as_deref().unwrap_or(&self.releases.idle)
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut waiting = self.releases.waiting();
        // Released under the lock that every clone is taken under: a count of one
        // left means the map's, and nobody waits on this lock any more.
        drop(self.notify.take());
        if waiting
            .get(self.lock)
            .is_some_and(|n| Arc::strong_count(n) == 1)
        {
            waiting.remove(self.lock);
        }
    }
}

impl Releases {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers interest in `lock`'s release, starting the listener if none runs.
    fn watch<'a>(self: &'a Arc<Self>, lock: &'a str) -> Watch<'a> {
        self.listen();
        let notify = self.waiting().entry(lock.to_string()).or_default().clone();
        Watch {
            releases: self,
            lock,
            notify: Some(notify),
        }
    }

    /// Starts the listener unless it runs, or failed less than a second ago (waiters
    /// then poll).
    fn listen(self: &Arc<Self>) {
        let mut l = self.listener.lock().unwrap_or_else(PoisonError::into_inner);
        if l.running
            || l.failed_at
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        l._stop = Some(stop_tx);
        l.running = true;
        let attempt = l.attempt;
        runtime.spawn(listen(
            Stopped(Arc::downgrade(self)),
            self.store.clone(),
            attempt,
            stop_rx,
        ));
    }
}

/// Held by the listener task: however it ends — returning, or dropped with its
/// runtime — the next waiter may start another (after a second), on the next node.
struct Stopped(Weak<Releases>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(r) = self.0.upgrade() {
            let mut l = r.listener.lock().unwrap_or_else(PoisonError::into_inner);
            l.running = false;
            l.failed_at = Some(Instant::now());
            l.attempt = l.attempt.wrapping_add(1);
        }
    }
}

/// Wakes the waiters of every lock announced released, until the `RedisLock` is
/// dropped or the subscription fails (connect, a lost stream, an unanswered PING).
async fn listen(
    releases: Stopped,
    store: RedisStore,
    attempt: usize,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let connection = store.connection();
    let limit = connection.target().call_limit();
    let channel = store.lock_keys().release_channel();
    let opened = tokio::select! {
        _ = &mut stop => return,
        p = tokio::time::timeout(limit, connection.subscribe(channel, attempt)) => p,
    };
    let (mut sink, mut messages) = match opened {
        Ok(Ok(pubsub)) => pubsub.split(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "lock release channel unavailable; waiters poll");
            return;
        }
        Err(_) => {
            tracing::debug!("lock release channel: subscribing timed out; waiters poll");
            return;
        }
    };
    let mut ping = tokio::time::interval(Duration::from_secs(5));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        let msg = tokio::select! {
            _ = &mut stop => return,
            msg = messages.next() => msg,
            _ = ping.tick() => {
                if !answers_ping(&mut sink, limit).await {
                    tracing::debug!("lock release channel unresponsive; waiters poll");
                    return;
                }
                continue;
            }
        };
        let Some(r) = releases.0.upgrade() else {
            return;
        };
        let Some(msg) = msg else {
            tracing::debug!("lock release channel lost; waiters poll");
            return;
        };
        let lock = String::from_utf8_lossy(msg.get_payload_bytes());
        let waiting = r.waiting();
        if let Some(n) = waiting.get(lock.as_ref()) {
            n.notify_waiters();
        }
    }
}
