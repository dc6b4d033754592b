//! File-chunk reassembly (`proto::control::Reassembly`) against a model: a file of up to 64 KiB
//! and a stream of chunks at arbitrary offsets and lengths, honest (the file's bytes) or not,
//! with reconnects that resume from what is stored. Asserts: a chunk is taken exactly when it
//! continues the file within its size; the length held never shrinks (but across a resume),
//! never passes the size, and is what was appended; when every taken chunk was honest the bytes
//! held are the file's prefix; completion means every byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::control::Reassembly;

fuzz_target!(|data: &[u8]| {
    let Some((head, ops)) = data.split_first_chunk::<3>() else {
        return;
    };
    let size = u64::from(u16::from_le_bytes([head[0], head[1]]));
    let file: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31) ^ head[2])
        .collect();
    let mut r = Reassembly::resume(size, 0);
    let mut held: Vec<u8> = Vec::new();
    let mut honest = true;
    for op in ops.chunks_exact(5) {
        let kind = op[0] % 8;
        if kind == 0 {
            // A reconnect: the device resumes from what it holds (sometimes claiming more).
            let claim = held.len() as u64 + u64::from(op[1] % 2) * u64::from(op[2]);
            r = Reassembly::resume(size, claim);
            assert_eq!(r.have(), claim.min(size));
            if r.have() > held.len() as u64 {
                // Bytes it never received are not the file's.
                honest = false;
            }
            held.resize(r.have() as usize, 0);
            continue;
        }
        let before = r.have();
        // Mostly at the right place, sometimes anywhere near it.
        let delta = i64::from(i16::from_le_bytes([op[1], op[2]]));
        let offset = if kind < 5 {
            before
        } else {
            before.saturating_add_signed(delta)
        };
        let len = usize::from(u16::from_le_bytes([op[3], op[4]])) % 4097;
        let truthful = kind != 7;
        let chunk: Vec<u8> = if truthful {
            (offset..offset + len as u64)
                .map(|i| file.get(i as usize).copied().unwrap_or(0xAA))
                .collect()
        } else {
            vec![op[4]; len]
        };
        let expected = offset == before && before + len as u64 <= size;
        let took = r.accept(offset, chunk.len());
        assert_eq!(took, expected, "offset {offset} len {len} at {before} of {size}");
        if took {
            held.extend_from_slice(&chunk);
            honest &= truthful;
        }
        assert!(r.have() >= before, "shrank");
        assert!(r.have() <= size, "past the size");
        assert_eq!(r.have(), held.len() as u64);
        assert_eq!(r.is_complete(), r.have() == size);
        if honest {
            assert_eq!(held[..], file[..held.len()], "held bytes are not the file's");
        }
    }
});
