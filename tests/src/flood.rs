//! A hostile sender for the attack tests and the flood benchmark: random, oversized, truncated,
//! forged and replayed datagrams from one socket, as fast as one thread sends.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use anyhow::Context;
use proto::{Batch, DeviceKey, Flags, Header, Millis, Reading, SensorId, Seq};
use rand::{Rng, RngCore, SeedableRng};

/// What the flood sent, by kind.
#[derive(Debug, Default)]
pub struct FloodCounts {
    /// Random bytes of random length.
    pub random: AtomicU64,
    /// Longer than the protocol allows.
    pub oversized: AtomicU64,
    /// A sealed datagram cut short.
    pub truncated: AtomicU64,
    /// A real device's header, sealed with a wrong key.
    pub forged: AtomicU64,
    /// Sealed with the device's own key at a sequence it used long ago.
    pub replayed: AtomicU64,
}

impl FloodCounts {
    /// Everything sent.
    pub fn total(&self) -> u64 {
        [
            &self.random,
            &self.oversized,
            &self.truncated,
            &self.forged,
            &self.replayed,
        ]
        .iter()
        .map(|c| c.load(Relaxed))
        .sum()
    }
}

/// The kinds of hostile datagrams (see [`FloodCounts`]).
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Random bytes.
    Random,
    /// Too long.
    Oversized,
    /// Cut short.
    Truncated,
    /// Wrong key.
    Forged,
    /// Old sequence, right key.
    Replayed,
}

/// A pool of hostile datagrams: random bytes, oversized, truncated, forged (right header, wrong
/// key) and replayed (the device's own key, sequence numbers it used long ago).
pub fn flood_pool(
    devices: &[(proto::DeviceId, DeviceKey)],
    used: &BTreeMap<u32, (u64, u64)>,
) -> anyhow::Result<Vec<(Kind, Vec<u8>)>> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(66);
    let mut pool = Vec::new();
    let reading = |i: u64| Reading {
        sensor: SensorId(1),
        ts: Millis(1_764_000_000_000 + i),
        value: i as f64,
    };
    for i in 0..5000u64 {
        let (id, key) = &devices[i as usize % devices.len()];
        let id = *id;
        let kind = match i % 5 {
            0 => Kind::Random,
            1 => Kind::Oversized,
            2 => Kind::Truncated,
            3 => Kind::Forged,
            _ => Kind::Replayed,
        };
        let header = |seq: u64| Header {
            flags: Flags(Flags::ACK_REQUESTED),
            device: id,
            seq: Seq(seq),
        };
        let batch = Batch {
            readings: (0..rng.random_range(1..=20)).map(reading).collect(),
        };
        let d = match kind {
            Kind::Random => {
                let mut b = vec![0u8; rng.random_range(0..1400)];
                rng.fill_bytes(&mut b);
                b
            }
            Kind::Oversized => {
                let mut b = batch
                    .seal(&header(rng.random_range(0..1u64 << 62)), &key.cipher())?
                    .0;
                b.resize(rng.random_range(proto::MAX_DATAGRAM + 1..4000), 0xab);
                b
            }
            Kind::Truncated => {
                let b = batch
                    .seal(&header(rng.random_range(0..1u64 << 62)), &key.cipher())?
                    .0;
                b[..rng.random_range(0..b.len())].to_vec()
            }
            Kind::Forged => {
                let wrong = DeviceKey(rng.random());
                let (_, last) = used.get(&id.0).copied().unwrap_or((0, 0));
                // Sequences around and ahead of the device's own: only the key is wrong.
                batch
                    .seal(&header(last + rng.random_range(0..10_000)), &wrong.cipher())?
                    .0
            }
            Kind::Replayed => {
                let (first, _) = used.get(&id.0).copied().context("device not used")?;
                batch
                    .seal(&header(first + rng.random_range(0..16)), &key.cipher())?
                    .0
            }
        };
        pool.push((kind, d));
    }
    Ok(pool)
}

/// Sends the pool round and round from `socket` until `stop`; counts what went out.
pub fn flood(
    socket: &UdpSocket,
    to: SocketAddr,
    pool: &[(Kind, Vec<u8>)],
    counts: &FloodCounts,
    stop: &AtomicBool,
) {
    let mut i = 0usize;
    while !stop.load(Relaxed) {
        for _ in 0..256 {
            let (kind, d) = &pool[i % pool.len()];
            i += 1;
            if socket.send_to(d, to).is_ok() {
                match kind {
                    Kind::Random => &counts.random,
                    Kind::Oversized => &counts.oversized,
                    Kind::Truncated => &counts.truncated,
                    Kind::Forged => &counts.forged,
                    Kind::Replayed => &counts.replayed,
                }
                .fetch_add(1, Relaxed);
            }
        }
    }
}

/// A flood in progress: a thread sending a pool from its own address (127.0.0.2).
pub struct Flooder {
    socket: UdpSocket,
    counts: std::sync::Arc<FloodCounts>,
    stop: std::sync::Arc<AtomicBool>,
    thread: std::thread::JoinHandle<std::time::Duration>,
}

/// What a flood did.
#[derive(Debug)]
pub struct FloodOutcome {
    /// Datagrams sent, by kind.
    pub counts: std::sync::Arc<FloodCounts>,
    /// How long it ran.
    pub secs: f64,
    /// Bytes the attacker received back.
    pub answered: usize,
}

impl Flooder {
    /// Builds a pool against the devices of `fleet` (replaying sequences below those the
    /// simulator's `report` shows used) and starts sending it to `to`; returns once the flood
    /// is under way.
    ///
    /// # Errors
    /// An unreadable fleet file, a device the report does not show, or socket errors.
    pub fn start(
        fleet: &std::path::Path,
        report: &device_sim::Report,
        to: SocketAddr,
    ) -> anyhow::Result<Flooder> {
        let file = device_sim::fleet::FleetFile::load(fleet)?;
        let devices: Vec<_> = file
            .devices
            .iter()
            .map(|d| Ok((d.device_id(), d.device_key()?)))
            .collect::<anyhow::Result<_>>()?;
        let used: BTreeMap<u32, (u64, u64)> = report
            .devices
            .iter()
            .filter_map(|d| Some((d.id, (d.first_seq?, d.last_seq?))))
            .collect();
        for (id, (first, last)) in &used {
            anyhow::ensure!(
                last - first > 150,
                "device {id} used too few sequences to replay old ones"
            );
        }
        let pool = flood_pool(&devices, &used)?;
        let socket = UdpSocket::bind("127.0.0.2:0").context("binding 127.0.0.2")?;
        let counts = std::sync::Arc::new(FloodCounts::default());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread = {
            let socket = socket.try_clone()?;
            let (counts, stop) = (counts.clone(), stop.clone());
            std::thread::spawn(move || {
                let t0 = tokio::time::Instant::now();
                flood(&socket, to, &pool, &counts, &stop);
                t0.elapsed()
            })
        };
        let flooder = Flooder {
            socket,
            counts,
            stop,
            thread,
        };
        crate::wait_until(
            std::time::Duration::from_secs(10),
            "the flood under way",
            || Ok(flooder.counts.total() > 10_000),
        )?;
        Ok(flooder)
    }

    /// Stops the flood and collects what came back to the attacker.
    ///
    /// # Errors
    /// A panicked thread or socket errors.
    pub fn stop(self) -> anyhow::Result<FloodOutcome> {
        self.stop.store(true, Relaxed);
        let secs = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
            .as_secs_f64();
        self.socket.set_nonblocking(true)?;
        let mut answered = 0usize;
        let mut buf = [0u8; 2048];
        loop {
            match self.socket.recv_from(&mut buf) {
                Ok((n, _)) => answered += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(FloodOutcome {
            counts: self.counts,
            secs,
            answered,
        })
    }
}
