//! BLAKE2s (RFC 7693), as far as the XDP shield needs it to check a handshake message's mac1.
//!
//! mac1 is the keyed 16-byte BLAKE2s of the message's first bytes (116 of an initiation, 60 of a
//! response) under `HASH("mac1----" ‖ responder's public key)`. The key block is the same for
//! every message, so the daemon compresses it once ([`keyed_midstate`]) and hands the state to
//! the kernel, which compresses the message's one or two blocks ([`mac16`]). Every index is a
//! constant, no loop is unbounded, as the verifier requires; the daemon's
//! tests hold this code against the `blake2` crate.

/// The BLAKE2s initialisation vector.
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];

/// Length of a BLAKE2s block.
pub const BLOCK: usize = 64;

/// The working memory of one keyed hash. In the kernel it lives in a per-CPU map value: the
/// unrolled rounds keep no array on the BPF stack (512 bytes for all frames), since every
/// access to `v` is a real load or store rather than a register LLVM would spill.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct State {
    /// The chaining value; after [`mac16`], the MAC in its first four words (little-endian).
    pub h: [u32; 8],
    v: [u32; 16],
    m: [u32; 16],
}

impl State {
    /// A state starting from chaining value `h` (a key's [`keyed_midstate`]).
    pub const fn new(h: [u32; 8]) -> State {
        State {
            h,
            v: [0; 16],
            m: [0; 16],
        }
    }
}

#[inline(always)]
fn get(v: &[u32; 16], i: usize) -> u32 {
    // SAFETY: `&v[i]` is a valid, aligned, initialised element (the index is checked).
    unsafe { core::ptr::read_volatile(&v[i]) }
}

#[inline(always)]
fn set(v: &mut [u32; 16], i: usize, x: u32) {
    // SAFETY: `&mut v[i]` is a valid, aligned element we hold exclusively.
    unsafe { core::ptr::write_volatile(&mut v[i], x) }
}

#[inline(always)]
fn g(v: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize, x: u32, y: u32) {
    let mut va = get(v, a);
    let mut vb = get(v, b);
    let mut vc = get(v, c);
    let mut vd = get(v, d);
    va = va.wrapping_add(vb).wrapping_add(x);
    vd = (vd ^ va).rotate_right(16);
    vc = vc.wrapping_add(vd);
    vb = (vb ^ vc).rotate_right(12);
    va = va.wrapping_add(vb).wrapping_add(y);
    vd = (vd ^ va).rotate_right(8);
    vc = vc.wrapping_add(vd);
    vb = (vb ^ vc).rotate_right(7);
    set(v, a, va);
    set(v, b, vb);
    set(v, c, vc);
    set(v, d, vd);
}

/// One round, with the message schedule of that round written out (constant indices).
macro_rules! round {
    ($v:expr, $m:expr, $s0:literal, $s1:literal, $s2:literal, $s3:literal, $s4:literal, $s5:literal,
     $s6:literal, $s7:literal, $s8:literal, $s9:literal, $s10:literal, $s11:literal, $s12:literal,
     $s13:literal, $s14:literal, $s15:literal) => {
        g($v, 0, 4, 8, 12, $m[$s0], $m[$s1]);
        g($v, 1, 5, 9, 13, $m[$s2], $m[$s3]);
        g($v, 2, 6, 10, 14, $m[$s4], $m[$s5]);
        g($v, 3, 7, 11, 15, $m[$s6], $m[$s7]);
        g($v, 0, 5, 10, 15, $m[$s8], $m[$s9]);
        g($v, 1, 6, 11, 12, $m[$s10], $m[$s11]);
        g($v, 2, 7, 8, 13, $m[$s12], $m[$s13]);
        g($v, 3, 4, 9, 14, $m[$s14], $m[$s15]);
    };
}

/// The compression function: fold the block in `s.m` into `s.h`, `t` bytes hashed so far
/// (this block included), `last` for the final block. Not inlined: one copy in the kernel.
#[inline(never)]
fn compress(s: &mut State, t: u64, last: bool) {
    let mut i = 0;
    while i < 8 {
        set(&mut s.v, i, s.h[i]);
        set(&mut s.v, i + 8, IV[i]);
        i += 1;
    }
    set(&mut s.v, 12, IV[4] ^ t as u32);
    set(&mut s.v, 13, IV[5] ^ (t >> 32) as u32);
    if last {
        set(&mut s.v, 14, !IV[6]);
    }
    let (v, m) = (&mut s.v, &s.m);
    round!(v, m, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    round!(v, m, 14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3);
    round!(v, m, 11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4);
    round!(v, m, 7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8);
    round!(v, m, 9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13);
    round!(v, m, 2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9);
    round!(v, m, 12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11);
    round!(v, m, 13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10);
    round!(v, m, 6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5);
    round!(v, m, 10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0);
    let mut i = 0;
    while i < 8 {
        s.h[i] ^= get(&s.v, i) ^ get(&s.v, i + 8);
        i += 1;
    }
}

/// Load the 64-byte block at `offset` of `bytes` into `s.m` (little-endian words).
#[inline(always)]
fn load(s: &mut State, bytes: &[u8; 2 * BLOCK], offset: usize) {
    let mut i = 0;
    while i < 16 {
        let at = offset + 4 * i;
        s.m[i] = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        i += 1;
    }
}

/// The state after the key block of a keyed BLAKE2s with a 32-byte `key` and 16-byte output,
/// for a message that is not empty.
pub fn keyed_midstate(key: &[u8; 32]) -> [u32; 8] {
    let mut s = State::new(IV);
    s.h[0] ^= 0x0101_0000 ^ (32 << 8) ^ 16;
    let mut block = [0u8; 2 * BLOCK];
    block[..32].copy_from_slice(key);
    load(&mut s, &block, 0);
    compress(&mut s, BLOCK as u64, false);
    s.h
}

/// The 16-byte keyed MAC of the first `len` bytes of `msg` (1 ≤ `len` ≤ 128; the bytes after
/// `len` must be zero), starting from the key's [`keyed_midstate`] in `s.h`; the MAC is left
/// in `s.h[..4]`.
#[inline(always)]
pub fn mac16(s: &mut State, msg: &[u8; 2 * BLOCK], len: usize) {
    let total = (BLOCK + len) as u64;
    load(s, msg, 0);
    if len > BLOCK {
        compress(s, 2 * BLOCK as u64, false);
        load(s, msg, BLOCK);
        compress(s, total, true);
    } else {
        compress(s, total, true);
    }
}
