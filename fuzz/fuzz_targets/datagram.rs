//! Telemetry datagram: header peek, open (tag, decrypt, decode) and ack open never panic; what
//! opens was accepted by peek too, and re-sealed it opens to the same header and readings (not
//! necessarily the same bytes: the decoder accepts non-minimal varints, PROTOCOL.md). The input
//! is tried as is, and once more sealed under the key so the decoder behind the tag is reached.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::{Ack, Batch, DeviceId, DeviceKey, Flags, Header, Seq, seal_payload};

fuzz_target!(|data: &[u8]| {
    // The golden key of PROTOCOL.md, so the golden vectors among the seeds open.
    let cipher = DeviceKey(std::array::from_fn(|i| i as u8)).cipher();
    check(data, &cipher);
    // The same bytes as a payload behind a valid tag: exercises postcard decoding and limits.
    let header = Header {
        flags: Flags(Flags::ACK_REQUESTED),
        device: DeviceId(1),
        seq: Seq(5),
    };
    check(&seal_payload(&header, data, &cipher), &cipher);
    let _ = Ack::open(data, &cipher);
    let _ = Ack::peek_device(data);
});

fn check(data: &[u8], cipher: &proto::Cipher) {
    let peeked = Header::peek(data);
    let mut copy = data.to_vec();
    if let Ok((header, batch)) = Batch::open(&mut copy, cipher) {
        assert_eq!(peeked.ok(), Some(header), "open accepted what peek refused");
        let mut again = batch
            .seal(&header, cipher)
            .expect("an opened batch seals")
            .0;
        assert!(again.len() <= data.len(), "re-sealing grew the datagram");
        let reopened = Batch::open(&mut again, cipher).expect("a re-sealed batch opens");
        assert_eq!(reopened.0, header);
        assert_eq!(
            bits(&reopened.1),
            bits(&batch),
            "re-sealing changed the readings"
        );
    }
}

/// Readings with values as bits, so NaN compares equal to itself.
fn bits(b: &Batch) -> Vec<(u16, u64, u64)> {
    b.readings
        .iter()
        .map(|r| (r.sensor.0, r.ts.0, r.value.to_bits()))
        .collect()
}
