//! Contenders measured side by side: each runs one operation on N tasks, in many
//! short interleaved rounds, for its ops/s and its latency samples.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{err, Res};
use crate::report::Row;
use crate::stats::Samples;

type BoxFut = Pin<Box<dyn Future<Output = Res<()>> + Send>>;
/// One operation, given the index of the task running it.
pub(super) type Op = Arc<dyn Fn(usize) -> BoxFut + Send + Sync>;

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

/// The contenders of an L2-hit scenario: the raw client, `FlagCache`, the store
/// alone (which splits the overhead between the adapter and the cache).
pub(super) type Contenders = [(String, Op); 3];

/// Runs `contenders` on `tasks` tasks, interleaved in many short rounds so that drift
/// and the scheduler's luck hit all alike; a row per contender, and each one's
/// (ops/s, p50 µs).
pub(super) async fn measure(
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

/// An operation that reads the task's key, `keys[task % keys.len()]`, through its own
/// clone of `client`: `read(client, key)`.
pub(super) fn keyed_op<C, K, F, Fut>(client: C, keys: Vec<K>, read: F) -> Op
where
    C: Clone + Send + Sync + 'static,
    K: Clone + Send + Sync + 'static,
    F: Fn(C, K) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Res<()>> + Send + 'static,
{
    Arc::new(move |task| Box::pin(read(client.clone(), keys[task % keys.len()].clone())) as BoxFut)
}
