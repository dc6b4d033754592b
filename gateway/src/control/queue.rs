//! A session's work queue: bounded, and holding no memory while empty.
//!
//! Every held session has one, and it is empty nearly all the time (commands, configuration
//! and file nudges are rare). A tokio channel allocates room for 32 messages up front, about
//! 0.8 KiB per session; this queue allocates only while something waits in it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::control::Outbound;

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub struct QueueSender(Arc<Shared>);

/// The receiving side, owned by the session; dropping it closes the queue.
#[derive(Debug)]
pub struct QueueReceiver(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Outbound>,
    closed: bool,
    capacity: usize,
}

/// A queue of at most `capacity` items.
pub fn queue(capacity: usize) -> (QueueSender, QueueReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            capacity,
            ..State::default()
        }),
        notify: Notify::new(),
    });
    (QueueSender(shared.clone()), QueueReceiver(shared))
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl QueueSender {
    /// Queues `item` unless the queue is full or its session has ended; gives it back then.
    ///
    /// # Errors
    /// The item, when it was not queued.
    pub fn try_send(&self, item: Outbound) -> Result<(), Outbound> {
        {
            let mut s = self.0.lock();
            if s.closed || s.items.len() >= s.capacity {
                return Err(item);
            }
            s.items.push_back(item);
        }
        self.0.notify.notify_one();
        Ok(())
    }
}

impl QueueReceiver {
    /// The next item, waiting for one.
    ///
    /// # Cancel safety
    /// Cancel safe: an item is only taken out of the queue when it is returned.
    pub async fn recv(&mut self) -> Outbound {
        loop {
            {
                let mut s = self.0.lock();
                if let Some(item) = s.items.pop_front() {
                    if s.items.is_empty() {
                        // Give the room back: queued work is rare.
                        s.items = VecDeque::new();
                    }
                    return item;
                }
            }
            // A send between the check above and this wait leaves a permit, so it is not
            // missed.
            self.0.notify.notified().await;
        }
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.closed = true;
        s.items = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_arrive_in_order_and_a_full_queue_refuses() {
        let (tx, mut rx) = queue(2);
        assert!(tx.try_send(Outbound::FilesPending).is_ok());
        assert!(
            tx.try_send(Outbound::Msg(Box::new(
                proto::control::GatewayMsg::HeartbeatAck
            )))
            .is_ok()
        );
        assert!(tx.try_send(Outbound::FilesPending).is_err(), "full");
        assert!(matches!(rx.recv().await, Outbound::FilesPending));
        assert!(matches!(rx.recv().await, Outbound::Msg(_)));
        assert!(tx.try_send(Outbound::FilesPending).is_ok(), "room again");
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_on_send() {
        let (tx, mut rx) = queue(4);
        let waiter = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        assert!(tx.try_send(Outbound::FilesPending).is_ok());
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert!(matches!(got, Outbound::FilesPending));
    }

    #[tokio::test]
    async fn a_cancelled_receive_loses_nothing() {
        let (tx, mut rx) = queue(4);
        // Cancel a receive that is waiting, then send: the item is still there.
        let r = tokio::time::timeout(std::time::Duration::from_millis(1), rx.recv()).await;
        assert!(r.is_err());
        assert!(tx.try_send(Outbound::FilesPending).is_ok());
        assert!(matches!(rx.recv().await, Outbound::FilesPending));
    }

    #[test]
    fn sending_to_an_ended_session_fails() {
        let (tx, rx) = queue(4);
        drop(rx);
        assert!(tx.try_send(Outbound::FilesPending).is_err());
    }
}
