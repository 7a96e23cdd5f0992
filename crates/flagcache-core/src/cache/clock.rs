//! The clock of L1 deadlines: a precise reading (a calibrated TSC read) and a coarse one
//! (one atomic load of a time a background thread advances every 10 ms), both as
//! [`Tick`]s on one time base.
//!
//! A fresh L1 hit compares the entry's deadline with the coarse reading: a plain load
//! instead of a TSC read, which costs from a few to tens of nanoseconds depending on the
//! CPU and the hypervisor. TTLs are seconds; a deadline read up to a tick late
//! (more while the machine is saturated and the ticking thread waits for a core) changes
//! nothing a user can see. Everything else — installing entries, stale and fail-safe
//! answers, XFetch — reads the precise clock.
//!
//! The same thread publishes each cache's L1 hit count to the `metrics` recorder on
//! every tick (see `Telemetry::publish_hits`).
//!
//! One ticking thread serves every cache of the process. It runs while at least one
//! cache lives and stops within a tick of the last one being dropped. Where the thread
//! cannot be started, [`Clock::coarse`] is `false` and readers use the precise clock.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

/// Nanoseconds since the process's clock origin.
pub(crate) type Tick = u64;

/// How often the coarse time advances.
/// Each tick wakes a thread: on the 2-vCPU virtual machine this was measured on, a
/// wakeup cost about 22 µs of CPU, so a 1 ms tick took 2.2 % of a core from every
/// process with a cache, idle or not, and 10 ms takes a tenth of that.
const TICK: Duration = Duration::from_millis(10);

/// The coarse time: the precise time at the ticking thread's last tick, in
/// milliseconds since the origin.
static RECENT_MS: AtomicU64 = AtomicU64::new(0);
/// Live caches (holders of a [`Clock`]).
static USERS: AtomicUsize = AtomicUsize::new(0);
/// The ticking thread's state: [`STOPPED`], [`STARTING`] (being spawned) or
/// [`RUNNING`].
static STATE: AtomicU8 = AtomicU8::new(STOPPED);
const STOPPED: u8 = 0;
const STARTING: u8 = 1;
const RUNNING: u8 = 2;

/// Work the ticking thread does on each tick besides advancing the time.
pub(crate) trait OnTick: Send + Sync {
    fn on_tick(&self);
}

/// What runs on each tick: one entry per live cache (its counters' publication),
/// dropped once its cache is gone.
static ON_TICK: Mutex<Vec<Weak<dyn OnTick>>> = Mutex::new(Vec::new());

/// Runs `work` on every tick while it lives. Register only with a ticking thread (see
/// [`Clock::coarse`]): without one the work never runs.
pub(crate) fn every_tick(work: Weak<dyn OnTick>) {
    let mut all = ON_TICK.lock().unwrap_or_else(PoisonError::into_inner);
    // Pruned here too, in case the thread stopped and dead entries piled up.
    all.retain(|w| w.strong_count() > 0);
    all.push(work);
}

/// Runs the work of [`every_tick`], outside the registry's lock. The work calls into
/// the application's `metrics` recorder: a panic there ends that work, never the
/// ticking (readers of the coarse time depend on it).
fn run_on_tick(due: &mut Vec<Arc<dyn OnTick>>) {
    {
        let mut all = ON_TICK.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|w| match w.upgrade() {
            Some(work) => {
                due.push(work);
                true
            }
            None => false,
        });
    }
    for work in due.drain(..) {
        let at = Arc::as_ptr(&work);
        // Dropped inside too: the last handle's drop may run the work's own drop.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            work.on_tick();
            drop(work);
        }));
        if ran.is_err() {
            tracing::error!(
                "flagcache: per-tick work panicked (a metrics recorder?); it no longer runs"
            );
            ON_TICK
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|w| !std::ptr::addr_eq(w.as_ptr(), at));
        }
    }
}

/// The process's calibrated clock and its origin, shared by every [`Clock`].
fn base() -> &'static (quanta::Clock, quanta::Instant) {
    static BASE: OnceLock<(quanta::Clock, quanta::Instant)> = OnceLock::new();
    BASE.get_or_init(|| {
        let clock = quanta::Clock::new();
        let origin = clock.now();
        (clock, origin)
    })
}

/// The precise time in milliseconds since the origin (the coarse time's base).
pub(crate) fn precise_ms() -> u64 {
    precise_ticks() / 1_000_000
}

fn precise_ticks() -> Tick {
    let (clock, origin) = base();
    // u64 nanoseconds last 584 years.
    clock.now().saturating_duration_since(*origin).as_nanos() as Tick
}

/// A cache's handle on the clock: while it lives, the coarse time advances.
pub(crate) struct Clock {
    clock: quanta::Clock,
    coarse: bool,
}

impl Clock {
    /// Joins the clock's users, starting the ticking thread if none runs.
    pub fn new() -> Clock {
        let clock = base().0.clone();
        USERS.fetch_add(1, Ordering::SeqCst);
        let coarse = start_ticking();
        Clock { clock, coarse }
    }

    /// Whether [`Clock::recent_ms`] advances; when `false`, it must not be read.
    #[inline(always)]
    pub fn coarse(&self) -> bool {
        self.coarse
    }

    /// The precise time as a [`quanta::Instant`], for durations.
    #[inline]
    pub fn now(&self) -> quanta::Instant {
        self.clock.now()
    }

    /// The precise time as a [`Tick`], for deadlines.
    #[inline]
    pub fn ticks(&self) -> Tick {
        precise_ticks()
    }

    /// The coarse time in milliseconds since the origin: at most one tick behind the
    /// precise time while the ticking thread gets a core. Meaningful only when
    /// [`Clock::coarse`].
    #[inline(always)]
    pub fn recent_ms(&self) -> u64 {
        RECENT_MS.load(Ordering::Relaxed)
    }

    /// Milliseconds since the origin: the coarse time when it advances (at most a
    /// tick behind), else the precise one.
    #[inline]
    pub fn ms(&self) -> u64 {
        if self.coarse {
            self.recent_ms()
        } else {
            precise_ms()
        }
    }

    /// `now + d` as a deadline, saturating.
    #[inline]
    pub fn after(now: Tick, d: Duration) -> Tick {
        now.saturating_add(Self::span(d))
    }

    /// `d` in ticks, saturating.
    #[inline]
    pub fn span(d: Duration) -> Tick {
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Drop for Clock {
    fn drop(&mut self) {
        USERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts the ticking thread unless one runs; whether the coarse time advances. A
/// caller that finds the thread being started by another waits for the outcome.
fn start_ticking() -> bool {
    loop {
        match STATE.compare_exchange(STOPPED, STARTING, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => break,
            Err(RUNNING) => return true,
            Err(_) => std::thread::yield_now(),
        }
    }
    RECENT_MS.store(precise_ticks() / 1_000_000, Ordering::Relaxed);
    let spawned = std::thread::Builder::new()
        .name("flagcache-clock".into())
        .spawn(tick);
    match spawned {
        Ok(_) => {
            STATE.store(RUNNING, Ordering::SeqCst);
            true
        }
        Err(e) => {
            STATE.store(STOPPED, Ordering::SeqCst);
            tracing::warn!(error = %e, "flagcache: no clock thread; L1 hits read the precise clock");
            false
        }
    }
}

/// The ticking thread: advances [`RECENT_MS`] and runs the work of [`every_tick`]
/// while any cache lives.
fn tick() {
    let mut due = Vec::new();
    loop {
        RECENT_MS.store(precise_ticks() / 1_000_000, Ordering::Relaxed);
        run_on_tick(&mut due);
        std::thread::sleep(TICK);
        if USERS.load(Ordering::SeqCst) > 0 {
            continue;
        }
        STATE.store(STOPPED, Ordering::SeqCst);
        // A cache built between the check and the store may have found the thread
        // still running and started none: go on ticking for it — unless it started a
        // thread of its own.
        if USERS.load(Ordering::SeqCst) == 0
            || STATE
                .compare_exchange(STOPPED, RUNNING, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `done` holds within 2 s (a loaded machine may delay ticks).
    fn within_2s(mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        done()
    }

    #[test]
    fn the_coarse_time_follows_the_precise_time() {
        let clock = Clock::new();
        assert!(clock.coarse(), "the ticking thread starts");
        let before = clock.ticks() / 1_000_000;
        std::thread::sleep(Duration::from_millis(50));
        let recent = clock.recent_ms();
        let after = clock.ticks() / 1_000_000;
        assert!(
            recent > before,
            "the coarse time advanced: {recent} ≤ {before}"
        );
        assert!(recent <= after);
    }

    /// Counts its runs; panics after counting when `panics`.
    struct Work {
        runs: AtomicUsize,
        panics: bool,
    }

    impl Work {
        fn new(panics: bool) -> Arc<Work> {
            Arc::new(Work {
                runs: AtomicUsize::new(0),
                panics,
            })
        }

        fn runs(&self) -> usize {
            self.runs.load(Ordering::SeqCst)
        }
    }

    impl OnTick for Work {
        fn on_tick(&self) {
            self.runs.fetch_add(1, Ordering::SeqCst);
            assert!(!self.panics, "a recorder that panics");
        }
    }

    #[test]
    fn work_runs_on_every_tick_while_it_lives() {
        let clock = Clock::new();
        assert!(clock.coarse());
        let work = Work::new(false);
        let registered: Arc<dyn OnTick> = work.clone();
        every_tick(Arc::downgrade(&registered));
        drop(registered);
        assert!(within_2s(|| work.runs() >= 3), "ran on three ticks");
        // Dropped, it is forgotten on the next tick. (`weak` keeps the allocation,
        // so that no other entry can take its address meanwhile.)
        let weak = Arc::downgrade(&work);
        drop(work);
        let held = || {
            ON_TICK
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|w| std::ptr::addr_eq(w.as_ptr(), weak.as_ptr()))
        };
        assert!(within_2s(|| !held()), "a dead entry is pruned");
    }

    #[test]
    fn work_that_panics_stops_and_the_clock_goes_on() {
        let clock = Clock::new();
        assert!(clock.coarse());
        let work = Work::new(true);
        let registered: Arc<dyn OnTick> = work.clone();
        every_tick(Arc::downgrade(&registered));
        assert!(within_2s(|| work.runs() > 0), "never ran");
        assert_eq!(work.runs(), 1, "ran once");
        // The coarse time still advances, and the work never runs again.
        let seen = clock.recent_ms();
        assert!(
            within_2s(|| clock.recent_ms() > seen + 20),
            "the clock stopped"
        );
        assert_eq!(work.runs(), 1, "ran again after panicking");
    }

    #[test]
    fn deadlines_saturate() {
        assert_eq!(Clock::after(u64::MAX - 1, Duration::from_secs(1)), u64::MAX);
        assert_eq!(Clock::after(5, Duration::from_nanos(7)), 12);
    }
}
