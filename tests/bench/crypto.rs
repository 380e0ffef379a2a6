//! `cargo xtask bench crypto`: seal and open of one data message's payload (64 bytes and an
//! MTU's worth, 1,424 bytes padded) with each ChaCha20-Poly1305 candidate built into this
//! workspace, on this machine: RustCrypto's `chacha20poly1305` as we build it, `ring` (what the
//! data plane ships), and the data plane's own `Keypair` (ring plus header, counter and replay
//! window; open once per message and as the workers open a run, the window locked once).
//! Single-threaded, median of 5 runs of a fixed number of operations.

use std::time::Instant;

use chacha20poly1305::{AeadInPlace, ChaCha20Poly1305, KeyInit};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use serde_json::json;
use tunnelmesh_daemon::{protocol::noise::SessionKeys, protocol::session::Keypair};
use zeroize::Zeroizing;

use super::write_json;

const OPS: usize = 20_000;

/// Nanoseconds per operation: median of 5 runs of `OPS` calls.
fn time(mut op: impl FnMut(usize)) -> f64 {
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            for i in 0..OPS {
                op(i);
            }
            start.elapsed().as_nanos() as f64 / OPS as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

fn nonce12(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

pub fn run() {
    let key = [7u8; 32];
    let rust_crypto = ChaCha20Poly1305::new(&key.into());
    let ring_key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).unwrap());
    let keys = |send: u8, recv: u8, initiator| SessionKeys {
        send: Zeroizing::new([send; 32]),
        recv: Zeroizing::new([recv; 32]),
        local_index: 1,
        remote_index: 2,
        is_initiator: initiator,
    };
    let mut rows = Vec::new();
    for size in [64usize, 1424] {
        let mut buf = vec![0x5au8; size];
        let mut tag = [0u8; 16];
        let rc_seal = time(|i| {
            let t = rust_crypto
                .encrypt_in_place_detached(&nonce12(i as u64).into(), &[], &mut buf)
                .unwrap();
            tag.copy_from_slice(&t);
        });
        let plain = vec![0x5au8; size];
        let mut sealed = plain.clone();
        let t = rust_crypto
            .encrypt_in_place_detached(&nonce12(0).into(), &[], &mut sealed)
            .unwrap();
        let rc_open = time(|_| {
            buf.copy_from_slice(&sealed);
            rust_crypto
                .decrypt_in_place_detached(&nonce12(0).into(), &[], &mut buf, &t)
                .unwrap();
        });
        let ring_seal = time(|i| {
            let t = ring_key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce12(i as u64)), Aad::empty(), &mut buf)
                .unwrap();
            tag.copy_from_slice(t.as_ref());
        });
        let mut sealed_with_tag = sealed.clone();
        sealed_with_tag.extend_from_slice(&t);
        let mut work = sealed_with_tag.clone();
        let ring_open = time(|_| {
            work.copy_from_slice(&sealed_with_tag);
            ring_key
                .open_in_place(Nonce::assume_unique_for_key(nonce12(0)), Aad::empty(), &mut work)
                .unwrap();
        });
        // The data plane's own path: header, padding, counter, tag; open checks the replay
        // window too (each message once, so they are sealed ahead).
        let now = Instant::now();
        let a = Keypair::new(&keys(1, 2, true), now);
        let mut msg = vec![0u8; 16 + size + 32];
        let keypair_seal = time(|_| {
            a.seal(&mut msg, size, now).unwrap();
        });
        let c = Keypair::new(&keys(3, 4, true), now);
        let d = Keypair::new(&keys(4, 3, false), now);
        let msgs: Vec<Vec<u8>> = (0..OPS * 5)
            .map(|_| {
                let mut m = vec![0u8; 16 + size + 32];
                let n = c.seal(&mut m, size, now).unwrap();
                m.truncate(n);
                m
            })
            .collect();
        let mut next = 0;
        let mut work = msgs[0].clone();
        let keypair_open = time(|_| {
            work.copy_from_slice(&msgs[next]);
            next += 1;
            d.open(&mut work, now).unwrap();
        });
        // The same messages opened as the workers open a run: the window locked once.
        let e = Keypair::new(&keys(4, 3, false), now);
        let mut rx = e.receiving();
        next = 0;
        let run_open = time(|_| {
            work.copy_from_slice(&msgs[next]);
            next += 1;
            rx.open(&mut work, now).unwrap();
        });
        for (name, seal, open) in [
            ("chacha20poly1305 0.10 (RustCrypto)", rc_seal, rc_open),
            ("ring 0.17", ring_seal, ring_open),
            ("Keypair (ring, shipped)", keypair_seal, keypair_open),
            ("Keypair, open in a run (window locked once)", keypair_seal, run_open),
        ] {
            rows.push(json!({
                "aead": name, "bytes": size, "seal_ns": seal, "open_ns": open,
                "seal_gbit_per_s": size as f64 * 8.0 / seal,
            }));
        }
    }
    println!("| AEAD | bytes | seal µs | open µs | seal Gbit/s (one core) |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} |",
            r["aead"].as_str().unwrap(),
            r["bytes"],
            r["seal_ns"].as_f64().unwrap() / 1e3,
            r["open_ns"].as_f64().unwrap() / 1e3,
            r["seal_gbit_per_s"].as_f64().unwrap()
        );
    }
    write_json(
        "crypto",
        &json!({ "suite": "crypto", "ops": OPS, "arch": std::env::consts::ARCH, "results": rows }),
    );
}
