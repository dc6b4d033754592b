//! Round trips, tamper detection, limits and the golden vectors of PROTOCOL.md.

use proptest::prelude::*;
use proto::*;

fn key() -> DeviceKey {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = i as u8;
    }
    DeviceKey(k)
}

fn golden_batch() -> (Header, Batch) {
    let header = Header {
        flags: Flags(Flags::ACK_REQUESTED),
        device: DeviceId(7),
        seq: Seq(42),
    };
    let batch = Batch {
        readings: vec![
            Reading {
                sensor: SensorId(1),
                ts: Millis(1_764_000_000_000),
                value: 21.5,
            },
            Reading {
                sensor: SensorId(2),
                ts: Millis(1_764_000_000_250),
                value: -3.25,
            },
        ],
    };
    (header, batch)
}

/// The hex of the line `golden NAME: HEX` in PROTOCOL.md.
fn golden(name: &str) -> Vec<u8> {
    let doc = include_str!("../../PROTOCOL.md");
    let prefix = format!("golden {name}:");
    let line = doc
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("PROTOCOL.md has no line `{prefix} …`"));
    let hex: String = line.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(hex).expect("golden vector is hex")
}

#[test]
fn golden_vectors_match_protocol_md() {
    let cipher = key().cipher();
    assert_eq!(golden("key"), key().0.to_vec());
    let (header, batch) = golden_batch();
    let sealed = batch.seal(&header, &cipher).unwrap();
    assert_eq!(
        hex::encode(&sealed.0),
        hex::encode(golden("telemetry")),
        "telemetry datagram layout changed: that needs a new protocol version"
    );
    let mut plain = sealed.0.clone();
    let opened = Batch::open(&mut plain, &cipher).unwrap();
    assert_eq!(opened, (header, batch));
    assert_eq!(
        hex::encode(&plain[HEADER_LEN..plain.len() - TAG_LEN]),
        hex::encode(golden("payload")),
        "postcard payload layout changed"
    );
    let ack = Ack {
        device: DeviceId(7),
        seq: Seq(42),
    }
    .seal(&cipher);
    assert_eq!(hex::encode(ack), hex::encode(golden("ack")));
    assert_eq!(
        Ack::open(&golden("ack"), &cipher).unwrap(),
        Ack {
            device: DeviceId(7),
            seq: Seq(42)
        }
    );
}

#[test]
fn wrong_key_is_bad_tag() {
    let (header, batch) = golden_batch();
    let mut sealed = batch.seal(&header, &key().cipher()).unwrap().0;
    let other = DeviceKey([9; 32]).cipher();
    assert_eq!(Batch::open(&mut sealed, &other), Err(DecodeError::BadTag));
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let cipher = key().cipher();
    let (header, batch) = golden_batch();
    let sealed = batch.seal(&header, &cipher).unwrap().0;
    for bit in 0..sealed.len() * 8 {
        let mut d = sealed.clone();
        d[bit / 8] ^= 1 << (bit % 8);
        let result = Batch::open(&mut d, &cipher);
        assert!(result.is_err(), "flip of bit {bit} was accepted");
    }
    let ack = Ack {
        device: DeviceId(7),
        seq: Seq(42),
    }
    .seal(&cipher);
    for bit in 0..ack.len() * 8 {
        let mut d = ack;
        d[bit / 8] ^= 1 << (bit % 8);
        assert!(Ack::open(&d, &cipher).is_err(), "ack flip {bit} accepted");
    }
}

#[test]
fn limits_and_header_errors() {
    let cipher = key().cipher();
    assert!(matches!(
        Header::peek(&[1u8; MIN_DATAGRAM - 1]),
        Err(DecodeError::TooShort { .. })
    ));
    assert!(matches!(
        Header::peek(&[1u8; MAX_DATAGRAM + 1]),
        Err(DecodeError::TooLong { .. })
    ));
    let (header, batch) = golden_batch();
    let mut d = batch.seal(&header, &cipher).unwrap().0;
    d[0] = 2;
    assert_eq!(
        Header::peek(&d),
        Err(DecodeError::BadVersion { version: 2 })
    );
    d[0] = VERSION;
    d[1] = Flags::ACK;
    assert!(matches!(
        Header::peek(&d),
        Err(DecodeError::BadHeader { .. })
    ));
    // An ack is not a telemetry datagram, and a telemetry datagram is not an ack.
    let ack = Ack {
        device: DeviceId(7),
        seq: Seq(42),
    }
    .seal(&cipher);
    assert!(Header::peek(&ack).is_err());
    assert!(Ack::open(&batch.seal(&header, &cipher).unwrap().0, &cipher).is_err());
    // Peeking an ack's device (to pick the key) reads only ack-shaped datagrams.
    assert_eq!(Ack::peek_device(&ack), Some(DeviceId(7)));
    assert_eq!(Ack::peek_device(&ack[..ACK_LEN - 1]), None);
    assert_eq!(
        Ack::peek_device(&batch.seal(&header, &cipher).unwrap().0),
        None
    );
    let mut not_ack = ack;
    not_ack[1] = Flags::ACK_REQUESTED;
    assert_eq!(Ack::peek_device(&not_ack), None);

    let too_many = Batch {
        readings: vec![batch.readings[0]; MAX_READINGS + 1],
    };
    assert_eq!(
        too_many.seal(&header, &cipher),
        Err(EncodeError::TooManyReadings {
            count: MAX_READINGS + 1,
            max: MAX_READINGS
        })
    );
    let bad_seq = Header {
        seq: Seq(SEQ_LIMIT),
        ..header
    };
    assert!(batch.seal(&bad_seq, &cipher).is_err());
}

#[test]
fn empty_batch_is_the_smallest_datagram_and_larger_than_an_ack() {
    let cipher = key().cipher();
    let (header, _) = golden_batch();
    let d = Batch::default().seal(&header, &cipher).unwrap().0;
    assert_eq!(d.len(), MIN_DATAGRAM);
    assert!(ACK_LEN < d.len());
}

fn reading() -> impl Strategy<Value = Reading> {
    (any::<u16>(), any::<u64>(), any::<f64>()).prop_map(|(s, t, v)| Reading {
        sensor: SensorId(s),
        ts: Millis(t),
        value: v,
    })
}

proptest! {
    #[test]
    fn seal_open_round_trip(
        device in any::<u32>(),
        seq in 0..SEQ_LIMIT,
        ack in any::<bool>(),
        readings in proptest::collection::vec(reading(), 0..=MAX_READINGS),
        key in any::<[u8; 32]>(),
    ) {
        let cipher = DeviceKey(key).cipher();
        let header = Header {
            flags: Flags(if ack { Flags::ACK_REQUESTED } else { 0 }),
            device: DeviceId(device),
            seq: Seq(seq),
        };
        let batch = Batch { readings };
        let mut sealed = batch.seal(&header, &cipher).unwrap().0;
        prop_assert!(sealed.len() <= MAX_DATAGRAM);
        let (h, b) = Batch::open(&mut sealed, &cipher).unwrap();
        prop_assert_eq!(h, header);
        // Compare bit patterns so NaN values count as equal.
        prop_assert_eq!(b.readings.len(), batch.readings.len());
        for (x, y) in b.readings.iter().zip(&batch.readings) {
            prop_assert_eq!((x.sensor, x.ts, x.value.to_bits()), (y.sensor, y.ts, y.value.to_bits()));
        }
    }

    #[test]
    fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
        let cipher = key().cipher();
        let _ = Header::peek(&bytes);
        let _ = Ack::open(&bytes, &cipher);
        prop_assert!(Batch::open(&mut bytes, &cipher).is_err());
    }
}

/// Prints the golden vectors; run with `--ignored --nocapture` when a new protocol version
/// needs new vectors for PROTOCOL.md.
#[test]
#[ignore]
fn print_golden_vectors() {
    let cipher = key().cipher();
    let (header, batch) = golden_batch();
    let sealed = batch.seal(&header, &cipher).unwrap();
    let mut plain = sealed.0.clone();
    Batch::open(&mut plain, &cipher).unwrap();
    println!("golden key: {}", hex::encode(key().0));
    println!("golden telemetry: {}", hex::encode(&sealed.0));
    println!(
        "golden payload: {}",
        hex::encode(&plain[HEADER_LEN..plain.len() - TAG_LEN])
    );
    let ack = Ack {
        device: DeviceId(7),
        seq: Seq(42),
    }
    .seal(&cipher);
    println!("golden ack: {}", hex::encode(ack));
}

/// A receiver that knows two keys of a device (during a key rotation) tries the second after the
/// first fails, on the same buffer: a wrong key must leave the datagram as it was.
#[test]
fn a_wrong_key_leaves_the_datagram_unchanged() {
    let (header, batch) = golden_batch();
    let sealed = batch.seal(&header, &key().cipher()).unwrap().0;
    let mut d = sealed.clone();
    let other = proto::DeviceKey([0x33; 32]).cipher();
    assert_eq!(Batch::open(&mut d, &other), Err(DecodeError::BadTag));
    assert_eq!(d, sealed);
    assert_eq!(Batch::open(&mut d, &key().cipher()).unwrap().1, batch);
}

#[test]
fn authentic_but_malformed_payloads_are_bad_payload() {
    let cipher = key().cipher();
    let (header, _) = golden_batch();
    for payload in [
        &b"\xff\xff\xff"[..],
        &b"\x01\x01"[..],
        &b"\x00\x00"[..],
        &[51u8][..],
    ] {
        let mut d = seal_payload(&header, payload, &cipher);
        assert_eq!(
            Batch::open(&mut d, &cipher),
            Err(DecodeError::BadPayload),
            "{payload:?}"
        );
    }
    // 51 readings encode fine with postcard but exceed the limit.
    let r = Reading {
        sensor: SensorId(1),
        ts: Millis(1),
        value: 0.5,
    };
    let payload = postcard::to_allocvec(&Batch {
        readings: vec![r; MAX_READINGS + 1],
    })
    .unwrap();
    let mut d = seal_payload(&header, &payload, &cipher);
    assert!(matches!(
        Batch::open(&mut d, &cipher),
        Err(DecodeError::TooManyReadings { count: 51, .. })
    ));
}

/// The key-rotation vectors: `RotateKey { version: 2, key: 32 × 0x33 }` and the device's proof
/// for device 7 with an empty binding.
fn rotation_golden() -> (Vec<u8>, [u8; 32]) {
    use proto::control::*;
    let mut rotate = Vec::new();
    encode_frame(
        &GatewayMsg::RotateKey {
            version: 2,
            key: [0x33; 32],
        },
        MAX_FRAME,
        &mut rotate,
    )
    .unwrap();
    let proof = rotation_proof(&proto::DeviceKey([0x33; 32]), DeviceId(7), 2, b"");
    (rotate, proof)
}

#[test]
fn rotation_golden_vectors_match_protocol_md() {
    let (rotate, proof) = rotation_golden();
    assert_eq!(
        hex::encode(rotate),
        hex::encode(golden("control-rotate-key"))
    );
    assert_eq!(
        hex::encode(proof),
        hex::encode(golden("control-rotation-proof"))
    );
}

#[test]
#[ignore]
fn print_rotation_golden_vectors() {
    let (rotate, proof) = rotation_golden();
    println!("golden control-rotate-key: {}", hex::encode(rotate));
    println!("golden control-rotation-proof: {}", hex::encode(proof));
}

fn control_golden() -> (Vec<u8>, Vec<u8>, Vec<u8>, [u8; 32]) {
    use proto::control::*;
    let mut hello = Vec::new();
    encode_frame(
        &DeviceMsg::Hello {
            device: DeviceId(7),
            client_nonce: [0x11; 16],
        },
        MAX_FRAME,
        &mut hello,
    )
    .unwrap();
    let mut challenge = Vec::new();
    encode_frame(
        &GatewayMsg::Challenge {
            server_nonce: [0x22; 32],
        },
        MAX_FRAME,
        &mut challenge,
    )
    .unwrap();
    let mut command = Vec::new();
    encode_frame(
        &GatewayMsg::Command {
            id: CommandId(5),
            command: Command::SetInterval { millis: 500 },
        },
        MAX_FRAME,
        &mut command,
    )
    .unwrap();
    let proof = auth_proof(&key(), DeviceId(7), &[0x11; 16], &[0x22; 32], b"");
    (hello, challenge, command, proof)
}

#[test]
fn control_golden_vectors_match_protocol_md() {
    let (hello, challenge, command, proof) = control_golden();
    assert_eq!(hex::encode(hello), hex::encode(golden("control-hello")));
    assert_eq!(
        hex::encode(challenge),
        hex::encode(golden("control-challenge"))
    );
    assert_eq!(hex::encode(command), hex::encode(golden("control-command")));
    assert_eq!(hex::encode(proof), hex::encode(golden("control-proof")));
}

#[test]
#[ignore]
fn print_control_golden_vectors() {
    let (hello, challenge, command, proof) = control_golden();
    println!("golden control-hello: {}", hex::encode(hello));
    println!("golden control-challenge: {}", hex::encode(challenge));
    println!("golden control-command: {}", hex::encode(command));
    println!("golden control-proof: {}", hex::encode(proof));
}

/// Found by fuzzing (fuzz/fuzz_targets/datagram.rs): the decoder accepts non-minimal varints,
/// so one batch has more than one encoding. Harmless (the tag covers the bytes and the replay
/// window the sequence number), documented in PROTOCOL.md, and kept true by this test.
#[test]
fn non_minimal_varints_decode_to_the_same_readings() {
    let cipher = key().cipher();
    let header = Header {
        flags: Flags(0),
        device: DeviceId(7),
        seq: Seq(43),
    };
    let value = 21.5f64.to_le_bytes();
    let minimal = [&[0x01, 0x01, 0x05][..], &value].concat();
    let padded = [&[0x01, 0x81, 0x00, 0x85, 0x80, 0x00][..], &value].concat();
    let open = |payload: &[u8]| {
        let mut d = seal_payload(&header, payload, &cipher);
        Batch::open(&mut d, &cipher)
    };
    let expected = Batch {
        readings: vec![Reading {
            sensor: SensorId(1),
            ts: Millis(5),
            value: 21.5,
        }],
    };
    assert_eq!(open(&minimal), Ok((header, expected.clone())));
    assert_eq!(open(&padded), Ok((header, expected.clone())));
    // Sealing always writes the minimal form.
    let sealed = expected.seal(&header, &cipher).unwrap().0;
    assert_eq!(sealed, seal_payload(&header, &minimal, &cipher));
}
