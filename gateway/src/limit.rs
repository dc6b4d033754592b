//! Per-source limits on failed authentications, for UDP telemetry and control sessions.
//!
//! A source (an IPv4 address, or the /64 prefix of an IPv6 address) may fail `burst`
//! authentications at once and `per_second` more each second (GCRA, from `governor`). Past that
//! it is *limited*: until its next failure would conform again, whatever it sends is refused
//! before any cryptography (telemetry: dropped as `auth_limited`; control: the connection is
//! closed at accept). So a flood of forgeries costs one table lookup per datagram instead of an
//! AEAD check, and a source gets at most `per_second` expensive checks that fail.
//!
//! Memory is bounded whatever the sources: both tables hold at most [`MAX_SOURCES`] entries.
//! Sources whose state is back to fresh are swept regularly; when spoofed addresses fill the
//! limiter's table even after a sweep, it starts over (counted in [`AuthLimiter::resets`]),
//! which only forgets failures, never blocks anyone.
//!
//! A UDP source address can be forged: an attacker who floods with a device's own address makes
//! that address limited, and the device's datagrams are dropped with the forgeries while the
//! flood lasts. SECURITY.md discusses this trade-off.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use tokio::time::Instant;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

/// Most sources tracked by one limiter (failure states and limited sources each).
pub const MAX_SOURCES: usize = 65_536;

/// What a limit is kept per: the address, IPv6 reduced to its /64 (one host's or site's prefix).
pub fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// The limiter for a `per_second` setting and a burst; None when the setting is 0 (off).
pub fn from_settings(per_second: u32, burst: NonZeroU32) -> Option<AuthLimiter> {
    NonZeroU32::new(per_second).map(|rate| AuthLimiter::new(rate, burst))
}

type Keyed = RateLimiter<IpAddr, HashMapStateStore<IpAddr>, DefaultClock>;

/// Failed authentications per source, and the sources limited for them.
pub struct AuthLimiter {
    quota: Quota,
    max_sources: usize,
    limiter: Keyed,
    clock: DefaultClock,
    limited: HashMap<IpAddr, Instant>,
    /// Times the failure table was forgotten because spoofed sources filled it.
    pub resets: u64,
}

impl std::fmt::Debug for AuthLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLimiter")
            .field("quota", &self.quota)
            .field("tracked", &self.limiter.len())
            .field("limited", &self.limited.len())
            .finish()
    }
}

impl AuthLimiter {
    /// `burst` failures at once, `per_second` after that, per source.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self::with_capacity(per_second, burst, MAX_SOURCES)
    }

    fn with_capacity(per_second: NonZeroU32, burst: NonZeroU32, max_sources: usize) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            quota,
            max_sources: max_sources.max(1),
            limiter: RateLimiter::hashmap(quota),
            clock: DefaultClock::default(),
            limited: HashMap::new(),
            resets: 0,
        }
    }

    /// Whether `ip` is limited at `now`. One empty-table check when nobody is limited.
    pub fn is_limited(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.limited.is_empty() {
            return false;
        }
        let key = source(ip);
        match self.limited.get(&key) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.limited.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Records one failed authentication from `ip`; true when that made (or kept) it limited.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source(ip);
        let outcome = self.limiter.check_key(&key);
        if self.limiter.len() > self.max_sources {
            self.limiter.retain_recent();
            if self.limiter.len() > self.max_sources {
                self.limiter = RateLimiter::hashmap(self.quota);
                self.resets += 1;
            }
        }
        match outcome {
            Ok(()) => false,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                if self.limited.len() < self.max_sources || self.limited.contains_key(&key) {
                    self.limited.insert(key, now + wait);
                }
                true
            }
        }
    }

    /// Forgets sources back to a fresh state and limits that have ended. Call about once a
    /// second; between calls the tables are still bounded by [`MAX_SOURCES`].
    pub fn sweep(&mut self, now: Instant) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.limited.retain(|_, until| *until > now);
        if self.limited.capacity() > 64 && self.limited.len() < self.limited.capacity() / 4 {
            self.limited.shrink_to_fit();
        }
    }

    /// Sources limited at the last check or sweep (an upper bound: some may have ended since).
    pub fn limited_sources(&self) -> usize {
        self.limited.len()
    }

    /// Sources with failures remembered.
    pub fn tracked_sources(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
    }

    #[test]
    fn a_source_is_limited_after_its_burst_and_others_are_not() {
        let mut l = AuthLimiter::new(nz(1), nz(3));
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let now = Instant::now();
        assert!(!l.is_limited(a, now));
        for i in 0..3 {
            assert!(!l.failed(a, now), "failure {i} is within the burst");
        }
        assert!(l.failed(a, now), "the fourth failure limits the source");
        assert!(l.is_limited(a, now));
        assert!(!l.is_limited(b, now), "another source is not limited");
        assert!(!l.failed(b, now));
        // The limit ends when one more failure would conform: within a second at 1/s.
        assert!(!l.is_limited(a, now + Duration::from_millis(1100)));
        assert_eq!(
            l.limited_sources(),
            0,
            "an ended limit is forgotten when seen"
        );
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_64_bit_prefix() {
        let mut l = AuthLimiter::new(nz(1), nz(1));
        let a: IpAddr = "2001:db8:1:2::1"
            .parse()
            .unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST));
        let same: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap_or(a);
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(a);
        let now = Instant::now();
        assert!(!l.failed(a, now));
        assert!(l.failed(same, now), "the same /64 shares the budget");
        assert!(l.is_limited(a, now));
        assert!(!l.is_limited(other, now));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
        assert_eq!(source(mapped), IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
    }

    #[test]
    fn spoofed_sources_cannot_grow_the_tables_past_their_bound() {
        let max = 1000;
        let mut l = AuthLimiter::with_capacity(nz(1), nz(1), max);
        let now = Instant::now();
        for i in 0..20_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            l.failed(ip, now);
            l.failed(ip, now); // limits it
            assert!(
                l.tracked_sources() <= max,
                "tracked {}",
                l.tracked_sources()
            );
            assert!(
                l.limited_sources() <= max,
                "limited {}",
                l.limited_sources()
            );
        }
        assert!(l.resets > 0, "the failure table was started over");
        l.sweep(now + Duration::from_secs(5));
        assert_eq!(l.limited_sources(), 0, "ended limits are swept");
        // Failure states go once they are back to fresh (by governor's own clock: a quota that
        // refills within microseconds makes them fresh by the time of the sweep).
        let mut fast = AuthLimiter::with_capacity(nz(1_000_000), nz(1), max);
        for i in 0..500u32 {
            fast.failed(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)), now);
        }
        let deadline = std::time::SystemTime::now() + Duration::from_secs(5);
        while fast.tracked_sources() > 0 && std::time::SystemTime::now() < deadline {
            fast.sweep(now);
        }
        assert_eq!(fast.tracked_sources(), 0, "fresh failure states are swept");
    }
}
