//! The replay window against a model that remembers every accepted sequence number: same
//! verdicts, nothing accepted twice, the stored form gives the same verdicts. Input: a start
//! and a list of signed steps relative to the highest sequence so far.
#![no_main]

use std::collections::BTreeSet;

use gateway::replay::{ReplayWindow, Verdict, WINDOW};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut w = ReplayWindow::default();
    let mut accepted = BTreeSet::new();
    let mut top = 0u64;
    for chunk in data.chunks_exact(2) {
        let d = i64::from(i16::from_le_bytes([chunk[0], chunk[1]]));
        // Mostly near the top, sometimes a jump of up to 32 windows.
        let seq = top.saturating_add_signed(if d % 7 == 0 { d * 4 } else { d % 160 });
        let model = match accepted.last() {
            None => Verdict::New,
            Some(&max) if seq > max => Verdict::New,
            Some(&max) if max - seq >= WINDOW => Verdict::TooOld,
            Some(_) if accepted.contains(&seq) => Verdict::Duplicate,
            Some(_) => Verdict::New,
        };
        let v = w.check(seq);
        assert_eq!(v, model, "seq {seq}");
        let (max, bits) = w.parts();
        assert_eq!(ReplayWindow::from_parts(max, bits).check(seq), v);
        if v == Verdict::New {
            assert!(accepted.insert(seq), "{seq} accepted twice");
            w.mark(seq);
            top = top.max(seq);
        }
    }
});
