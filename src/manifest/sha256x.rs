//! SHA-256 of several chunks at once.
//!
//! A manifest hashes every data chunk of a backup, chunk by chunk: the
//! chunks are independent messages of the same length. One SHA-256 stream
//! is a chain of dependent rounds, so on x86-64's SHA extensions
//! (`sha256rnds2`) a single stream waits on the instruction's latency most
//! of the time. [`digest_many`] runs [`LANES`] messages in lockstep, their
//! rounds interleaved, so the instructions of one stream issue while another
//! waits: the same digests (each lane is plain FIPS 180-4 SHA-256 of its
//! message, checked against the `sha2` crate in the tests) for a fraction
//! of the time. Without the SHA extensions, and for a message whose
//! neighbours have other lengths, it hashes with `sha2` one message at a
//! time.

use super::Sha;
use sha2::{Digest, Sha256};

/// Messages hashed in lockstep.
pub const LANES: usize = 4;

/// True when [`digest_many`] hashes equal-length messages in lockstep on
/// this CPU (otherwise it hashes them one by one, and gathering messages
/// for it gains nothing).
pub fn batches() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::available();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// SHA-256 of each message in `msgs`, in order, into `out` (same length).
pub fn digest_many(msgs: &[&[u8]], out: &mut [Sha]) {
    debug_assert_eq!(msgs.len(), out.len());
    let mut i = 0;
    while i < msgs.len() {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // The next messages of the same length, up to LANES of them.
            let k = msgs[i..]
                .iter()
                .take(LANES)
                .take_while(|m| m.len() == msgs[i].len())
                .count();
            if k > 1 {
                x86::digest_lanes(&msgs[i..i + k], &mut out[i..i + k]);
                i += k;
                continue;
            }
        }
        out[i] = Sha256::digest(msgs[i]).into();
        i += 1;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Sha;

    use std::arch::x86_64::*;

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    const H0: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    /// True when this CPU has what [`digest_lanes`] uses.
    pub fn available() -> bool {
        use std::sync::OnceLock;
        static HAVE: OnceLock<bool> = OnceLock::new();
        *HAVE.get_or_init(|| {
            is_x86_feature_detected!("sha")
                && is_x86_feature_detected!("sse2")
                && is_x86_feature_detected!("ssse3")
                && is_x86_feature_detected!("sse4.1")
        })
    }

    /// SHA-256 of 2 to [`super::LANES`] messages of the same length, into `out`
    /// (anything else: one by one with `sha2`).
    pub fn digest_lanes(msgs: &[&[u8]], out: &mut [Sha]) {
        let same = msgs.iter().all(|m| m.len() == msgs[0].len()) && msgs.len() == out.len();
        // SAFETY (each arm): as many messages as lanes, all of one length
        // (`same`), and the CPU has the features `lanes` is compiled for
        // (`available`).
        match msgs.len() {
            2 if same && available() => out.copy_from_slice(&unsafe { lanes::<2>(msgs) }),
            3 if same && available() => out.copy_from_slice(&unsafe { lanes::<3>(msgs) }),
            4 if same && available() => out.copy_from_slice(&unsafe { lanes::<4>(msgs) }),
            _ => {
                use sha2::{Digest, Sha256};
                for (m, o) in msgs.iter().zip(out.iter_mut()) {
                    *o = Sha256::digest(m).into();
                }
            }
        }
    }

    /// The state of one stream, in the order `sha256rnds2` takes it.
    #[derive(Clone, Copy)]
    struct State {
        abef: __m128i,
        cdgh: __m128i,
    }

    /// SHA-256 of the N messages of `msgs`.
    ///
    /// # Safety
    ///
    /// `msgs` holds exactly N messages, all of the same length, and the CPU
    /// has the features this is compiled for.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn lanes<const N: usize>(msgs: &[&[u8]]) -> [Sha; N] {
        let len = msgs[0].len();
        let full = len / 64;
        let mut st = [init(); N];
        let mut ptrs = [std::ptr::null(); N];
        for b in 0..full {
            for (q, m) in ptrs.iter_mut().zip(msgs) {
                // SAFETY: every message holds `len >= (b + 1) * 64` bytes.
                *q = unsafe { m.as_ptr().add(b * 64) };
            }
            // SAFETY: each pointer has 64 bytes of its message behind it.
            unsafe { compress(&mut st, ptrs) };
        }
        // The tail and the padding: one block, or two when the tail leaves
        // no room for the 0x80 byte and the 8-byte length.
        let tail = len - full * 64;
        let mut pad = [[0u8; 128]; N];
        let n = if tail < 56 { 64 } else { 128 };
        for (p, m) in pad.iter_mut().zip(msgs) {
            p[..tail].copy_from_slice(&m[full * 64..]);
            p[tail] = 0x80;
            p[n - 8..n].copy_from_slice(&((len as u64) * 8).to_be_bytes());
        }
        for half in 0..n / 64 {
            for (q, p) in ptrs.iter_mut().zip(&pad) {
                *q = p[half * 64..].as_ptr();
            }
            // SAFETY: each pointer has 64 bytes of `pad` behind it.
            unsafe { compress(&mut st, ptrs) };
        }
        st.map(|s| finish(s))
    }

    #[inline]
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn init() -> State {
        // SAFETY: H0 holds 8 u32s; unaligned loads of 16 bytes each.
        let (abcd, efgh) = unsafe {
            (
                _mm_loadu_si128(H0.as_ptr().cast()),
                _mm_loadu_si128(H0.as_ptr().add(4).cast()),
            )
        };
        let cdab = _mm_shuffle_epi32(abcd, 0xB1);
        let hgfe = _mm_shuffle_epi32(efgh, 0x1B);
        State {
            abef: _mm_alignr_epi8(cdab, hgfe, 8),
            cdgh: _mm_blend_epi16(hgfe, cdab, 0xF0),
        }
    }

    #[inline]
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn finish(s: State) -> Sha {
        let feba = _mm_shuffle_epi32(s.abef, 0x1B);
        let dchg = _mm_shuffle_epi32(s.cdgh, 0xB1);
        let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
        let hgef = _mm_alignr_epi8(dchg, feba, 8);
        let mut words = [0u32; 8];
        // SAFETY: `words` holds 8 u32s; unaligned stores of 16 bytes each.
        unsafe {
            _mm_storeu_si128(words.as_mut_ptr().cast(), dcba);
            _mm_storeu_si128(words.as_mut_ptr().add(4).cast(), hgef);
        }
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(words) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }

    /// One 64-byte block of every lane, read at `blocks[lane]`. The loops
    /// over lanes are unrolled, so each step of the rounds is issued for all
    /// lanes back to back.
    ///
    /// # Safety
    ///
    /// Each pointer has 64 readable bytes behind it, and the caller is
    /// compiled with the SHA extensions.
    #[inline(always)]
    unsafe fn compress<const N: usize>(st: &mut [State; N], blocks: [*const u8; N]) {
        // SAFETY: as the function's contract says; K holds 64 u32s.
        unsafe {
            let bswap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
            let saved = *st;
            let mut w = [[_mm_setzero_si128(); 4]; N];
            for l in 0..N {
                for (j, wj) in w[l].iter_mut().enumerate() {
                    *wj = _mm_shuffle_epi8(_mm_loadu_si128(blocks[l].add(16 * j).cast()), bswap);
                }
            }
            for r in 0..16 {
                let k = _mm_loadu_si128(K.as_ptr().add(4 * r).cast());
                for l in 0..N {
                    let wl = &mut w[l];
                    if r >= 4 {
                        // W[4r..4r+4] from the four previous groups, kept in
                        // a ring of four.
                        let (a, b, c, d) =
                            (wl[r % 4], wl[(r + 1) % 4], wl[(r + 2) % 4], wl[(r + 3) % 4]);
                        wl[r % 4] = _mm_sha256msg2_epu32(
                            _mm_add_epi32(_mm_sha256msg1_epu32(a, b), _mm_alignr_epi8(d, c, 4)),
                            d,
                        );
                    }
                    let t = _mm_add_epi32(wl[r % 4], k);
                    let s = &mut st[l];
                    s.cdgh = _mm_sha256rnds2_epu32(s.cdgh, s.abef, t);
                    s.abef = _mm_sha256rnds2_epu32(s.abef, s.cdgh, _mm_shuffle_epi32(t, 0x0E));
                }
            }
            for l in 0..N {
                st[l].abef = _mm_add_epi32(st[l].abef, saved[l].abef);
                st[l].cdgh = _mm_add_epi32(st[l].cdgh, saved[l].cdgh);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::noise as bytes;

    #[test]
    fn every_lane_is_the_sha256_of_its_message() {
        // Lengths around the one- and two-block padding boundaries, and a
        // chunk's.
        for len in [
            0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 1000, 4096, 65536,
        ] {
            let data: Vec<Vec<u8>> = (0..11).map(|s| bytes(s * 1000 + len as u64, len)).collect();
            let msgs: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
            let mut got = vec![[0u8; 32]; msgs.len()];
            digest_many(&msgs, &mut got);
            for (m, g) in msgs.iter().zip(&got) {
                let want: Sha = Sha256::digest(m).into();
                assert_eq!(*g, want, "length {len}");
            }
        }
    }

    #[test]
    fn mixed_lengths_fall_back_where_a_group_differs() {
        // Groups of 3, 2, 4, 1 and single messages of other lengths.
        let lens = [64, 64, 64, 63, 63, 64, 64, 64, 64, 64, 10, 0];
        let data: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(s, &n)| bytes(s as u64, n))
            .collect();
        let msgs: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
        let mut got = vec![[0u8; 32]; msgs.len()];
        digest_many(&msgs, &mut got);
        for (m, g) in msgs.iter().zip(&got) {
            assert_eq!(*g, <Sha>::from(Sha256::digest(m)));
        }
        // The known answer for "abc" in a full group.
        let abc: Vec<&[u8]> = vec![b"abc"; LANES];
        let mut got = vec![[0u8; 32]; LANES];
        digest_many(&abc, &mut got);
        let hex: String = got[LANES - 1].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
