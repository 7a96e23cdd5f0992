//! Requests released at once through a gate, across replicas that each run on a
//! runtime of their own: the harness of the cold-key storm.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{err, Res};
use crate::stats::Samples;

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
pub(super) async fn storm<S: Clone + Send + 'static>(
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
