//! A group of devices sharing one UDP socket and one task.
//!
//! The group keeps every timer of its devices itself: a heap of send times and a queue of ack
//! deadlines, behind one persistent tokio timer, so a fleet costs one task wake per batch of
//! due work rather than one per datagram and per ack. Acks arriving on the shared socket are
//! handed to their device by the device id in the ack's header (each device then checks the
//! tag with its own key). A group of one is a device with its own socket and address, as a
//! real fleet looks to the gateway; larger groups (`--devices-per-socket`) let one simulator
//! process offer rates near the host's limits.
//!
//! Emits: nothing; each device's outcome goes into its report.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::SentReading;
use crate::device::{Behaviour, Device, Next, Out, Retransmit};
use crate::report::DeviceReport;

/// Most acks read from the socket in one wake before timers get their turn.
const RECV_BURST: usize = 256;

/// Most sends in one wake before cancellation gets a look in (acks wait until fewer are due).
const SEND_BURST: usize = 1024;

/// Devices sharing a socket.
pub(crate) struct Group {
    socket: UdpSocket,
    devices: Vec<Device>,
    /// Device id to index in `devices`.
    index: HashMap<u32, usize>,
    /// When each device sends next (earliest first).
    sends: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Ack deadlines `(when, device, seq, tries)`, in deadline order since every deadline is
    /// "now + ack timeout"; entries whose datagram was acknowledged since are skipped.
    deadlines: VecDeque<(Instant, usize, u64, u32)>,
    /// Datagrams of all devices waiting for an ack.
    in_flight: usize,
    /// Devices that still have something to send (replaying devices finish).
    active: usize,
    b: Behaviour,
    out: Out,
}

impl Group {
    pub(crate) fn new(socket: UdpSocket, devices: Vec<Device>, b: Behaviour) -> Self {
        let index = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.spec.id.0, i))
            .collect();
        Self {
            socket,
            devices,
            index,
            sends: BinaryHeap::new(),
            deadlines: VecDeque::new(),
            in_flight: 0,
            active: 0,
            b,
            out: Vec::new(),
        }
    }

    /// Sends until `until` (or cancellation), then waits for outstanding acks (retransmitting)
    /// until they arrive, retries run out, or `cancel` fires. Control sessions, when
    /// configured, run beside the telemetry as one task per device and end with it.
    pub(crate) async fn run(
        mut self,
        until: Option<Instant>,
        cancel: CancellationToken,
    ) -> Vec<(DeviceReport, Vec<SentReading>)> {
        let stop_control = cancel.child_token();
        let mut control = JoinSet::new();
        if let Some(target) = self.b.control.clone() {
            for d in &self.devices {
                let session = crate::control::run(
                    d.spec.id,
                    d.keys.clone(),
                    self.b.persist_keys.clone(),
                    target.clone(),
                    d.live.clone(),
                    self.b.progress.clone(),
                    self.b.seed,
                    stop_control.clone(),
                );
                let id = d.spec.id.0;
                control.spawn(async move { (id, session.await) });
            }
        }
        self.telemetry(until, &cancel).await;
        stop_control.cancel();
        let mut reports: Vec<_> = self.devices.into_iter().map(Device::finish).collect();
        while let Some(joined) = control.join_next().await {
            match joined {
                Ok((id, c)) => {
                    if let Some(&i) = self.index.get(&id) {
                        let r = &mut reports[i].0;
                        r.control_sessions = c.sessions;
                        r.control_failures = c.failures;
                        r.commands = c.commands;
                        r.files = c.files;
                        r.key_rotations = c.key_rotations;
                    }
                }
                Err(e) => tracing::error!(error = %e, "control session task failed"),
            }
        }
        reports
    }

    async fn telemetry(&mut self, until: Option<Instant>, cancel: &CancellationToken) {
        let start = Instant::now();
        for i in 0..self.devices.len() {
            if let Some(at) = self.devices[i].first_send(start) {
                self.sends.push(Reverse((at, i)));
                self.active += 1;
            }
        }
        let mut sending = true;
        let timer = tokio::time::sleep_until(start);
        tokio::pin!(timer);
        let mut armed = start;
        let mut buf = [0u8; 64];
        loop {
            if sending && self.active == 0 {
                // Every replaying device has sent its last reading.
                sending = false;
                for i in 0..self.devices.len() {
                    self.devices[i].flush_held(&mut self.out);
                    self.flush(i).await;
                }
            }
            if !sending && self.in_flight == 0 {
                break;
            }
            let next = [
                self.sends.peek().map(|r| r.0.0).filter(|_| sending),
                self.deadlines.front().map(|d| d.0),
                until.filter(|_| sending),
            ]
            .into_iter()
            .flatten()
            .min();
            if let Some(at) = next
                && at != armed
            {
                timer.as_mut().reset(at);
                armed = at;
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = &mut timer, if next.is_some() => {
                    let now = Instant::now();
                    if sending && until.is_some_and(|u| u <= now) {
                        sending = false;
                        for i in 0..self.devices.len() {
                            self.devices[i].flush_held(&mut self.out);
                            self.flush(i).await;
                        }
                    }
                    if sending {
                        self.send_due(now).await;
                    }
                    self.retransmit_due(now).await;
                }
                ready = self.socket.readable() => {
                    if ready.is_ok() {
                        self.receive(&mut buf, sending);
                    }
                }
            }
        }
        for i in 0..self.devices.len() {
            self.devices[i].flush_held(&mut self.out);
            self.flush(i).await;
        }
    }

    /// Sends for every device whose time has come (at most a burst: an unpaced replay has
    /// everything due at once, and cancellation must get a look in) and schedules its next send.
    async fn send_due(&mut self, now: Instant) {
        let mut burst = 0;
        while let Some(&Reverse((at, i))) = self.sends.peek() {
            if at > now || burst == SEND_BURST {
                break;
            }
            burst += 1;
            self.sends.pop();
            if let Some(seq) = self.devices[i].send_next(now, &mut self.out) {
                self.deadlines
                    .push_back((now + self.b.ack_timeout, i, seq, 1));
                self.in_flight += 1;
            }
            self.flush(i).await;
            match self.devices[i].next_send(at, now) {
                Next::At(next) => self.sends.push(Reverse((next, i))),
                // Back in `sends` when an ack (or giving up) makes room.
                Next::Blocked => {}
                Next::Done => self.active -= 1,
            }
        }
    }

    async fn retransmit_due(&mut self, now: Instant) {
        while let Some(&(at, i, seq, tries)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            match self.devices[i].retransmit(seq, tries, now, &mut self.out) {
                Retransmit::Again(tries) => {
                    self.deadlines
                        .push_back((now + self.b.ack_timeout, i, seq, tries));
                    self.flush(i).await;
                }
                Retransmit::GaveUp => {
                    self.in_flight -= 1;
                    if self.devices[i].unblocked() {
                        self.sends.push(Reverse((now, i)));
                    }
                }
                Retransmit::Stale => {}
            }
        }
    }

    /// Reads the acks waiting on the socket, up to a burst; a replaying device blocked on its
    /// window is scheduled again when one of its datagrams settles.
    fn receive(&mut self, buf: &mut [u8], sending: bool) {
        for _ in 0..RECV_BURST {
            let n = match self.socket.try_recv(buf) {
                Ok(n) => n,
                Err(_) => return,
            };
            let datagram = &buf[..n];
            let Some(device) = proto::Ack::peek_device(datagram) else {
                continue;
            };
            let Some(&i) = self.index.get(&device.0) else {
                continue;
            };
            if self.devices[i].on_ack(datagram) {
                self.in_flight -= 1;
                if sending && self.devices[i].unblocked() {
                    self.sends.push(Reverse((Instant::now(), i)));
                }
            }
        }
    }

    /// Sends what device `i` queued.
    async fn flush(&mut self, i: usize) {
        for bytes in self.out.drain(..) {
            if self.socket.send(&bytes).await.is_err() {
                self.devices[i].report.send_errors += 1;
            }
        }
    }
}

/// How long a group's socket may take to drain the acks of one burst: the receive buffer asked
/// for shared sockets.
pub(crate) const SHARED_RECV_BUFFER: usize = 4 << 20;
