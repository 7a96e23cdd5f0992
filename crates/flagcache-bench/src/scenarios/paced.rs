//! Readers at a steady pace: tasks that each read in bursts (a few reads, then a
//! pause) until a deadline, timing every read. The rollout storm and the cache-down
//! scenario run their contenders and their baselines through it.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::{err, Res};

/// One task's reads: what a read does, and what the task keeps of each.
pub(super) trait Reader: Send + 'static {
    /// What one read returns.
    type Answer: Send;

    /// One read. The clock starts after this returns and stops when the future
    /// completes: work done here, before the future is first polled, is not timed.
    fn read(&mut self) -> impl Future<Output = Self::Answer> + Send + '_;

    /// Keeps a read that started at `at` and took `took`. An error ends the task, and
    /// the run with it.
    fn record(&mut self, at: Instant, took: Duration, answer: Self::Answer) -> Res<()>;
}

/// How the readers pace themselves: `reads` reads, then `pause`, until `until`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    pub reads: usize,
    pub pause: Duration,
    pub until: Instant,
}

/// Readers running, one task each.
#[derive(Debug)]
pub(super) struct Running<R>(Vec<JoinHandle<Res<R>>>);

/// Starts one task per reader.
pub(super) fn spawn<R: Reader>(readers: impl IntoIterator<Item = R>, pace: Pace) -> Running<R> {
    let tasks = readers
        .into_iter()
        .map(|mut reader| {
            tokio::spawn(async move {
                while Instant::now() < pace.until {
                    for _ in 0..pace.reads {
                        let read = reader.read();
                        let at = Instant::now();
                        let answer = read.await;
                        let took = at.elapsed();
                        reader.record(at, took, answer)?;
                    }
                    tokio::time::sleep(pace.pause).await;
                }
                Ok(reader)
            })
        })
        .collect();
    Running(tasks)
}

impl<R> Running<R> {
    /// Waits for every reader to reach the deadline; the readers, with what they kept.
    pub(super) async fn join(self) -> Res<Vec<R>> {
        let mut readers = Vec::with_capacity(self.0.len());
        for task in self.0 {
            readers.push(task.await.map_err(err)??);
        }
        Ok(readers)
    }
}
