//! Datagrams the kernel dropped before the gateway read them: the socket's receive buffer was
//! full (a burst larger than `telemetry.recv_buffer`, or the ingest task starved of CPU).
//!
//! Linux keeps a drop counter per socket and shows it in the last column of
//! `/proc/self/net/udp` (and `udp6`), on the line whose inode is the socket's. Reading it once
//! per report interval costs one small file read off the hot path and no change to how
//! datagrams are received. Elsewhere (or when the files cannot be read) the counter is simply
//! not available and nothing is counted.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::events::{Counters, DropReason};

/// Reads the kernel's drop counter of one socket.
#[derive(Debug, Clone)]
pub struct KernelDrops {
    inode: u64,
    table: &'static str,
}

impl KernelDrops {
    /// The counter of `socket`, or None when this system does not show it.
    pub fn of(socket: &impl AsRawFd, ipv6: bool) -> Option<Self> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).ok()?;
        let inode = socket_inode(link.to_str()?)?;
        let table = if ipv6 {
            "/proc/self/net/udp6"
        } else {
            "/proc/self/net/udp"
        };
        let me = Self { inode, table };
        // Only offer a reader that works now.
        me.read()?;
        Some(me)
    }

    /// The socket's drops since it was created, or None when it cannot be read.
    pub fn read(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.table).ok()?;
        drops_of(&text, self.inode)
    }
}

/// Adds the socket's new kernel drops to `counters` every `every` until `cancel`, and once more
/// at the end. The file is read on a blocking thread: with many sockets on the host the table
/// is long, and the ingest task must not wait for it.
pub async fn watch(
    reader: KernelDrops,
    counters: Arc<Counters>,
    every: Duration,
    cancel: CancellationToken,
) {
    // The socket is new: every drop it shows happened in this run.
    let mut last = 0u64;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tick.tick() => false,
        };
        let r = reader.clone();
        if let Ok(Some(now)) = tokio::task::spawn_blocking(move || r.read()).await
            && now > last
        {
            counters.dropped_many(DropReason::Kernel, now - last);
            last = now;
        }
        if stop {
            break;
        }
    }
}

/// `socket:[123]` → 123.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The `drops` column of the line of `inode` in a `/proc/net/udp` table.
fn drops_of(table: &str, inode: u64) -> Option<u64> {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    // The header names "tx_queue rx_queue" and "tr tm->when" as columns that are one field in
    // the rows, so find the inode and drops columns from the end of the row instead: the rows
    // end with "... inode ref pointer drops".
    if header.last() != Some(&"drops") {
        return None;
    }
    lines.find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let n = fields.len();
        if n < 4 || fields[n - 4].parse::<u64>().ok()? != inode {
            return None;
        }
        fields[n - 1].parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  358: 0100007F:1AD4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 771234 2 0000000000000000 0
  412: 00000000:0BBC 00000000:0000 07 00000000:00020400 00:00000000 00000000     0        0 771301 2 0000000000000000 1543
";

    #[test]
    fn finds_the_drops_of_the_right_socket() {
        assert_eq!(drops_of(TABLE, 771301), Some(1543));
        assert_eq!(drops_of(TABLE, 771234), Some(0));
        assert_eq!(drops_of(TABLE, 1), None);
    }

    #[test]
    fn refuses_a_table_without_a_drops_column() {
        let old = TABLE.replace(" drops", "");
        assert_eq!(drops_of(&old, 771301), None);
        assert_eq!(drops_of("", 771301), None);
    }

    #[test]
    fn parses_socket_links() {
        assert_eq!(socket_inode("socket:[771301]"), Some(771301));
        assert_eq!(socket_inode("pipe:[5]"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn reads_a_live_socket_when_the_system_shows_it() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        if cfg!(target_os = "linux") {
            let drops = KernelDrops::of(&socket, false).expect("linux shows socket drops");
            assert_eq!(drops.read(), Some(0));
        }
    }
}
