//! The per-device sliding replay window: which sequence numbers were already accepted.
//! Pure logic, no I/O and no clock; ingest and the writer each keep one per device.

/// Width of the window: sequences more than this far below the highest seen are too old.
pub const WINDOW: u64 = 128;

/// What the window says of a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Never seen: accept.
    New,
    /// Seen already, inside the window.
    Duplicate,
    /// Older than the window: cannot tell, so reject as a replay.
    TooOld,
}

/// Highest accepted sequence and a bitmap of the [`WINDOW`] sequences at and below it
/// (bit `i` is sequence `max - i`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayWindow {
    max: Option<u64>,
    bits: u128,
}

impl ReplayWindow {
    /// Rebuilds a window from its stored form.
    pub fn from_parts(max: Option<u64>, bits: u128) -> Self {
        Self { max, bits }
    }

    /// The stored form: highest sequence and bitmap.
    pub fn parts(&self) -> (Option<u64>, u128) {
        (self.max, self.bits)
    }

    /// Classifies `seq` without changing the window.
    pub fn check(&self, seq: u64) -> Verdict {
        let Some(max) = self.max else {
            return Verdict::New;
        };
        if seq > max {
            return Verdict::New;
        }
        let back = max - seq;
        if back >= WINDOW {
            Verdict::TooOld
        } else if self.bits & (1u128 << back) != 0 {
            Verdict::Duplicate
        } else {
            Verdict::New
        }
    }

    /// Records `seq` as accepted. Call only after [`check`](Self::check) said [`Verdict::New`].
    pub fn mark(&mut self, seq: u64) {
        match self.max {
            None => {
                self.max = Some(seq);
                self.bits = 1;
            }
            Some(max) if seq > max => {
                let shift = seq - max;
                self.bits = if shift >= WINDOW {
                    0
                } else {
                    self.bits << shift
                } | 1;
                self.max = Some(seq);
            }
            Some(max) => {
                let back = max - seq;
                if back < WINDOW {
                    self.bits |= 1u128 << back;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(w: &mut ReplayWindow, seq: u64) -> Verdict {
        let v = w.check(seq);
        if v == Verdict::New {
            w.mark(seq);
        }
        v
    }

    #[test]
    fn in_order_reordered_duplicate_and_old() {
        let mut w = ReplayWindow::default();
        assert_eq!(accept(&mut w, 10), Verdict::New);
        assert_eq!(accept(&mut w, 12), Verdict::New);
        assert_eq!(
            accept(&mut w, 11),
            Verdict::New,
            "reordered inside the window"
        );
        assert_eq!(accept(&mut w, 11), Verdict::Duplicate);
        assert_eq!(accept(&mut w, 10), Verdict::Duplicate);
        assert_eq!(
            accept(&mut w, 9),
            Verdict::New,
            "below the first but inside the window"
        );
        assert_eq!(accept(&mut w, 12 + WINDOW), Verdict::New);
        assert_eq!(accept(&mut w, 12), Verdict::TooOld);
        assert_eq!(accept(&mut w, 13), Verdict::New);
        assert_eq!(accept(&mut w, 13), Verdict::Duplicate);
        assert_eq!(
            accept(&mut w, 12 + 10 * WINDOW),
            Verdict::New,
            "a large jump"
        );
        assert_eq!(accept(&mut w, 12 + WINDOW), Verdict::TooOld);
    }

    /// The window against a model that remembers every accepted sequence number: for any
    /// history of arrivals (in order, reordered, duplicated, far jumps) the window's verdict is
    /// the model's, where the model answers `TooOld` for anything `WINDOW` or more below the
    /// highest accepted. So nothing is accepted twice, and nothing new inside the window is
    /// rejected. The stored form gives the same verdicts at every step.
    mod model {
        use super::super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        #[derive(Default)]
        struct Model {
            accepted: BTreeSet<u64>,
        }

        impl Model {
            fn check(&self, seq: u64) -> Verdict {
                let Some(&max) = self.accepted.last() else {
                    return Verdict::New;
                };
                if seq > max {
                    Verdict::New
                } else if max - seq >= WINDOW {
                    Verdict::TooOld
                } else if self.accepted.contains(&seq) {
                    Verdict::Duplicate
                } else {
                    Verdict::New
                }
            }
        }

        /// An arrival relative to the highest sequence so far: mostly near it (reordering and
        /// duplicates within and just outside the window), sometimes a far jump.
        fn arrival() -> impl Strategy<Value = i64> {
            prop_oneof![
                8 => -140i64..8,
                1 => -300i64..300,
                1 => 100i64..100_000,
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn window_matches_model(start in 0u64..1_000, steps in prop::collection::vec(arrival(), 1..400)) {
                let mut w = ReplayWindow::default();
                let mut m = Model::default();
                let mut top = start;
                for d in steps {
                    let seq = top.saturating_add_signed(d);
                    let v = w.check(seq);
                    prop_assert_eq!(v, m.check(seq), "seq {} after max {:?}", seq, w.parts().0);
                    let (max, bits) = w.parts();
                    prop_assert_eq!(ReplayWindow::from_parts(max, bits).check(seq), v);
                    if v == Verdict::New {
                        prop_assert!(!m.accepted.contains(&seq), "{} accepted twice", seq);
                        w.mark(seq);
                        m.accepted.insert(seq);
                        top = top.max(seq);
                    }
                }
            }
        }
    }

    #[test]
    fn stored_form_round_trips() {
        let mut w = ReplayWindow::default();
        for s in [1, 2, 5, 7, 100, 129] {
            w.mark(s);
        }
        let (max, bits) = w.parts();
        let r = ReplayWindow::from_parts(max, bits);
        for s in 0..200 {
            assert_eq!(r.check(s), w.check(s), "seq {s}");
        }
        assert_eq!(r.check(1), Verdict::TooOld);
        assert_eq!(r.check(7), Verdict::Duplicate);
        assert_eq!(r.check(8), Verdict::New);
    }
}
