//! Frames made odd on purpose for the differential fuzz harness: mutations of
//! well-formed frames (bit flips, bytes, lengths, addresses, hops, fragment fields),
//! random bytes, and every truncation of a frame.

use rand::{Rng, RngCore, rngs::SmallRng, seq::IndexedRandom as _};
use visibility_common::packet::{ETH_HLEN, Family};

use super::frames::{MAX_FRAME, fix_checksums, fix_ip_length, interesting_addrs, seed_frame};

/// One mutation of a frame, or a few.
pub fn mutate(frame: &mut Vec<u8>, rng: &mut SmallRng) {
    for _ in 0..rng.random_range(1..=3) {
        mutate_once(frame, rng);
    }
    frame.truncate(MAX_FRAME);
}

pub(super) fn mutate_once(frame: &mut Vec<u8>, rng: &mut SmallRng) {
    if frame.is_empty() {
        frame.push(rng.random());
        return;
    }
    // Offsets near the headers are where the parser decides.
    let at = |rng: &mut SmallRng, len: usize| {
        if rng.random_bool(0.7) {
            rng.random_range(0..len.min(ETH_HLEN + 80))
        } else {
            rng.random_range(0..len)
        }
    };
    let fix = rng.random_bool(0.6);
    match rng.random_range(0..12) {
        0 => {
            let i = at(rng, frame.len());
            frame[i] ^= 1 << rng.random_range(0..8);
        }
        1 => {
            let i = at(rng, frame.len());
            frame[i] = *[
                0,
                1,
                0xff,
                0x7f,
                0x80,
                0x40,
                0x45,
                0x60,
                6,
                17,
                58,
                44,
                rng.random(),
            ]
            .choose(rng)
            .expect("not empty");
        }
        2 => {
            let len = rng.random_range(0..=frame.len());
            frame.truncate(len);
            if rng.random_bool(0.5) {
                fix_ip_length(frame);
            }
        }
        3 => {
            let i = at(rng, frame.len());
            let n = rng.random_range(1..=8);
            for _ in 0..n {
                frame.insert(i, rng.random());
            }
        }
        4 => {
            let i = at(rng, frame.len());
            let end = (i + rng.random_range(1..=8)).min(frame.len());
            frame.drain(i..end);
        }
        5 => {
            // The IP length fields, to odd values.
            if frame.len() > ETH_HLEN + 6 {
                let value: u16 = *[0, 1, 20, 40, 0xffff, rng.random()]
                    .choose(rng)
                    .expect("not empty");
                let at = if frame[12..14] == [0x86, 0xdd] { 4 } else { 2 };
                frame[ETH_HLEN + at..ETH_HLEN + at + 2].copy_from_slice(&value.to_be_bytes());
            }
        }
        6 => {
            // The IPv4 header length nibble.
            if frame.len() > ETH_HLEN {
                frame[ETH_HLEN] = (frame[ETH_HLEN] & 0xf0) | rng.random_range(0..16);
            }
        }
        7 => {
            // An address, to one the datapath cares about.
            let v6 = frame.get(12..14) == Some(&[0x86, 0xdd]);
            let (family, offsets, len) = if v6 {
                (Family::V6, [ETH_HLEN + 8, ETH_HLEN + 24], 16)
            } else {
                (Family::V4, [ETH_HLEN + 12, ETH_HLEN + 16], 4)
            };
            let offset = *offsets.choose(rng).expect("not empty");
            let addr = interesting_addrs(family, rng);
            if frame.len() >= offset + len {
                frame[offset..offset + len].copy_from_slice(&addr[..len]);
            }
        }
        8 => {
            // TTL or hop limit.
            let v6 = frame.get(12..14) == Some(&[0x86, 0xdd]);
            let i = if v6 { ETH_HLEN + 7 } else { ETH_HLEN + 8 };
            if frame.len() > i {
                frame[i] = *[0, 1, 2, 255].choose(rng).expect("not empty");
            }
        }
        9 => {
            // Fragment flags and offset (IPv4).
            if frame.len() >= ETH_HLEN + 8 && frame[12..14] == [0x08, 0x00] {
                let value: u16 = *[0x2000, 0x0001, 0x2001, 0x4000, 0x1fff, rng.random()]
                    .choose(rng)
                    .expect("not empty");
                frame[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&value.to_be_bytes());
            }
        }
        10 => {
            // The ethertype.
            if frame.len() >= 14 {
                let value: [u8; 2] = *[[0x08, 0x00], [0x86, 0xdd], [0x81, 0x00], [0x08, 0x06]]
                    .choose(rng)
                    .expect("not empty");
                frame[12..14].copy_from_slice(&value);
            }
        }
        _ => {
            // A protocol or next-header byte.
            let v6 = frame.get(12..14) == Some(&[0x86, 0xdd]);
            let i = if v6 { ETH_HLEN + 6 } else { ETH_HLEN + 9 };
            if frame.len() > i {
                frame[i] = *[0, 1, 6, 17, 43, 44, 51, 58, 60, 132, rng.random()]
                    .choose(rng)
                    .expect("not empty");
            }
        }
    }
    if fix {
        fix_checksums(frame);
    }
}

/// Random bytes, often with an IP ethertype and version.
pub fn random_frame(rng: &mut SmallRng) -> Vec<u8> {
    let len = rng.random_range(0..200);
    let mut frame = vec![0u8; len];
    rng.fill_bytes(&mut frame);
    if len >= 15 && rng.random_bool(0.7) {
        if rng.random_bool(0.5) {
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            frame[14] = 0x45;
        } else {
            frame[12..14].copy_from_slice(&[0x86, 0xdd]);
            frame[14] = 0x60;
        }
        if rng.random_bool(0.5) {
            fix_ip_length(&mut frame);
        }
    }
    frame
}

/// A frame for a single step: seed, mutated seed, or random bytes.
pub fn any_frame(rng: &mut SmallRng) -> Vec<u8> {
    match rng.random_range(0..10) {
        0..=2 => seed_frame(rng),
        3..=8 => {
            let mut frame = seed_frame(rng);
            mutate(&mut frame, rng);
            frame
        }
        _ => random_frame(rng),
    }
}
/// Every truncation of `frame`, raw and with the IP length made to fit.
pub fn truncations(frame: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for len in 0..frame.len() {
        let cut = frame[..len].to_vec();
        let mut fitted = cut.clone();
        fix_ip_length(&mut fitted);
        out.push(cut.clone());
        if fitted != cut {
            out.push(fitted);
        }
    }
    out
}
