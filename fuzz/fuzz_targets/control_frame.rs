//! Control frames: decoding either direction's messages from arbitrary bytes never panics,
//! never claims more bytes than it was given, and whatever decodes encodes back to a frame
//! that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::control::{DeviceMsg, GatewayMsg, MAX_FRAME, decode_frame, encode_frame};
use serde::{Serialize, de::DeserializeOwned};

fuzz_target!(|data: &[u8]| {
    round_trip::<DeviceMsg>(data);
    round_trip::<GatewayMsg>(data);
});

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(Some((msg, used))) = decode_frame::<T>(data, MAX_FRAME) {
        assert!(
            used <= data.len() && used > 4,
            "used {used} of {}",
            data.len()
        );
        let mut out = Vec::new();
        encode_frame(&msg, MAX_FRAME, &mut out).expect("a decoded message encodes");
        let back = decode_frame::<T>(&out, MAX_FRAME).expect("re-decodes");
        assert_eq!(back, Some((msg, out.len())));
    }
}
