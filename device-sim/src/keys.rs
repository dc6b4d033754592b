//! A device's keys as its telemetry and its control session share them: the key in use, the
//! one before it (acks of datagrams sealed before a rotation still open with it), and whether
//! the current key is safely in the fleet file.
//!
//! A rotation (`RotateKey` on the control session) installs the new key here; the telemetry
//! side notices on its next datagram and seals everything from then on with it, including
//! retransmissions of datagrams sealed before. The control session answers the gateway only
//! once the fleet file holding the new key is on disk, as a real device must write its key to
//! flash before it confirms.
//!
//! Emits: nothing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use proto::{Cipher, DeviceKey};
use tokio::sync::Notify;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct KeyRing {
    keys: Mutex<Keys>,
    /// Keys installed so far (0 for the provisioned one); read on every datagram.
    installed: AtomicU64,
    /// The highest `installed` count whose key is on disk.
    saved: AtomicU64,
    saved_changed: Notify,
}

#[derive(Debug)]
struct Keys {
    current: DeviceKey,
    previous: Option<DeviceKey>,
}

impl KeyRing {
    /// A ring holding the provisioned `key`, already on disk.
    pub(crate) fn new(key: DeviceKey) -> Self {
        Self {
            keys: Mutex::new(Keys {
                current: key,
                previous: None,
            }),
            installed: AtomicU64::new(0),
            saved: AtomicU64::new(0),
            saved_changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many keys were installed; changes whenever [`KeyRing::ciphers`] would.
    pub(crate) fn installed(&self) -> u64 {
        self.installed.load(Relaxed)
    }

    /// The key in use.
    pub(crate) fn current(&self) -> DeviceKey {
        self.lock().current.clone()
    }

    /// The key in use, the one before it, and the install count they belong to.
    pub(crate) fn ciphers(&self) -> (Cipher, Option<Cipher>, u64) {
        let keys = self.lock();
        (
            keys.current.cipher(),
            keys.previous.as_ref().map(DeviceKey::cipher),
            self.installed.load(Relaxed),
        )
    }

    /// Makes `key` the key in use (nothing changes when it already is); returns the install
    /// count to wait for with [`KeyRing::wait_saved`].
    pub(crate) fn install(&self, key: DeviceKey) -> u64 {
        let mut keys = self.lock();
        if keys.current == key {
            return self.installed.load(Relaxed);
        }
        keys.previous = Some(std::mem::replace(&mut keys.current, key));
        self.installed.fetch_add(1, Relaxed) + 1
    }

    /// Records that the key of install count `n` is on disk.
    pub(crate) fn mark_saved(&self, n: u64) {
        self.saved.fetch_max(n, Relaxed);
        self.saved_changed.notify_waiters();
    }

    /// Waits until the key of install count `n` is on disk.
    pub(crate) async fn wait_saved(&self, n: u64) {
        loop {
            let notified = self.saved_changed.notified();
            if self.saved.load(Relaxed) >= n {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn install_switches_keys_and_saving_releases_waiters() {
        let ring = std::sync::Arc::new(KeyRing::new(DeviceKey([1; 32])));
        assert_eq!(
            ring.install(DeviceKey([1; 32])),
            0,
            "the same key changes nothing"
        );
        let n = ring.install(DeviceKey([2; 32]));
        assert_eq!(n, 1);
        assert_eq!(ring.current(), DeviceKey([2; 32]));
        assert!(ring.ciphers().1.is_some(), "the old key is kept for acks");
        let waiter = tokio::spawn({
            let ring = ring.clone();
            async move { ring.wait_saved(n).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "not on disk yet");
        ring.mark_saved(n);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("released once saved")
            .expect("no panic");
    }
}
