//! The sandbox agent's wire protocol as either side reads it from the other: any bytes are
//! read as a stream of frames (host frames as the agent reads them, agent frames as the host
//! reads them) until the stream ends or a frame is refused. Checked besides "no panic" and no
//! huge allocation (a length or a count inside a frame claiming more than the frame holds):
//! every frame read encodes back to bytes that read as the same frame.
//!
//! Input: a selector byte (bit 0: agent frames, else host frames), then the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_agent::{read_frame, write_frame, AgentFrame, HostFrame};

fn stream<T>(mut bytes: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    for _ in 0..64 {
        match read_frame::<T>(&mut bytes) {
            Ok(Some(frame)) => {
                let mut again = Vec::new();
                write_frame(&mut again, &frame).expect("a frame read encodes");
                let back = read_frame::<T>(&mut &again[..]).expect("re-encoded frame reads");
                assert_eq!(back.as_ref(), Some(&frame));
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 1 == 1 {
        stream::<AgentFrame>(rest);
    } else {
        stream::<HostFrame>(rest);
    }
});
