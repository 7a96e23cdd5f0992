//! A counting loader: a stand-in source of truth whose calls tests count, slow down,
//! hold, and make fail.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use flagcache_core::{async_trait, Error, FlagKey, Loader, Result, Version};
use tokio::sync::watch;

/// What a [`CountingSource`] answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Answer {
    /// The value for the key at the current version.
    #[default]
    Value,
    /// No such flag (`Ok(None)`).
    Absent,
    /// A loader error ([`Error::Loader`]).
    Error,
    /// Never answers.
    Hang,
    /// Panics with the message `loader bug`.
    Panic,
}

/// A [`Loader`] that counts its calls. It answers `"<key>@<version>"` (or what
/// [`CountingSource::answering`] makes) at the version set last, after an optional
/// latency; tests can make it answer absent, fail, hang or panic, and hold calls until
/// released.
///
/// A call sees the source as it is when the call starts: changing the answer, version
/// or latency afterwards changes later calls only. [`CountingSource::calls`] counts a
/// call once it has seen that state.
///
/// Clones share their state and counts: keep one, pass another to the cache.
///
/// ```
/// use flagcache_testkit::{Answer, CountingSource};
///
/// let source = CountingSource::new(1);
/// source.set_answer(Answer::Absent);
/// assert_eq!(source.calls(), 0);
/// ```
pub struct CountingSource<T = String> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    state: Mutex<State>,
    calls: AtomicUsize,
    completed: AtomicUsize,
    /// `true` while calls are held.
    held: watch::Sender<bool>,
    value: Box<MakeValue<T>>,
}

/// How a source makes its value for a key at a version.
type MakeValue<T> = dyn Fn(&FlagKey, Version) -> T + Send + Sync;

#[derive(Debug, Clone, Copy)]
struct State {
    answer: Answer,
    version: u64,
    latency: Duration,
}

impl CountingSource<String> {
    /// A source that answers `"<key>@<version>"` at `version`.
    pub fn new(version: u64) -> Self {
        Self::answering(version, |key, version| format!("{key}@{}", version.get()))
    }
}

impl<T> CountingSource<T> {
    /// A source whose value for a key at a version is `value(key, version)`.
    pub fn answering(
        version: u64,
        value: impl Fn(&FlagKey, Version) -> T + Send + Sync + 'static,
    ) -> Self {
        CountingSource {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    answer: Answer::Value,
                    version,
                    latency: Duration::ZERO,
                }),
                calls: AtomicUsize::new(0),
                completed: AtomicUsize::new(0),
                held: watch::Sender::new(false),
                value: Box::new(value),
            }),
        }
    }

    /// Each call takes `latency` before it answers.
    #[must_use]
    pub fn with_latency(self, latency: Duration) -> Self {
        self.set_latency(latency);
        self
    }

    /// How many calls have started.
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// How many calls have answered (with a value, an absence or an error).
    pub fn completed(&self) -> usize {
        self.shared.completed.load(Ordering::SeqCst)
    }

    /// Calls from now on answer at `version`.
    pub fn set_version(&self, version: u64) {
        self.state().version = version;
    }

    /// Calls from now on answer `answer`.
    pub fn set_answer(&self, answer: Answer) {
        self.state().answer = answer;
    }

    /// Calls from now on take `latency` before they answer.
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// Holds every call, those in flight included, until [`CountingSource::release`].
    pub fn hold(&self) {
        self.shared.held.send_replace(true);
    }

    /// Lets held calls, and every later one, answer.
    pub fn release(&self) {
        self.shared.held.send_replace(false);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn call(&self, key: &FlagKey) -> Result<Option<(T, Version)>> {
        let state = {
            let state = self.state();
            self.shared.calls.fetch_add(1, Ordering::SeqCst);
            *state
        };
        if !state.latency.is_zero() {
            tokio::time::sleep(state.latency).await;
        }
        let mut held = self.shared.held.subscribe();
        // The sender lives in `shared`, so the wait ends only by a release.
        let _ = held.wait_for(|held| !*held).await;
        let version = Version::new(state.version);
        let answer = match state.answer {
            Answer::Value => Ok(Some(((self.shared.value)(key, version), version))),
            Answer::Absent => Ok(None),
            Answer::Error => Err(Error::loader(
                key,
                std::io::Error::other("control plane down"),
            )),
            Answer::Hang => std::future::pending().await,
            #[allow(clippy::panic)] // the panicking loader a test asks for
            Answer::Panic => panic!("loader bug"),
        };
        self.shared.completed.fetch_add(1, Ordering::SeqCst);
        answer
    }
}

impl<T> Clone for CountingSource<T> {
    fn clone(&self) -> Self {
        CountingSource {
            shared: self.shared.clone(),
        }
    }
}

impl<T> fmt::Debug for CountingSource<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingSource")
            .field("state", &*self.state())
            .field("calls", &self.calls())
            .field("completed", &self.completed())
            .field("held", &*self.shared.held.borrow())
            .finish()
    }
}

#[async_trait]
impl<T: Send + 'static> Loader<T> for CountingSource<T> {
    async fn load(&self, key: &FlagKey) -> Result<Option<(T, Version)>> {
        self.call(key).await
    }
}
