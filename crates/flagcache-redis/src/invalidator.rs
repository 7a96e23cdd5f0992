//! Invalidation over Redis pub/sub ([`RedisInvalidator`]): sequence-numbered events,
//! heartbeats for a short window after a node's last event (they reveal a lost last
//! event), and subscriptions that reconnect and signal `Resync`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flagcache_core::{
    now_ms, Codec, Invalidation, Invalidator, NodeId, Result, ResyncReason, Signal, Subscription,
};
use futures_util::StreamExt;
use tokio::sync::{mpsc, Mutex};

use crate::connection::{answers_ping, Connection};
use crate::foreign::{ForeignFilter, ForeignMessages};
use crate::target::{connection_methods, Target};

const HEARTBEAT_MAGIC: [u8; 3] = [0xF1, 0xA8, 0x01];

/// What travels on the channel besides events: "node `origin` has published `seq`
/// events so far". It proves the subscription alive, and reveals a lost *last* event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Heartbeat {
    origin: NodeId,
    seq: u64,
}

fn encode_heartbeat(codec: &Codec, hb: Heartbeat) -> Vec<u8> {
    match codec {
        Codec::Json(_) => {
            format!(r#"{{"heartbeat":"{}","seq":{}}}"#, hb.origin, hb.seq).into_bytes()
        }
        _ => {
            let mut b = HEARTBEAT_MAGIC.to_vec();
            b.extend_from_slice(&hb.origin.0.to_be_bytes());
            b.extend_from_slice(&hb.seq.to_be_bytes());
            b
        }
    }
}

fn decode_heartbeat(bytes: &[u8]) -> Option<Heartbeat> {
    if let Some(rest) = bytes.strip_prefix(&HEARTBEAT_MAGIC) {
        if rest.len() != 16 {
            return None;
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&rest[..8]);
        let origin = NodeId(u64::from_be_bytes(a));
        a.copy_from_slice(&rest[8..]);
        return Some(Heartbeat {
            origin,
            seq: u64::from_be_bytes(a),
        });
    }
    // {"heartbeat":"<hex>","seq":N}: a tiny fixed shape, parsed without a JSON crate.
    let text = std::str::from_utf8(bytes).ok()?;
    let rest = text.trim().strip_prefix(r#"{"heartbeat":""#)?;
    let (hex, rest) = rest.split_once('"')?;
    let seq = rest.strip_prefix(r#","seq":"#)?.strip_suffix('}')?;
    Some(Heartbeat {
        origin: NodeId(u64::from_str_radix(hex, 16).ok()?),
        seq: seq.trim().parse().ok()?,
    })
}

/// Configures a [`RedisInvalidator`].
#[derive(Debug, Clone)]
pub struct RedisInvalidatorBuilder {
    target: Target,
    channel: String,
    codec: Codec,
    heartbeat: Option<Duration>,
    heartbeat_set: bool,
    heartbeat_window: Duration,
    foreign: ForeignMessages,
}

impl Default for RedisInvalidatorBuilder {
    fn default() -> Self {
        RedisInvalidatorBuilder {
            target: Target::default(),
            channel: "flag_updates".to_string(),
            codec: Codec::default(),
            heartbeat: Some(Duration::from_secs(1)),
            heartbeat_set: false,
            heartbeat_window: DEFAULT_HEARTBEAT_WINDOW,
            foreign: ForeignMessages::default(),
        }
    }
}

impl RedisInvalidatorBuilder {
    connection_methods!();

    /// The pub/sub channel (default `flag_updates`).
    #[must_use]
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// The message format: the core envelope codec (default) or `JsonCodec` for
    /// `{"flagKey": "…", "version": N}`, to interoperate with other languages.
    #[must_use]
    pub fn codec(mut self, codec: impl Into<Codec>) -> Self {
        self.codec = codec.into();
        self
    }

    /// How often a subscription checks its connection (PING) and, for a
    /// [window](Self::heartbeat_window) after each event this node publishes, how often
    /// it publishes a heartbeat carrying its event count, which reveals a lost last
    /// event to every subscriber. Default 1 s. `None` keeps the PING (every second)
    /// but sends no heartbeats — the default with `JsonCodec`, whose channel other
    /// languages' subscribers share.
    #[must_use]
    pub fn heartbeat(mut self, every: Option<Duration>) -> Self {
        self.heartbeat = every;
        self.heartbeat_set = true;
        self
    }

    /// How long after its last event a node goes on sending heartbeats (default 5 s):
    /// a lost last event is revealed by the first heartbeat after it (within one
    /// [heartbeat](Self::heartbeat) period), and the ones after it cover a lost
    /// heartbeat. Past the window the node is silent, so an idle fleet sends nothing
    /// and its background traffic is its subscriptions' PINGs alone — one per
    /// subscriber per period, growing with the fleet's size N, where heartbeats
    /// forever would cost every publisher's heartbeat delivered to every subscriber
    /// (N²). A window shorter than the period still sends one heartbeat.
    ///
    /// ```no_run
    /// # async fn f() -> flagcache::Result<()> {
    /// use std::time::Duration;
    /// use flagcache::redis::RedisInvalidator;
    ///
    /// let bus = RedisInvalidator::builder()
    ///     .url("redis://127.0.0.1:6379")
    ///     .heartbeat(Some(Duration::from_millis(500)))
    ///     .heartbeat_window(Duration::from_secs(3))
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn heartbeat_window(mut self, window: Duration) -> Self {
        self.heartbeat_window = window;
        self
    }

    /// What subscribers do with messages on the channel that are not invalidations
    /// (default [`ForeignMessages::Resync`]; see [`ForeignMessages`] for which to pick).
    #[must_use]
    pub fn foreign_messages(mut self, policy: ForeignMessages) -> Self {
        self.foreign = policy;
        self
    }

    /// Connects, authenticates and PINGs the publishing connection, and subscribes to
    /// the channel once (then lets go), so a channel the ACL user may not use is found
    /// now.
    ///
    /// # Errors
    /// As for `RedisStoreBuilder::build`; a permanent `Error::Backend` (`NOPERM`) when
    /// the ACL user may not use the channel.
    pub async fn build(self) -> Result<RedisInvalidator> {
        let connection = Connection::open(self.target, &[]).await?;
        // Subscribing once now finds a channel the ACL user may not use.
        drop(connection.subscribe(&self.channel, 0).await?);
        let heartbeat = match (&self.codec, self.heartbeat_set) {
            (Codec::Json(_), false) => None,
            _ => self.heartbeat,
        };
        Ok(RedisInvalidator {
            inner: Arc::new(Inner {
                connection,
                channel: self.channel,
                codec: self.codec,
                heartbeat,
                heartbeat_window: self.heartbeat_window,
                node: NodeId::random(),
                send: Mutex::new(0),
                beats: std::sync::Mutex::default(),
                foreign: ForeignFilter::new(self.foreign),
            }),
        })
    }
}

/// How long a node heartbeats after its last event, by default.
const DEFAULT_HEARTBEAT_WINDOW: Duration = Duration::from_secs(5);

/// When this node last published an event, and whether its heartbeat task runs.
#[derive(Debug, Default)]
struct Beats {
    last_event: Option<Instant>,
    running: bool,
}

struct Inner {
    connection: Connection,
    channel: String,
    codec: Codec,
    heartbeat: Option<Duration>,
    heartbeat_window: Duration,
    node: NodeId,
    /// The last sequence number assigned. Held while sending, so that this node's
    /// messages leave in sequence order and a heartbeat never overtakes an event.
    send: Mutex<u64>,
    /// The heartbeat window's state (a plain lock: never held across an await).
    beats: std::sync::Mutex<Beats>,
    /// What subscriptions do with foreign messages, and how many they ignored.
    foreign: ForeignFilter,
}

/// An [`Invalidator`] over Redis pub/sub.
///
/// Pub/sub is fire-and-forget, so every event carries its publisher's node id and a
/// per-publisher sequence number; subscribers signal `Resync` on a gap. For a short
/// [window](RedisInvalidatorBuilder::heartbeat_window) after each event it publishes, a
/// node also publishes heartbeats carrying its count of events, which reveal a lost
/// last event; an idle node sends none. Each subscription PINGs its own connection, so
/// a silently dead subscription is noticed without anyone's traffic. A subscription
/// reconnects by itself and signals `Resync` before any event received after the
/// reconnection.
///
/// Built as every adapter's invalidator is: [`builder`](RedisInvalidator::builder),
/// its settings, `build()` — or [`connect`](RedisInvalidator::connect) with the
/// defaults; [`peer`](RedisInvalidator::peer) adds another node on the same channel.
/// Clones are the same node.
#[derive(Clone)]
pub struct RedisInvalidator {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisInvalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisInvalidator")
            .field("node", &self.inner.node)
            .field("channel", &self.inner.channel)
            .field("target", self.inner.connection.target())
            .field("heartbeat", &self.inner.heartbeat)
            .field("heartbeat_window", &self.inner.heartbeat_window)
            .finish_non_exhaustive()
    }
}

impl RedisInvalidator {
    /// Configures an invalidator.
    pub fn builder() -> RedisInvalidatorBuilder {
        RedisInvalidatorBuilder::default()
    }

    /// Connects to one server with default settings.
    ///
    /// # Errors
    /// As for [`RedisInvalidatorBuilder::build`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder().url(url).build().await
    }

    /// Another node on the same channel and server, with its own node id and sequence
    /// (a simulated replica in tests). It publishes over this node's connection; its
    /// subscriptions open their own, as every subscription does.
    pub fn peer(&self) -> Self {
        RedisInvalidator {
            inner: Arc::new(Inner {
                connection: self.inner.connection.clone(),
                channel: self.inner.channel.clone(),
                codec: self.inner.codec.clone(),
                heartbeat: self.inner.heartbeat,
                heartbeat_window: self.inner.heartbeat_window,
                node: NodeId::random(),
                send: Mutex::new(0),
                beats: std::sync::Mutex::default(),
                foreign: ForeignFilter::new(self.inner.foreign.policy()),
            }),
        }
    }

    /// The pub/sub channel it publishes and subscribes on.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// How many foreign messages this node's subscriptions ignored under
    /// [`ForeignMessages::Ignore`] (also counted as
    /// `flagcache_foreign_messages_ignored_total{backend="redis"}`).
    pub fn foreign_messages_ignored(&self) -> u64 {
        self.inner.foreign.ignored()
    }

    async fn send(&self, payload: Vec<u8>) -> Result<()> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.inner.channel).arg(payload);
        let _: i64 = self.inner.connection.query("publish", &cmd).await?;
        Ok(())
    }

    /// Notes an event just published and starts the heartbeat task unless it runs.
    fn event_sent(&self) {
        let Some(every) = self.inner.heartbeat else {
            return;
        };
        let mut beats = self
            .inner
            .beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        beats.last_event = Some(Instant::now());
        if !beats.running {
            beats.running = true;
            tokio::spawn(heartbeats(Arc::downgrade(&self.inner), every));
        }
    }

    /// Publishes "this node has sent N events" — only once it has sent any.
    async fn publish_heartbeat(&self) -> Result<()> {
        let guard = self.inner.send.lock().await;
        if *guard == 0 {
            return Ok(());
        }
        let hb = Heartbeat {
            origin: self.inner.node,
            seq: *guard,
        };
        self.send(encode_heartbeat(&self.inner.codec, hb)).await
    }
}

#[async_trait]
impl Invalidator for RedisInvalidator {
    fn node_id(&self) -> NodeId {
        self.inner.node
    }

    fn transport(&self) -> &'static str {
        "pubsub"
    }

    async fn publish(&self, event: &Invalidation) -> Result<()> {
        let mut last = self.inner.send.lock().await;
        let seq = *last + 1;
        let stamped = event.clone().stamped(self.inner.node, seq, now_ms());
        let payload = self.inner.codec.encode_invalidation(&stamped)?;
        // The number is spent even if sending fails: a subscriber may have received
        // it, and the heartbeats that follow carry it.
        *last = seq;
        self.event_sent();
        self.send(payload.to_vec()).await
    }

    async fn subscribe(&self) -> Result<Subscription> {
        let pubsub = self
            .inner
            .connection
            .subscribe(&self.inner.channel, 0)
            .await?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(listen(self.clone(), pubsub, tx));
        Ok(Subscription::from_receiver(rx))
    }
}

/// Publishes a heartbeat every `every` until the window after the node's last event
/// has passed (then the task ends; the next event starts another) or the node is gone.
async fn heartbeats(inner: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        {
            let mut beats = inner
                .beats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // The first heartbeat after an event always goes out, whatever the window.
            let quiet_for = beats.last_event.map_or(Duration::MAX, |at| at.elapsed());
            if quiet_for > inner.heartbeat_window.max(every) {
                beats.running = false;
                return;
            }
        }
        let node = RedisInvalidator { inner };
        if let Err(e) = node.publish_heartbeat().await {
            tracing::debug!(error = %e, "heartbeat not published");
        }
    }
}

/// Per-publisher sequence tracking.
#[derive(Default)]
struct Sequences {
    last: HashMap<NodeId, (u64, Instant)>,
}

impl Sequences {
    /// Notes `seq` from `origin`; returns the gap, if it reveals one.
    fn note(&mut self, origin: NodeId, seq: u64, heartbeat: bool) -> Option<ResyncReason> {
        if origin == NodeId::UNKNOWN || seq == 0 {
            return None;
        }
        self.prune();
        let now = Instant::now();
        let prev = self.last.insert(origin, (seq, now)).map(|(s, _)| s);
        match prev {
            // A heartbeat says how many events the publisher has sent: more than we saw
            // means some were lost.
            Some(p) if heartbeat && seq > p => Some(ResyncReason::SequenceGap {
                origin,
                expected: p + 1,
                got: seq,
            }),
            Some(p) if !heartbeat && seq > p + 1 => Some(ResyncReason::SequenceGap {
                origin,
                expected: p + 1,
                got: seq,
            }),
            Some(p) if seq < p => {
                // Older than what we saw (a late heartbeat, a reordering): keep the max.
                self.last.insert(origin, (p, now));
                None
            }
            _ => None,
        }
    }

    /// Bounds the table: publishers not heard from for an hour are forgotten (their
    /// next event is then a first sight).
    fn prune(&mut self) {
        if self.last.len() > 4096 {
            self.last
                .retain(|_, (_, at)| at.elapsed() < Duration::from_secs(3600));
        }
    }
}

/// Reads the subscription, turning messages into signals, until the `Subscription`
/// is dropped. Every interval it PINGs the subscribed connection (a silent dead
/// subscription is noticed without any traffic from others). When the connection is lost or
/// falls silent it signals `Resync` at once, reconnects (rotating through the nodes it
/// was given), and signals `Resync` again before any event received afterwards.
async fn listen(inv: RedisInvalidator, pubsub: redis::aio::PubSub, tx: mpsc::Sender<Signal>) {
    let codec = inv.inner.codec.clone();
    let channel = inv.inner.channel.clone();
    let every = inv.inner.heartbeat.unwrap_or(Duration::from_secs(1));
    let connection = &inv.inner.connection;
    let reply_limit = connection.target().response_timeout.max(every);
    let mut seqs = Sequences::default();
    let mut pubsub = pubsub;
    let mut attempt = 0usize;
    loop {
        let (mut sink, mut stream) = pubsub.split();
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let reason = loop {
            tokio::select! {
                biased;
                _ = tx.closed() => return,
                msg = stream.next() => {
                    let Some(msg) = msg else { break ResyncReason::Reconnected };
                    for signal in decode(&codec, &inv.inner.foreign, &mut seqs, msg.get_payload_bytes()) {
                        if tx.send(signal).await.is_err() {
                            return;
                        }
                    }
                }
                _ = ticker.tick() => {
                    if !answers_ping(&mut sink, reply_limit).await {
                        break ResyncReason::HeartbeatMissed;
                    }
                }
            }
        };
        drop((sink, stream));
        tracing::warn!(%reason, %channel, "invalidation subscription lost; reconnecting");
        // Events may be missed from now on: tell the cache at once, not only when back.
        if tx.send(Signal::Resync(reason.clone())).await.is_err() {
            return;
        }
        let mut backoff = Duration::from_millis(50);
        pubsub = loop {
            tokio::select! {
                _ = tx.closed() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            attempt += 1;
            let opened = tokio::select! {
                _ = tx.closed() => return,
                r = tokio::time::timeout(
                    connection.target().call_limit(),
                    connection.subscribe(&channel, attempt),
                ) => r,
            };
            match opened {
                Ok(Ok(p)) => break p,
                Ok(Err(e)) => tracing::debug!(error = %e, "resubscribe failed"),
                Err(_) => tracing::debug!("resubscribe timed out"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        };
        // Anything published while we were away is lost: say so before any new event.
        seqs = Sequences::default();
        if tx.send(Signal::Resync(reason)).await.is_err() {
            return;
        }
    }
}

fn decode(
    codec: &Codec,
    foreign: &ForeignFilter,
    seqs: &mut Sequences,
    bytes: &[u8],
) -> Vec<Signal> {
    if let Some(hb) = decode_heartbeat(bytes) {
        return seqs
            .note(hb.origin, hb.seq, true)
            .map(Signal::Resync)
            .into_iter()
            .collect();
    }
    match codec.decode_invalidation(bytes) {
        Ok(ev) => {
            let mut out = Vec::with_capacity(2);
            if let Some(gap) = seqs.note(ev.origin, ev.seq, false) {
                out.push(Signal::Resync(gap));
            }
            out.push(Signal::Invalidated(ev));
            out
        }
        Err(e) => foreign.undecodable(codec, bytes, &e).into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_round_trip_in_both_layouts() {
        let hb = Heartbeat {
            origin: NodeId(0xdead_beef),
            seq: 42,
        };
        for codec in [
            Codec::default(),
            Codec::from(flagcache_core::JsonCodec::new()),
        ] {
            assert_eq!(decode_heartbeat(&encode_heartbeat(&codec, hb)), Some(hb));
        }
        assert_eq!(decode_heartbeat(br#"{"flagKey":"x"}"#), None);
        assert_eq!(decode_heartbeat(&[0xF1, 0xA8, 0x01, 1]), None);
    }

    #[test]
    fn gaps_are_detected_from_events_and_heartbeats() {
        let mut s = Sequences::default();
        let n = NodeId(7);
        assert_eq!(s.note(n, 5, false), None, "first sight: any number");
        assert_eq!(s.note(n, 6, false), None);
        assert!(matches!(
            s.note(n, 8, false),
            Some(ResyncReason::SequenceGap {
                expected: 7,
                got: 8,
                ..
            })
        ));
        assert_eq!(s.note(n, 8, true), None, "heartbeat agrees");
        assert!(
            matches!(s.note(n, 9, true), Some(ResyncReason::SequenceGap { .. })),
            "event 9 was lost"
        );
        assert_eq!(s.note(n, 10, false), None);
        assert_eq!(s.note(n, 9, true), None, "an older heartbeat is no gap");
        assert_eq!(s.note(n, 11, false), None);
        assert_eq!(
            s.note(NodeId::UNKNOWN, 99, false),
            None,
            "foreign publishers are not tracked"
        );
    }
}
