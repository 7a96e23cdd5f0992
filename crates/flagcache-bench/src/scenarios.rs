//! The scenarios, each beside its baseline in the same run.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache_core::{CacheStatus, FlagCache, FlagKey, StaleReason, Version};
use flagcache_memcached::{MemcachedInvalidator, MemcachedStore};
use flagcache_redis::{RedisInvalidator, RedisLock, RedisStore};
use flagcache_testkit::{MemcachedServer, RedisServer};
use futures_util::FutureExt;

use crate::report::{Check, Row};
use crate::source::Source;
use crate::stats::Samples;

pub type Res<T> = Result<T, String>;

pub fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// What a scenario adds to the report.
#[derive(Debug, Default)]
pub struct Section {
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
}

/// Counts: the full run, or a smoke run with tiny counts.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub quick: bool,
}

impl Plan {
    fn n(self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }

    fn secs(self, full: f64, quick: f64) -> Duration {
        Duration::from_secs_f64(if self.quick { quick } else { full })
    }
}

/// The servers the scenarios share: given by URL, or started on loopback.
#[derive(Debug, Default)]
pub struct Servers {
    pub redis_url: Option<String>,
    pub memcached_url: Option<String>,
    redis: Option<RedisServer>,
    memcached: Option<MemcachedServer>,
}

impl Servers {
    pub fn new(redis_url: Option<String>, memcached_url: Option<String>) -> Self {
        Servers {
            redis_url,
            memcached_url,
            ..Servers::default()
        }
    }

    pub fn redis_url(&mut self) -> Res<String> {
        if let Some(u) = &self.redis_url {
            return Ok(u.clone());
        }
        let server = tokio::task::block_in_place(RedisServer::start).map_err(err)?;
        let url = server.url();
        self.redis = Some(server);
        self.redis_url = Some(url.clone());
        Ok(url)
    }

    pub fn memcached_url(&mut self) -> Res<String> {
        if let Some(u) = &self.memcached_url {
            return Ok(u.clone());
        }
        let server = tokio::task::block_in_place(MemcachedServer::start).map_err(err)?;
        let url = server.url();
        self.memcached = Some(server);
        self.memcached_url = Some(url.clone());
        Ok(url)
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Res<()>> + Send>>;
/// One operation, given the index of the task running it.
type Op = Arc<dyn Fn(usize) -> BoxFut + Send + Sync>;

/// Runs `op` `per_task` times on each of `tasks` tasks; every latency, and the wall time.
async fn run_ops(op: &Op, tasks: usize, per_task: usize) -> Res<(Samples, Duration)> {
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut s = Samples::with_capacity(per_task);
                for _ in 0..per_task {
                    let t = Instant::now();
                    op(task).await?;
                    s.push(t.elapsed());
                }
                Ok::<_, String>(s)
            })
        })
        .collect();
    let mut all = Samples::default();
    for h in handles {
        all.extend(h.await.map_err(err)??);
    }
    Ok((all, start.elapsed()))
}

/// A flag-configuration-like payload of `len` bytes.
fn payload(len: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(len as u64);
    let mut s = String::from("{\"rules\":[");
    while s.len() < len {
        s.push_str(&format!(
            "{{\"segment\":\"seg-{}\",\"variant\":\"{}\"}},",
            rng.u32(..100_000),
            ["on", "off", "control", "treatment"][rng.usize(..4)]
        ));
    }
    s.truncate(len);
    s
}

fn key(name: &str) -> Res<FlagKey> {
    FlagKey::new(name).map_err(err)
}

/// A unique key per run, so reruns against a given server start cold.
fn fresh_key(prefix: &str) -> Res<FlagKey> {
    key(&format!("{prefix}.{:x}", fastrand::u64(..)))
}

/// Tasks in the throughput comparison; each reads its own key, so that `FlagCache`'s
/// coalescing of concurrent reads of one key does not flatter it.
const TASKS: usize = 50;

/// The contenders of an L2-hit scenario: the raw client, `FlagCache`, the store
/// alone (which splits the overhead between the adapter and the cache).
type Contenders = [(String, Op); 3];

/// Runs `contenders` on `tasks` tasks, interleaved in many short rounds so that drift
/// and the scheduler's luck hit all alike; a row per contender, and each one's
/// (ops/s, p50 µs).
async fn measure(
    scenario: &str,
    contenders: &Contenders,
    tasks: usize,
    rounds: usize,
    per_task: usize,
) -> Res<(Vec<Row>, Vec<(f64, f64)>)> {
    for (_, op) in contenders {
        run_ops(op, tasks.min(4), 50).await?;
    }
    let mut acc: [(Samples, Duration); 3] = Default::default();
    for _ in 0..rounds {
        for (i, (_, op)) in contenders.iter().enumerate() {
            let (s, wall) = run_ops(op, tasks, per_task).await?;
            acc[i].0.extend(s);
            acc[i].1 += wall;
        }
    }
    let (mut rows, mut figures) = (Vec::new(), Vec::new());
    for (i, (name, _)) in contenders.iter().enumerate() {
        let (samples, wall) = std::mem::take(&mut acc[i]);
        let ops = samples.len() as f64 / wall.as_secs_f64().max(1e-9);
        let summary = samples.summary();
        figures.push((ops, summary.p50_us));
        let plural = if tasks == 1 { "" } else { "s" };
        rows.push(Row::new(&format!("{scenario}, {tasks} task{plural}"), name, summary).ops(ops));
    }
    Ok((rows, figures))
}

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Res<()>> + Send + 'static,
{
    Arc::new(move |task| Box::pin(f(task)) as BoxFut)
}

/// One key per task, each holding a 1 KiB value in L2.
async fn l2_keys(cache: &FlagCache<String>, prefix: &str) -> Res<Vec<FlagKey>> {
    let run = fresh_key(prefix)?;
    let mut keys = Vec::new();
    for i in 0..TASKS {
        let k = key(&format!("{run}.{i}"))?;
        cache
            .set(&k, payload(1000), Version::new(1))
            .await
            .map_err(err)?;
        keys.push(k);
    }
    Ok(keys)
}

/// A store read of the task's key that must hit.
fn store_op<S: flagcache_core::FlagStore + Clone + 'static>(store: &S, keys: &[FlagKey]) -> Op {
    let (store, keys) = (store.clone(), Arc::new(keys.to_vec()));
    op(move |task| {
        let (store, key) = (store.clone(), keys[task % keys.len()].clone());
        async move {
            match store.get(&key).await.map_err(err)? {
                Some(_) => Ok(()),
                None => Err(format!("{key}: not in the store")),
            }
        }
    })
}

/// A `FlagCache` read of the task's key that must hit.
fn cache_op(cache: &FlagCache<String>, keys: &[FlagKey]) -> Op {
    let (cache, keys) = (cache.clone(), Arc::new(keys.to_vec()));
    op(move |task| {
        let (cache, key) = (cache.clone(), keys[task % keys.len()].clone());
        async move {
            match cache.get(&key).await.map_err(err)? {
                Some(_) => Ok(()),
                None => Err(format!("{key}: no value")),
            }
        }
    })
}

/// Builds the raw client's operation from each key's name in the store.
type MakeOp = Box<dyn FnOnce(Arc<Vec<String>>) -> Op + Send>;

/// What an L2-hit scenario compares, and the source whose calls must stay at zero.
struct L2Setup {
    contenders: Contenders,
    source: Arc<Source>,
}

/// Builds an [`L2Setup`] on the runtime it is awaited on (clients spawn their
/// connection drivers there).
type MakeSetup = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Res<L2Setup>> + Send>> + Send + Sync>;

/// `FlagCache` with L1 off over `store`, beside the raw client (`raw`, given each
/// key's name in the store) and the store alone, on 50 fresh keys of 1 KiB.
async fn l2_setup<S>(
    scenario: &str,
    store: S,
    name_of: impl Fn(&S, &FlagKey) -> String,
    raw: (&str, MakeOp),
) -> Res<L2Setup>
where
    S: flagcache_core::FlagStore + Clone + 'static,
{
    let source = Source::new(Duration::from_millis(5));
    let cache = FlagCache::<String>::builder(store.clone(), source.loader())
        .name(format!("bench {scenario}"))
        .l1(false)
        .build()
        .await
        .map_err(err)?;
    let keys = l2_keys(&cache, "l2").await?;
    let names = Arc::new(keys.iter().map(|k| name_of(&store, k)).collect());
    let (raw_name, make_raw) = raw;
    Ok(L2Setup {
        contenders: [
            (raw_name.to_string(), make_raw(names)),
            ("FlagCache (L1 off)".to_string(), cache_op(&cache, &keys)),
            (
                format!("the store alone ({})", store.name()),
                store_op(&store, &keys),
            ),
        ],
        source,
    })
}

/// An L2-hit scenario: 1 task (latency), then 50 tasks (throughput).
///
/// The 1-task rounds run on a one-thread runtime of their own, built for them with
/// their own clients: there, the reading task and the client's connection driver
/// always share the thread. On the multi-threaded runtime, whether they happen to
/// land on the same worker moves p50 by a factor of 3 either way — for the raw
/// client and ours alike — and the ratio measured the scheduler, not the code.
async fn l2_hit(scenario: &str, plan: Plan, make: MakeSetup) -> Res<Section> {
    let mut section = Section::default();
    let (one, one_calls) = {
        let (make, scenario) = (make.clone(), scenario.to_string());
        tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(err)?;
            rt.block_on(async {
                let setup = make().await?;
                let figures = measure(
                    &scenario,
                    &setup.contenders,
                    1,
                    plan.n(20, 2),
                    plan.n(300, 25),
                )
                .await?;
                Ok::<_, String>((figures, setup.source.calls()))
            })
        })
        .await
        .map_err(err)??
    };
    let setup = make().await?;
    let many = measure(
        scenario,
        &setup.contenders,
        TASKS,
        plan.n(10, 1),
        plan.n(60, 5),
    )
    .await?;
    let ((rows1, fig1), (rows50, fig50)) = (one, many);
    section.rows.extend(rows1);
    section.rows.extend(rows50);
    section.checks.push(Check::at_most(
        &format!("{scenario}: p50 at 1 task ÷ raw client's"),
        fig1[1].1 / fig1[0].1.max(1e-9),
        1.10,
        "×",
    ));
    section.checks.push(Check::at_least(
        &format!("{scenario}: ops/s at 50 tasks ÷ raw client's"),
        fig50[1].0 / fig50[0].0.max(1e-9),
        0.90,
        "×",
    ));
    section.checks.push(
        Check::at_most(
            &format!("{scenario}: loader calls"),
            (one_calls + setup.source.calls()) as f64,
            0.0,
            "calls",
        )
        .correctness(),
    );
    Ok(section)
}

/// L2 hit over Redis: `FlagCache` with L1 off against a raw `redis-rs` GET of the
/// same stored bytes.
pub async fn l2_hit_redis(servers: &mut Servers, plan: Plan) -> Res<Section> {
    let url = servers.redis_url()?;
    let make: MakeSetup = Arc::new(move || Box::pin(redis_l2_setup(url.clone())));
    l2_hit("L2 hit, Redis", plan, make).await
}

async fn redis_l2_setup(url: String) -> Res<L2Setup> {
    let store = RedisStore::builder()
        .url(&url)
        .namespace("bench-l2")
        .build()
        .await
        .map_err(err)?;
    let client = redis::Client::open(url.as_str()).map_err(err)?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(err)?;
    let raw = move |names: Arc<Vec<String>>| {
        op(move |task| {
            let (mut conn, name) = (conn.clone(), names[task % names.len()].clone());
            async move {
                let v: Option<Vec<u8>> = redis::AsyncCommands::get(&mut conn, &name)
                    .await
                    .map_err(err)?;
                match v {
                    Some(b) if b.len() >= 1000 => Ok(()),
                    _ => Err("raw GET missed".to_string()),
                }
            }
        })
    };
    l2_setup(
        "L2 hit, Redis",
        store,
        RedisStore::redis_key,
        ("raw redis-rs GET", Box::new(raw)),
    )
    .await
}

/// A small pool of raw `async-memcached` clients: the baseline's fair equivalent of
/// the store's pool.
struct RawPool {
    url: String,
    conns: std::sync::Mutex<Vec<async_memcached::Client>>,
    permits: tokio::sync::Semaphore,
}

impl RawPool {
    async fn get(&self, key: &str) -> Res<Option<Vec<u8>>> {
        use async_memcached::AsciiProtocol;
        let _permit = self.permits.acquire().await.map_err(err)?;
        let pooled = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut client = match pooled {
            Some(c) => c,
            None => async_memcached::Client::new(&self.url).await.map_err(err)?,
        };
        let value = client.get(key).await.map_err(err)?;
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(client);
        Ok(value.and_then(|v| v.data))
    }
}

/// L2 hit over memcached: `FlagCache` with L1 off against a raw pooled
/// `async-memcached` get of the same stored bytes.
pub async fn l2_hit_memcached(servers: &mut Servers, plan: Plan) -> Res<Section> {
    let url = servers.memcached_url()?;
    let make: MakeSetup = Arc::new(move || Box::pin(memcached_l2_setup(url.clone())));
    l2_hit("L2 hit, Memcached", plan, make).await
}

async fn memcached_l2_setup(url: String) -> Res<L2Setup> {
    const POOL: usize = 16;
    let store = MemcachedStore::builder()
        .server(&url)
        .namespace("bench-l2")
        .pool_size(POOL)
        .build()
        .await
        .map_err(err)?;
    let pool = Arc::new(RawPool {
        url,
        conns: std::sync::Mutex::new(Vec::new()),
        permits: tokio::sync::Semaphore::new(POOL),
    });
    let raw = move |names: Arc<Vec<String>>| {
        op(move |task| {
            let (pool, name) = (pool.clone(), names[task % names.len()].clone());
            async move {
                match pool.get(&name).await? {
                    Some(b) if b.len() >= 1000 => Ok(()),
                    _ => Err("raw get missed".to_string()),
                }
            }
        })
    };
    l2_setup(
        "L2 hit, Memcached",
        store,
        MemcachedStore::memcached_key,
        ("raw async-memcached get (pooled)", Box::new(raw)),
    )
    .await
}

/// The median round trip of a raw PING: the unit of the storm's bound.
async fn redis_rtt(url: &str) -> Res<Duration> {
    let client = redis::Client::open(url).map_err(err)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(err)?;
    let mut s = Samples::default();
    for _ in 0..200 {
        let t = Instant::now();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        s.push(t.elapsed());
    }
    Ok(Duration::from_secs_f64(s.summary().p50_us / 1e6))
}

type SetupFut<S> = Pin<Box<dyn Future<Output = Res<S>> + Send>>;

/// A replica thread's arrival at the start barrier: now, or when dropped.
struct Arrive<'a>(Option<&'a std::sync::Barrier>);

impl Arrive<'_> {
    fn now(&mut self) {
        if let Some(b) = self.0.take() {
            b.wait();
        }
    }
}

impl Drop for Arrive<'_> {
    fn drop(&mut self) {
        self.now();
    }
}
type RequestFut = Pin<Box<dyn Future<Output = Res<bool>> + Send>>;

/// Requests released at once through a gate, across `replicas` replicas that each run
/// on a runtime of their own with one worker thread — replicas are separate
/// processes, and one shared scheduler would queue every replica's I/O behind every
/// replica's requests. `setup(r)` builds replica `r`'s state on its runtime (clients
/// start their connection drivers there); `request(state, i)` is request `i`, and
/// replica `r` runs requests `r, r + replicas, …`. Returns each request's latency
/// (from when it first runs after the gate opens), how many got no value, and when
/// the gate opened.
async fn storm<S: Clone + Send + 'static>(
    replicas: usize,
    total: usize,
    setup: impl Fn(usize) -> SetupFut<S> + Send + Sync + 'static,
    request: impl Fn(&S, usize) -> RequestFut + Send + Sync + 'static,
) -> Res<(Samples, usize, Instant)> {
    let (gate, _) = tokio::sync::watch::channel(false);
    let gate = Arc::new(gate);
    let ready = Arc::new(std::sync::Barrier::new(replicas + 1));
    let (setup, request) = (Arc::new(setup), Arc::new(request));
    let threads: Vec<_> = (0..replicas)
        .map(|r| {
            let (gate, ready, setup, request) =
                (gate.clone(), ready.clone(), setup.clone(), request.clone());
            std::thread::spawn(move || -> Res<(Samples, usize)> {
                // Arrives at the barrier however this thread ends, failing or panicking
                // included, so the others and the caller are never left waiting.
                let mut arrive = Arrive(Some(&ready));
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .map_err(err)?;
                let state = rt.block_on(setup(r))?;
                let handles: Vec<_> = (r..total)
                    .step_by(replicas)
                    .map(|i| {
                        let mut open = gate.subscribe();
                        let req = request(&state, i);
                        rt.spawn(async move {
                            let _ = open.wait_for(|o| *o).await;
                            let t = Instant::now();
                            let ok = req.await;
                            (t.elapsed(), ok)
                        })
                    })
                    .collect();
                arrive.now();
                rt.block_on(async {
                    let mut samples = Samples::with_capacity(handles.len());
                    let mut failed = 0;
                    for h in handles {
                        let (took, ok) = h.await.map_err(err)?;
                        samples.push(took);
                        if !matches!(ok, Ok(true)) {
                            failed += 1;
                        }
                    }
                    Ok((samples, failed))
                })
            })
        })
        .collect();
    tokio::task::spawn_blocking(move || ready.wait())
        .await
        .map_err(err)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let opened = Instant::now();
    gate.send_replace(true);
    tokio::task::spawn_blocking(move || {
        let mut samples = Samples::with_capacity(total);
        let mut failed = 0;
        let mut first_error = None;
        // Every thread joined, even after one failed: none is left running into the
        // next scenario.
        for t in threads {
            match t.join() {
                Ok(Ok((s, f))) => {
                    samples.extend(s);
                    failed += f;
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert("a replica thread panicked".to_string());
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok((samples, failed, opened)),
        }
    })
    .await
    .map_err(err)?
}

/// Cold-key storm: 10,000 concurrent requests for one absent key across 8 replicas,
/// against naive cache-aside with the raw client.
pub async fn cold_storm(servers: &mut Servers, plan: Plan) -> Res<Section> {
    const REPLICAS: usize = 8;
    let url = servers.redis_url()?;
    let total = plan.n(10_000, 800);
    let scenario = format!("cold-key storm, {total} requests, {REPLICAS} replicas");
    let rtt = redis_rtt(&url).await?;
    let mut section = Section::default();

    // Baseline: every request GETs, misses, loads and SETs.
    let source = Source::new(Duration::from_millis(20));
    let k = fresh_key("storm.raw")?;
    source.set(&k, payload(200), Version::new(1));
    let loader = Arc::new(source.loader());
    let raw_url = url.clone();
    let (samples, failed, _) = storm(
        REPLICAS,
        total,
        move |_| {
            let url = raw_url.clone();
            Box::pin(async move {
                let client = redis::Client::open(url.as_str()).map_err(err)?;
                client.get_multiplexed_async_connection().await.map_err(err)
            })
        },
        move |conn, _| {
            let (mut conn, k, loader) = (conn.clone(), k.clone(), loader.clone());
            Box::pin(async move {
                let name = k.as_str().to_string();
                let hit: Option<Vec<u8>> = redis::AsyncCommands::get(&mut conn, &name)
                    .await
                    .map_err(err)?;
                if hit.is_some() {
                    return Ok(true);
                }
                let Some((v, _)) = loader(k.clone()).await.map_err(err)? else {
                    return Ok(false);
                };
                let _: () = redis::AsyncCommands::set_ex(&mut conn, &name, v, 60)
                    .await
                    .map_err(err)?;
                Ok(true)
            })
        },
    )
    .await?;
    section.rows.push(
        Row::new(&scenario, "raw cache-aside (redis-rs)", samples.summary())
            .count("loader calls", source.calls() as f64)
            .count("failed", failed as f64),
    );

    // The floor: the same requests released through the same gate, each replica's
    // awaiting one shared 20 ms "load" with no I/O at all — what waking 10,000 tasks
    // costs here.
    let (floor, _, _) = storm(
        REPLICAS,
        total,
        |_| {
            // Per replica, as each replica process would wait for its own load.
            let (done, _) = tokio::sync::watch::channel(false);
            let loading = Arc::new(std::sync::atomic::AtomicBool::new(false));
            Box::pin(async move { Ok((Arc::new(done), loading)) })
        },
        move |(done, loading), _| {
            let (done, loading) = (done.clone(), loading.clone());
            Box::pin(async move {
                let mut rx = done.subscribe();
                if !loading.swap(true, Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    done.send_replace(true);
                }
                let _ = rx.wait_for(|d| *d).await;
                Ok(true)
            })
        },
    )
    .await?;
    let floor = floor.summary();
    let floor_p99 = floor.p99_us;
    section.rows.push(Row::new(
        &scenario,
        "floor: a 20 ms wait per replica, no I/O",
        floor,
    ));

    // FlagCache: per-process single flight + RedisLock across processes.
    let source = Source::new(Duration::from_millis(20));
    let k = fresh_key("storm.flagcache")?;
    source.set(&k, payload(200), Version::new(1));
    let loader = source.clone();
    let (samples, failed, opened) = storm(
        REPLICAS,
        total,
        move |r| {
            let (url, source) = (url.clone(), loader.clone());
            Box::pin(async move {
                let store = RedisStore::builder()
                    .url(&url)
                    .namespace("bench-storm")
                    .build()
                    .await
                    .map_err(err)?;
                let lock = RedisLock::new(&store);
                FlagCache::<String>::builder(store, source.loader())
                    .name(format!("storm-{r}"))
                    .cross_process(lock)
                    .build()
                    .await
                    .map_err(err)
            })
        },
        move |cache, _| {
            let (cache, k) = (cache.clone(), k.clone());
            Box::pin(async move { Ok(cache.get(&k).await.map_err(err)?.is_some()) })
        },
    )
    .await?;
    let summary = samples.summary();
    let bound_us = (source.latency() + 2 * rtt).as_secs_f64() * 1e6;
    section.checks.push(
        Check::at_most(
            "cold-key storm: loader calls",
            source.calls() as f64,
            1.0,
            "calls",
        )
        .correctness(),
    );
    section.checks.push(
        Check::at_most(
            "cold-key storm: failed requests",
            failed as f64,
            0.0,
            "requests",
        )
        .correctness(),
    );
    section.checks.push(Check::at_most(
        "cold-key storm: p99 (bound: loader latency + 2 round trips)",
        summary.p99_us,
        bound_us,
        "µs",
    ));
    section.checks.push(Check::at_most(
        "cold-key storm: p99 over the floor's p99 (bound: 2 round trips)",
        summary.p99_us - floor_p99,
        2.0 * rtt.as_secs_f64() * 1e6,
        "µs",
    ));
    section.rows.push(
        Row::new(&scenario, "FlagCache + RedisLock", summary)
            .count("loader calls", source.calls() as f64)
            .count("failed", failed as f64)
            .count("loader ms", source.latency().as_secs_f64() * 1e3)
            .count(
                "load began ms after the gate",
                source.first_call().map_or(f64::NAN, |t| {
                    t.saturating_duration_since(opened).as_secs_f64() * 1e3
                }),
            )
            .count("rtt µs", rtt.as_secs_f64() * 1e6),
    );
    Ok(section)
}

/// The latest flip of each flag, for the stale-read check: the version, and when its
/// `set` returned (µs since the run's start). The time is written before the version.
struct Flips {
    start: Instant,
    version: Vec<AtomicU64>,
    done_at_us: Vec<AtomicU64>,
}

impl Flips {
    fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// A replica's Redis store (under `namespace`) and invalidator (on `channel`).
async fn redis_pair(
    url: &str,
    namespace: &str,
    channel: &str,
) -> Res<(RedisStore, RedisInvalidator)> {
    let store = RedisStore::builder()
        .url(url)
        .namespace(namespace)
        .build()
        .await
        .map_err(err)?;
    let inv = RedisInvalidator::builder()
        .url(url)
        .channel(channel)
        .build()
        .await
        .map_err(err)?;
    Ok((store, inv))
}

/// Rollout storm: 8 replicas × 64 tasks evaluating 200 flags (L1 + Redis) while a
/// publisher flips one flag every 100 ms; against a raw GET per evaluation.
pub async fn rollout_storm(servers: &mut Servers, plan: Plan) -> Res<Section> {
    const REPLICAS: usize = 8;
    const TASKS: usize = 64;
    const FLAGS: usize = 200;
    const BOUND: Duration = Duration::from_millis(10);
    let url = servers.redis_url()?;
    let run_for = plan.secs(10.0, 1.0);
    let scenario = format!("rollout storm, {REPLICAS}×{TASKS} tasks, {FLAGS} flags");
    let mut section = Section::default();
    let source = Source::new(Duration::from_millis(2));
    let prefix = format!("rollout.{:x}", fastrand::u32(..));
    let keys: Vec<FlagKey> = (0..FLAGS)
        .map(|i| key(&format!("{prefix}.{i}")))
        .collect::<Res<_>>()?;
    for k in &keys {
        source.set(k, payload(300), Version::new(1));
    }
    let channel = format!("bench-rollout-{prefix}");
    let mut caches = Vec::new();
    for i in 0..=REPLICAS {
        let (store, inv) = redis_pair(&url, "bench-rollout", &channel).await?;
        let cache = replica(format!("rollout-{i}"), &source, store, inv).await?;
        cache.warm(&keys).await;
        caches.push(cache);
    }
    let publisher = caches.pop().ok_or("no publisher")?;
    let loads_before = source.calls();
    let flips = Arc::new(Flips {
        start: Instant::now(),
        version: (0..FLAGS).map(|_| AtomicU64::new(1)).collect(),
        done_at_us: (0..FLAGS).map(|_| AtomicU64::new(0)).collect(),
    });
    let stale_within = Arc::new(AtomicU64::new(0));
    let stale_past = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + run_for;
    let mut handles = Vec::new();
    for r in 0..REPLICAS * TASKS {
        let cache = caches[r % REPLICAS].clone();
        let (keys, flips) = (keys.clone(), flips.clone());
        let (within, past) = (stale_within.clone(), stale_past.clone());
        handles.push(tokio::spawn(async move {
            let mut s = Samples::with_capacity(10_000);
            let mut errors = 0u64;
            let mut rng = fastrand::Rng::new();
            while Instant::now() < deadline {
                // One request: 10 evaluations, then the next request in 10 ms.
                for _ in 0..10 {
                    let i = rng.usize(..FLAGS);
                    let latest = flips.version[i].load(Ordering::Acquire);
                    let done = flips.done_at_us[i].load(Ordering::Acquire);
                    let t = Instant::now();
                    let got = cache.lookup(&keys[i]).await;
                    s.push(t.elapsed());
                    match got {
                        Ok(l) => {
                            let v = l.version.map_or(0, |v| v.get());
                            if v < latest {
                                let late = flips.now_us().saturating_sub(done);
                                if late > BOUND.as_micros() as u64 {
                                    past.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    within.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Err(_) => errors += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (s, errors)
        }));
    }
    // The publisher: one flip every 100 ms.
    let mut flipped = 0u64;
    let mut version = 1u64;
    while Instant::now() + Duration::from_millis(100) < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        version += 1;
        let i = (version as usize) % FLAGS;
        let v = Version::new(version);
        source.set(&keys[i], payload(300), v);
        publisher
            .set(&keys[i], payload(300), v)
            .await
            .map_err(err)?;
        flips.done_at_us[i].store(flips.now_us(), Ordering::Release);
        flips.version[i].store(version, Ordering::Release);
        flipped += 1;
    }
    let mut samples = Samples::default();
    let mut errors = 0;
    for h in handles {
        let (s, e) = h.await.map_err(err)?;
        samples.extend(s);
        errors += e;
    }
    let evaluations = samples.len();
    let summary = samples.summary();
    let past = stale_past.load(Ordering::SeqCst);
    section.checks.push(Check::at_most(
        "rollout storm: p99 evaluation with L1",
        summary.p99_us,
        1_000.0,
        "µs",
    ));
    section.checks.push(Check::at_most(
        &format!(
            "rollout storm: stale reads later than {} ms after a flip",
            BOUND.as_millis()
        ),
        past as f64,
        0.0,
        "reads",
    ));
    section
        .checks
        .push(Check::at_most("rollout storm: errors", errors as f64, 0.0, "reads").correctness());
    section.rows.push(
        Row::new(&scenario, "FlagCache (L1 + Redis)", summary)
            .ops(evaluations as f64 / run_for.as_secs_f64())
            .count("evaluations", evaluations as f64)
            .count("flips", flipped as f64)
            .count("stale ≤ bound", stale_within.load(Ordering::SeqCst) as f64)
            .count("stale > bound", past as f64)
            .count("loader calls", (source.calls() - loads_before) as f64)
            .count("errors", errors as f64),
    );
    drop(caches);
    drop(publisher);

    // Baseline: a raw GET per evaluation, the same pacing, half the time.
    let client = redis::Client::open(url.as_str()).map_err(err)?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(err)?;
    let names: Arc<Vec<String>> = Arc::new(keys.iter().map(|k| k.as_str().to_string()).collect());
    {
        let mut c = conn.clone();
        for n in names.iter() {
            let _: () = redis::AsyncCommands::set(&mut c, n, payload(300))
                .await
                .map_err(err)?;
        }
    }
    let run_for = run_for / 2;
    let deadline = Instant::now() + run_for;
    let handles: Vec<_> = (0..REPLICAS * TASKS)
        .map(|_| {
            let (mut conn, names) = (conn.clone(), names.clone());
            tokio::spawn(async move {
                let mut s = Samples::with_capacity(5_000);
                let mut rng = fastrand::Rng::new();
                while Instant::now() < deadline {
                    for _ in 0..10 {
                        let t = Instant::now();
                        let _: Option<Vec<u8>> =
                            redis::AsyncCommands::get(&mut conn, &names[rng.usize(..FLAGS)])
                                .await
                                .map_err(err)?;
                        s.push(t.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok::<_, String>(s)
            })
        })
        .collect();
    let mut samples = Samples::default();
    for h in handles {
        samples.extend(h.await.map_err(err)??);
    }
    let evaluations = samples.len();
    section.rows.insert(
        0,
        Row::new(
            &scenario,
            "raw redis-rs GET per evaluation",
            samples.summary(),
        )
        .ops(evaluations as f64 / run_for.as_secs_f64())
        .count("evaluations", evaluations as f64),
    );
    Ok(section)
}

/// Time from `set` on one replica until each of 8 others serves the new version.
async fn propagation(
    writer: &FlagCache<String>,
    readers: &[FlagCache<String>],
    flips: usize,
) -> Res<(Samples, usize)> {
    let k = fresh_key("propagation")?;
    writer
        .set(&k, payload(100), Version::new(1))
        .await
        .map_err(err)?;
    for r in readers {
        r.get(&k).await.map_err(err)?;
    }
    let mut samples = Samples::with_capacity(flips * readers.len());
    let mut missed = 0;
    for flip in 2..flips as u64 + 2 {
        let t0 = Instant::now();
        writer
            .set(&k, payload(100), Version::new(flip))
            .await
            .map_err(err)?;
        let waits = readers.iter().map(|r| {
            let k = k.clone();
            async move {
                loop {
                    if let Ok(l) = r.lookup(&k).await {
                        if l.version.is_some_and(|v| v.get() >= flip) {
                            return Some(t0.elapsed());
                        }
                    }
                    if t0.elapsed() > Duration::from_secs(5) {
                        return None;
                    }
                    // Spin for the first 2 ms (most flips land sooner), then poll
                    // every 0.5 ms: eight spinning readers would take both cores from
                    // the very server that delivers the event, and measure that.
                    if t0.elapsed() < Duration::from_millis(2) {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(Duration::from_micros(500)).await;
                    }
                }
            }
        });
        for took in futures_util::future::join_all(waits).await {
            match took {
                Some(d) => samples.push(d),
                None => missed += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok((samples, missed))
}

/// Replicas sharing one backend: the store and invalidator of replica `i`.
async fn replica<S, I>(
    name: String,
    source: &Arc<Source>,
    store: S,
    inv: I,
) -> Res<FlagCache<String>>
where
    S: flagcache_core::FlagStore + 'static,
    I: flagcache_core::Invalidator + 'static,
{
    FlagCache::<String>::builder(store, source.loader())
        .name(name)
        .invalidator(inv)
        .fresh_for(Duration::from_secs(300))
        .build()
        .await
        .map_err(err)
}

/// Runs [`propagation`] over `caches` (the first writes) and reports it under
/// `contender`, with its p99 bound.
async fn propagation_section(
    section: &mut Section,
    caches: &[FlagCache<String>],
    flips: usize,
    contender: &str,
    bound_us: f64,
) -> Res<()> {
    let (samples, missed) = propagation(&caches[0], &caches[1..], flips).await?;
    let summary = samples.summary();
    section.checks.push(Check::at_most(
        &format!("propagation, {contender}: p99"),
        summary.p99_us,
        bound_us,
        "µs",
    ));
    section.checks.push(
        Check::at_most(
            &format!("propagation, {contender}: flips never seen"),
            missed as f64,
            0.0,
            "reads",
        )
        .correctness(),
    );
    section.rows.push(
        Row::new(
            &format!(
                "propagation, {flips} flips to {} replicas",
                caches.len() - 1
            ),
            contender,
            summary,
        )
        .count("never seen", missed as f64),
    );
    Ok(())
}

/// Propagation over Redis pub/sub and over the memcached log.
pub async fn propagation_both(servers: &mut Servers, plan: Plan) -> Res<Section> {
    const READERS: usize = 8;
    let flips = plan.n(500, 10);
    let mut section = Section::default();
    let source = Source::new(Duration::from_millis(1));

    let url = servers.redis_url()?;
    let channel = format!("bench-propagation-{:x}", fastrand::u32(..));
    let mut caches = Vec::new();
    for i in 0..=READERS {
        let (store, inv) = redis_pair(&url, "bench-prop", &channel).await?;
        caches.push(replica(format!("prop-redis-{i}"), &source, store, inv).await?);
    }
    propagation_section(&mut section, &caches, flips, "Redis pub/sub", 5_000.0).await?;
    drop(caches);

    let url = servers.memcached_url()?;
    let poll = Duration::from_millis(100);
    let ns = format!("bench-prop-{:x}", fastrand::u32(..));
    let mut caches = Vec::new();
    for i in 0..=READERS {
        let store = MemcachedStore::builder()
            .server(&url)
            .namespace(&ns)
            .build()
            .await
            .map_err(err)?;
        let inv = MemcachedInvalidator::new(&store).poll_interval(poll);
        caches.push(replica(format!("prop-memcached-{i}"), &source, store, inv).await?);
    }
    let bound = (poll + Duration::from_millis(20)).as_secs_f64() * 1e6;
    propagation_section(
        &mut section,
        &caches,
        flips,
        "Memcached log, 100 ms poll",
        bound,
    )
    .await?;
    Ok(section)
}

/// Cache down: Redis is killed a third of the way through (and the control plane
/// goes down with it); `FlagCache` keeps answering from fail-safe, against a raw GET
/// per evaluation. Uses its own Redis.
pub async fn cache_down(plan: Plan) -> Res<Section> {
    const REPLICAS: usize = 4;
    const TASKS: usize = 16;
    const FLAGS: usize = 50;
    let l2_timeout = Duration::from_millis(50);
    let run_for = plan.secs(6.0, 1.5);
    let scenario = format!("cache down, {REPLICAS}×{TASKS} tasks, Redis killed at ⅓");
    let mut server = tokio::task::block_in_place(RedisServer::start).map_err(err)?;
    let url = server.url();
    let mut section = Section::default();
    let source = Source::new(Duration::from_millis(2));
    let keys: Vec<FlagKey> = (0..FLAGS)
        .map(|i| key(&format!("down.{i}")))
        .collect::<Res<_>>()?;
    for k in &keys {
        source.set(k, payload(300), Version::new(1));
    }
    let mut caches = Vec::new();
    for i in 0..REPLICAS {
        let (store, inv) = redis_pair(&url, "bench-down", "bench-down").await?;
        let cache = FlagCache::<String>::builder(store, source.loader())
            .name(format!("down-{i}"))
            .invalidator(inv)
            .fresh_for(Duration::from_millis(200))
            .max_staleness(Duration::from_secs(600))
            .l2_timeout(l2_timeout)
            .loader_timeout(l2_timeout)
            .circuit_breaker(3, Duration::from_secs(1))
            .build()
            .await
            .map_err(err)?;
        cache.warm(&keys).await;
        caches.push(cache);
    }
    let start = Instant::now();
    let kill_at = start + run_for / 3;
    let deadline = start + run_for;
    let handles: Vec<_> = (0..REPLICAS * TASKS)
        .map(|t| {
            let (cache, keys) = (caches[t % REPLICAS].clone(), keys.clone());
            tokio::spawn(async move {
                let mut after = Samples::default();
                let mut fail_safe = Samples::default();
                let (mut errors, mut timeouts) = (0u64, 0u64);
                let mut rng = fastrand::Rng::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let got = cache.lookup(&keys[rng.usize(..FLAGS)]).await;
                    let took = t.elapsed();
                    if t >= kill_at {
                        after.push(took);
                        if took >= l2_timeout {
                            timeouts += 1;
                        }
                        match got {
                            Ok(l) if l.status == CacheStatus::Stale(StaleReason::FailSafe) => {
                                fail_safe.push(took)
                            }
                            Ok(_) => {}
                            Err(_) => errors += 1,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                (after, fail_safe, errors, timeouts)
            })
        })
        .collect();
    tokio::time::sleep_until(kill_at.into()).await;
    server.stop();
    source.go_down();
    let (mut after, mut fail_safe, mut errors, mut timeouts) =
        (Samples::default(), Samples::default(), 0, 0);
    for h in handles {
        let (a, f, e, t) = h.await.map_err(err)?;
        after.extend(a);
        fail_safe.extend(f);
        errors += e;
        timeouts += t;
    }
    let served = after.len();
    let fail_safe_count = fail_safe.len();
    let fs = fail_safe.summary();
    section.checks.push(
        Check::at_most(
            "cache down: failed evaluations",
            errors as f64,
            0.0,
            "reads",
        )
        .correctness(),
    );
    section.rows.push(
        Row::new(&scenario, "FlagCache, fail-safe answers", fs)
            .count("evaluations after kill", served as f64)
            .count("fail-safe", fail_safe_count as f64)
            .count("paid a timeout", timeouts as f64)
            .count("errors", errors as f64),
    );
    section.rows.push(
        Row::new(
            &scenario,
            "FlagCache, every evaluation after kill",
            after.summary(),
        )
        .count("evaluations after kill", served as f64),
    );
    drop(caches);

    // Baseline: a raw GET per evaluation, with the same 50 ms limit.
    tokio::task::block_in_place(|| server.restart()).map_err(err)?;
    let client = redis::Client::open(url.as_str()).map_err(err)?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(err)?;
    let start = Instant::now();
    let kill_at = start + run_for / 3;
    let deadline = start + run_for;
    let handles: Vec<_> = (0..REPLICAS * TASKS)
        .map(|_| {
            let mut conn = conn.clone();
            tokio::spawn(async move {
                let mut after = Samples::default();
                let (mut errors, mut timeouts) = (0u64, 0u64);
                let mut rng = fastrand::Rng::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let name = format!("down.{}", rng.usize(..FLAGS));
                    let got = tokio::time::timeout(
                        l2_timeout,
                        redis::AsyncCommands::get::<_, Option<Vec<u8>>>(&mut conn, name),
                    )
                    .await;
                    let took = t.elapsed();
                    if t >= kill_at {
                        after.push(took);
                        match got {
                            Ok(Ok(_)) => {}
                            Ok(Err(_)) => errors += 1,
                            Err(_) => {
                                errors += 1;
                                timeouts += 1;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                (after, errors, timeouts)
            })
        })
        .collect();
    tokio::time::sleep_until(kill_at.into()).await;
    server.stop();
    let (mut after, mut errors, mut timeouts) = (Samples::default(), 0, 0);
    for h in handles {
        let (a, e, t) = h.await.map_err(err)?;
        after.extend(a);
        errors += e;
        timeouts += t;
    }
    let served = after.len();
    section.rows.insert(
        0,
        Row::new(&scenario, "raw redis-rs GET, 50 ms limit", after.summary())
            .count("evaluations after kill", served as f64)
            .count("paid a timeout", timeouts as f64)
            .count("errors", errors as f64),
    );
    Ok(section)
}

/// L1 hit: `FlagCache::get` of a warm key against a bare `quick_cache` get of the same
/// kind of entry, 1,000 keys in random order, best of 5 rounds. (The criterion bench
/// `l1_hit` measures the same with more care; this puts the ratio in the same report.)
pub async fn l1_hit(plan: Plan) -> Res<Section> {
    const KEYS: usize = 1_000;
    let rounds = 5;
    let per_round = plan.n(2_000_000, 20_000);
    let keys: Vec<FlagKey> = (0..KEYS)
        .map(|i| key(&format!("flag.key.{i}")))
        .collect::<Res<_>>()?;
    let mut rng = fastrand::Rng::with_seed(7);
    let order: Vec<usize> = (0..4096).map(|_| rng.usize(..KEYS)).collect();
    let quick = quick_cache::sync::Cache::<FlagKey, (Arc<String>, u64)>::new(10_000);
    for k in &keys {
        quick.insert(k.clone(), (Arc::new(payload(100)), 1));
    }
    let source = Source::new(Duration::ZERO);
    for k in &keys {
        source.set(k, payload(100), Version::new(1));
    }
    let cache = FlagCache::<String>::builder(flagcache_memory::MemoryStore::new(), source.loader())
        .fresh_for(Duration::from_secs(3600))
        .l1_capacity(10_000)
        .build()
        .await
        .map_err(err)?;
    cache.warm(&keys).await;
    let mut best = [f64::MAX, f64::MAX, f64::MAX];
    for _ in 0..rounds {
        let t = Instant::now();
        for i in 0..per_round {
            match quick.get(&keys[order[i % order.len()]]) {
                Some(value) => {
                    std::hint::black_box(value);
                }
                None => return Err("a quick_cache read missed".into()),
            }
        }
        best[0] = best[0].min(t.elapsed().as_nanos() as f64 / per_round as f64);
        // Awaited inside async code, as an application calls it; every hit is ready,
        // so the loop's future is polled once and no runtime is measured.
        let t = Instant::now();
        let reads = async {
            for i in 0..per_round {
                match cache.get(&keys[order[i % order.len()]]).await {
                    Ok(Some(value)) => {
                        std::hint::black_box(value);
                    }
                    _ => return Err("an L1 read did not hit".to_string()),
                }
            }
            Ok(())
        };
        reads
            .now_or_never()
            .ok_or("an L1 hit waited for something")??;
        best[1] = best[1].min(t.elapsed().as_nanos() as f64 / per_round as f64);
        let t = Instant::now();
        for i in 0..per_round {
            match cache.get_cached(&keys[order[i % order.len()]]) {
                Some(Some(value)) => {
                    std::hint::black_box(value);
                }
                _ => return Err("an L1 read did not hit".into()),
            }
        }
        best[2] = best[2].min(t.elapsed().as_nanos() as f64 / per_round as f64);
    }
    let mut section = Section::default();
    for (name, ns) in [
        ("bare quick_cache get", best[0]),
        ("FlagCache::get, L1 hit", best[1]),
        ("FlagCache::get_cached (sync), L1 hit", best[2]),
    ] {
        let mut s = Samples::default();
        s.push(Duration::from_nanos(ns as u64));
        section
            .rows
            .push(Row::new("L1 hit, 1 thread, best of 5", name, s.summary()));
    }
    section.checks.push(Check::at_most(
        "L1 hit (get) ÷ bare quick_cache get",
        best[1] / best[0],
        1.5,
        "×",
    ));
    section.checks.push(Check::at_most(
        "L1 hit (get_cached) ÷ bare quick_cache get",
        best[2] / best[0],
        1.5,
        "×",
    ));
    Ok(section)
}
