//! A lossy network between the simulator and the gateway, in user space: a UDP relay that
//! drops, duplicates, corrupts, delays and reorders datagrams in both directions (datagrams and
//! acks), for the fault suite on hosts whose kernel has no `netem` qdisc.
//!
//! Each client address gets its own upstream socket, so the gateway sees one source address
//! per device, as without the relay, and its acks find their way back.
//!
//! Emits: nothing; [`Relay::stop`] returns what it did.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;

/// What happens to each datagram, in each direction (the `netem` options of the same name).
#[derive(Debug, Clone)]
pub struct Impairment {
    /// Probability that it is dropped.
    pub loss: f64,
    /// Probability that a second copy is sent.
    pub duplicate: f64,
    /// Probability that one random bit of it is flipped.
    pub corrupt: f64,
    /// Base delay.
    pub delay: Duration,
    /// Uniform extra delay from 0 to this (datagrams overtake each other).
    pub jitter: Duration,
    /// Probability that it is sent at once, ahead of delayed ones.
    pub reorder: f64,
}

impl Impairment {
    /// The settings as `tc netem` would spell them.
    pub fn describe(&self) -> String {
        format!(
            "delay {:?} + 0..{:?}, loss {}%, duplicate {}%, corrupt {}%, reorder {}%",
            self.delay,
            self.jitter,
            self.loss * 100.0,
            self.duplicate * 100.0,
            self.corrupt * 100.0,
            self.reorder * 100.0
        )
    }
}

/// What the relay did, both directions together.
#[derive(Debug, Default)]
pub struct RelayCounts {
    /// Datagrams received from either side.
    pub received: AtomicU64,
    /// Dropped.
    pub lost: AtomicU64,
    /// Sent twice.
    pub duplicated: AtomicU64,
    /// Sent with a bit flipped.
    pub corrupted: AtomicU64,
    /// Sent at once, ahead of delayed ones.
    pub reordered: AtomicU64,
}

/// A running relay; clients send to [`Relay::addr`].
pub struct Relay {
    /// Where clients send.
    pub addr: SocketAddr,
    /// What it did so far.
    pub counts: Arc<RelayCounts>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on loopback towards `upstream`.
    ///
    /// # Errors
    /// Socket or runtime errors.
    pub fn start(upstream: SocketAddr, impairment: Impairment, seed: u64) -> anyhow::Result<Relay> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let front = rt.block_on(UdpSocket::bind("127.0.0.1:0"))?;
        let addr = front.local_addr()?;
        let counts = Arc::new(RelayCounts::default());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let c = counts.clone();
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                rt.block_on(run(Arc::new(front), upstream, impairment, seed, c, stopped));
            })
            .context("relay thread")?;
        Ok(Relay {
            addr,
            counts,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the relay (datagrams still delayed are dropped).
    pub fn stop(mut self) -> Arc<RelayCounts> {
        self.shutdown();
        self.counts.clone()
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One direction's impairment applied to one datagram: zero, one or two (possibly corrupted)
/// copies, each sent after its own delay.
fn impair(
    mut bytes: Vec<u8>,
    to: SocketAddr,
    via: &Arc<UdpSocket>,
    imp: &Impairment,
    rng: &mut SmallRng,
    counts: &RelayCounts,
) {
    counts.received.fetch_add(1, Relaxed);
    if rng.random_bool(imp.loss) {
        counts.lost.fetch_add(1, Relaxed);
        return;
    }
    if !bytes.is_empty() && rng.random_bool(imp.corrupt) {
        let bit = rng.random_range(0..bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        counts.corrupted.fetch_add(1, Relaxed);
    }
    let copies = if rng.random_bool(imp.duplicate) {
        counts.duplicated.fetch_add(1, Relaxed);
        2
    } else {
        1
    };
    for _ in 0..copies {
        let delay = if rng.random_bool(imp.reorder) {
            counts.reordered.fetch_add(1, Relaxed);
            Duration::ZERO
        } else {
            imp.delay + imp.jitter.mul_f64(rng.random_range(0.0..1.0))
        };
        let via = via.clone();
        let bytes = bytes.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _ = via.send_to(&bytes, to).await;
        });
    }
}

async fn run(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    imp: Impairment,
    seed: u64,
    counts: Arc<RelayCounts>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, client) = tokio::select! {
            _ = &mut stopped => return,
            r = front.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let up = match clients.get(&client) {
            Some(up) => up.clone(),
            None => {
                let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                let up = Arc::new(up);
                clients.insert(client, up.clone());
                // The way back: the gateway's answers to this client, impaired the same way.
                let (up2, front2, imp2, counts2) =
                    (up.clone(), front.clone(), imp.clone(), counts.clone());
                let mut rng2 = SmallRng::seed_from_u64(seed ^ u64::from(client.port()));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, _)) = up2.recv_from(&mut buf).await {
                        impair(
                            buf[..n].to_vec(),
                            client,
                            &front2,
                            &imp2,
                            &mut rng2,
                            &counts2,
                        );
                    }
                });
                up
            }
        };
        impair(buf[..n].to_vec(), upstream, &up, &imp, &mut rng, &counts);
    }
}
