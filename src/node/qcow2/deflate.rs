//! Raw deflate (RFC 1951) of one qcow2 cluster with a 4 KiB window, the
//! form QEMU inflates (`inflateInit2(-12)`).
//!
//! A cluster is compressed alone and whole, so the encoder keeps no stream
//! state between clusters (its tables are cleared: a cluster always
//! compresses to the same bytes). Within one:
//!
//! * hash chains of 4-byte prefixes (a ring of 16-bit links, as far back as
//!   the window) and a table of the last position of each 3-byte prefix,
//!   for short near matches; every candidate's bytes are compared before it
//!   is used;
//! * lazy parsing: the next position's match is taken when it is longer
//!   by enough to pay for its distance;
//! * a 3-byte match is taken only when it costs fewer bits than its three
//!   literals, estimated from the cluster's byte histogram and then from
//!   the symbols chosen so far (on text of digits the literals are cheaper;
//!   zlib takes every such match);
//! * blocks of up to 16 K symbols written as whichever of dynamic Huffman,
//!   fixed Huffman or stored is smallest, computed exactly;
//! * match distances up to the full 4096 bytes (zlib's own encoder stops
//!   262 bytes short of its window).
//!
//! Nothing here can panic on any input: every index is bounded by the
//! cluster's length, and output larger than the caller's limit is
//! reported as `None` (the cluster is then written uncompressed). The
//! tests inflate with zlib itself, whose 4 KiB window refuses a distance
//! too far back.

/// Largest match distance: the 4 KiB window QEMU inflates with.
const WINDOW: usize = 4096;
/// The ring of chain links: larger than the window, so a link is never
/// overwritten while a position within the window can still reach it.
const RING: usize = 8192;
const MAX_MATCH: usize = 258;
const HASH4_BITS: u32 = 15;
const HASH3_BITS: u32 = 15;
/// Symbols between estimates of what symbols cost.
const REPRICE: usize = 1024;
/// Symbols per block before it is written.
const BLOCK_SYMS: usize = 16 << 10;

const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order code length code lengths are sent in.
const PRECODE_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// Length code (0..29, i.e. symbol 257 + code) of every match length.
const LEN_CODE: [u8; MAX_MATCH + 1] = {
    let mut t = [0u8; MAX_MATCH + 1];
    let mut code = 0;
    while code < 29 {
        let end = if code == 28 {
            MAX_MATCH + 1
        } else {
            LEN_BASE[code + 1] as usize
        };
        let mut l = LEN_BASE[code] as usize;
        while l < end {
            t[l] = code as u8;
            l += 1;
        }
        code += 1;
    }
    // 258 has its own code; 227..257 end at code 27.
    t[MAX_MATCH] = 28;
    t
};

/// Distance code of every distance within the window.
const DIST_CODE: [u8; WINDOW + 1] = {
    let mut t = [0u8; WINDOW + 1];
    let mut code = 0;
    while code < 24 {
        let mut d = DIST_BASE[code] as usize;
        let end = DIST_BASE[code + 1] as usize;
        while d < end && d <= WINDOW {
            t[d] = code as u8;
            d += 1;
        }
        code += 1;
    }
    t
};

/// How hard a level searches.
#[derive(Debug, Clone, Copy)]
struct Effort {
    /// Chain links followed per search.
    depth: u32,
    /// With a match this long, the next position is searched a quarter as deep.
    good: usize,
    /// With a match this long, the next position is not tried.
    lazy: usize,
    /// A match this long ends the search.
    nice: usize,
}

fn effort(level: u32) -> Effort {
    let (depth, good, lazy, nice) = match level {
        0 | 1 => (2, 4, 0, 8),
        2 => (4, 4, 0, 16),
        3 => (6, 4, 4, 16),
        4 => (8, 8, 16, 32),
        5 => (12, 8, 16, 48),
        6 => (16, 8, 32, 64),
        7 => (32, 16, 64, 128),
        8 => (96, 32, 128, 258),
        _ => (256, 64, 258, 258),
    };
    Effort {
        depth,
        good,
        lazy,
        nice,
    }
}

/// One thread's encoder: its tables (about 200 KiB) are reused from
/// cluster to cluster.
pub struct Deflater {
    head4: Box<[u16; 1 << HASH4_BITS]>,
    head3: Box<[u16; 1 << HASH3_BITS]>,
    prev: Box<[u16; RING]>,
    syms: Vec<u32>,
    lit_freq: [u32; 286],
    dist_freq: [u32; 30],
    /// What each literal/length symbol and each distance code is expected
    /// to cost, in sixteenths of a bit: first from the cluster's byte
    /// histogram, then from the symbols chosen so far in the block.
    lit_cost: [u16; 286],
    dist_cost: [u16; 30],
    /// Symbols until the costs are estimated again.
    reprice: usize,
    out: Bits,
}

impl Default for Deflater {
    fn default() -> Deflater {
        Deflater::new()
    }
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater").finish_non_exhaustive()
    }
}

#[inline]
fn read4(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[at..at + 4]);
    u32::from_le_bytes(b)
}

#[inline]
fn read8(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[at..at + 8]);
    u64::from_le_bytes(b)
}

#[inline]
fn hash4(v: u32) -> usize {
    (v.wrapping_mul(0x1E35_A7BD) >> (32 - HASH4_BITS)) as usize
}

#[inline]
fn hash3(v: u32) -> usize {
    ((v << 8).wrapping_mul(0x1E35_A7BD) >> (32 - HASH3_BITS)) as usize
}

/// How many bytes at `a` and `b` (`a < b`) agree, up to `max`
/// (`b + max <= data.len()`).
#[inline(always)]
fn match_len(data: &[u8], a: usize, b: usize, max: usize) -> usize {
    let mut l = 0;
    while l + 8 <= max {
        let x = read8(data, a + l) ^ read8(data, b + l);
        if x != 0 {
            return l + (x.trailing_zeros() / 8) as usize;
        }
        l += 8;
    }
    while l < max && data[a + l] == data[b + l] {
        l += 1;
    }
    l
}

/// log2 of `ratio` in sixteenths of a bit, 1 to 15 bits.
fn sixteenths(num: u32, den: u32) -> u16 {
    /// log2 in sixteenths: the top bit's place and the four bits below it
    /// (a linear step between powers of two).
    fn log2_16(x: u32) -> i32 {
        let x = x.max(1);
        let top = 31 - x.leading_zeros();
        let frac = ((u64::from(x) << 4) >> top) & 15;
        (top * 16) as i32 + frac as i32
    }
    (log2_16(num) - log2_16(den)).clamp(16, 240) as u16
}

#[inline]
fn log2(x: usize) -> i32 {
    (usize::BITS - 1 - x.max(1).leading_zeros()) as i32
}

impl Deflater {
    /// A new encoder.
    pub fn new() -> Deflater {
        Deflater {
            head4: Box::new([0; 1 << HASH4_BITS]),
            head3: Box::new([0; 1 << HASH3_BITS]),
            prev: Box::new([0; RING]),
            syms: Vec::with_capacity(BLOCK_SYMS),
            lit_freq: [0; 286],
            dist_freq: [0; 30],
            lit_cost: [0; 286],
            dist_cost: [0; 30],
            reprice: 0,
            out: Bits::default(),
        }
    }

    /// Compress `src` at `level` (1 to 9) into `out`: the length written,
    /// or None when it would not fit.
    pub fn compress(&mut self, src: &[u8], level: u32, out: &mut [u8]) -> Option<usize> {
        // Cleared, so a cluster compresses the same whatever came before.
        self.head4.fill(0);
        self.head3.fill(0);
        self.out.clear(out.len());
        self.price_literals(src);
        self.syms.clear();
        self.lit_freq = [0; 286];
        self.dist_freq = [0; 30];
        self.parse(src, effort(level), out.len())?;
        let bytes = self.out.finish();
        let dst = out.get_mut(..bytes.len())?;
        dst.copy_from_slice(bytes);
        Some(bytes.len())
    }

    /// The position a table entry (a position's low 16 bits) names, if
    /// it is within the window behind `pos`. An entry may be left from an
    /// earlier cluster, or name another position with the same low bits:
    /// every candidate's bytes are compared before it is used, so such an
    /// entry costs a comparison, never a wrong match.
    #[inline]
    fn candidate(entry: u16, pos: usize) -> Option<usize> {
        let d = (pos as u16).wrapping_sub(entry) as usize;
        if d.wrapping_sub(1) < WINDOW {
            pos.checked_sub(d)
        } else {
            None
        }
    }

    /// The chain link of `pos` to the entry that was the head of its hash.
    #[inline]
    fn link(entry: u16, pos: usize) -> u16 {
        let d = (pos as u16).wrapping_sub(entry);
        if usize::from(d).wrapping_sub(1) < WINDOW.min(pos) {
            d
        } else {
            0
        }
    }

    /// Enter `pos`, whose first 4 bytes are `here`, into the tables; the
    /// heads of its 4-byte and 3-byte hashes before it.
    #[inline(always)]
    fn enter(&mut self, here: u32, pos: usize) -> (u16, u16) {
        let (h4, h3) = (hash4(here), hash3(here));
        let heads = (self.head4[h4], self.head3[h3]);
        self.prev[pos % RING] = Self::link(heads.0, pos);
        self.head4[h4] = pos as u16;
        self.head3[h3] = pos as u16;
        heads
    }

    #[inline(always)]
    fn insert(&mut self, data: &[u8], pos: usize) {
        self.enter(read4(data, pos), pos);
    }

    /// Insert `pos` into the tables and return its longest match longer
    /// than `best` behind it: (length, distance), or (best, 0). Needs
    /// `pos + 4 <= data.len()`.
    #[inline(always)]
    fn longest(
        &mut self,
        data: &[u8],
        pos: usize,
        mut best: usize,
        depth: u32,
        nice: usize,
    ) -> (usize, usize) {
        let max = (data.len() - pos).min(MAX_MATCH);
        let here = read4(data, pos);
        let (head, head3) = self.enter(here, pos);

        let mut dist = 0;
        if best >= max {
            return (best, 0);
        }
        let mut cand = Self::candidate(head, pos);
        let mut left = depth;
        while let Some(c) = cand {
            if data[c + best] == data[pos + best] && read4(data, c) == here {
                let l = match_len(data, c, pos, max);
                if l > best {
                    best = l;
                    dist = pos - c;
                    if l >= nice || l >= max {
                        break;
                    }
                }
            }
            left -= 1;
            if left == 0 {
                break;
            }
            let link = self.prev[c % RING] as usize;
            if link == 0 || link > c || pos - c + link > WINDOW {
                break;
            }
            cand = Some(c - link);
        }
        if dist == 0 && best < 3 {
            // No 4-byte match: a near 3-byte one.
            if let Some(c) = Self::candidate(head3, pos)
                && read4(data, c) & 0xFF_FFFF == here & 0xFF_FFFF
            {
                return (match_len(data, c, pos, max), pos - c);
            }
        }
        (best, dist)
    }

    /// Estimate literal costs from the cluster's byte histogram; a length
    /// code about 7 bits, a distance code 5.
    fn price_literals(&mut self, src: &[u8]) {
        let mut count = [0u32; 256];
        for &b in src {
            count[b as usize] += 1;
        }
        let n = src.len() as u32;
        for (cost, &c) in self.lit_cost.iter_mut().zip(&count) {
            *cost = sixteenths(n, c);
        }
        self.lit_cost[256..].fill(7 * 16);
        self.dist_cost.fill(5 * 16);
        self.reprice = REPRICE;
    }

    /// Estimate the costs from the symbols of the block so far.
    fn reprice(&mut self) {
        self.reprice = REPRICE;
        let lits: u32 = self.lit_freq.iter().sum();
        let dists: u32 = self.dist_freq.iter().sum();
        for (cost, &f) in self.lit_cost.iter_mut().zip(&self.lit_freq) {
            *cost = sixteenths(2 * lits, 2 * f + 1);
        }
        for (cost, &f) in self.dist_cost.iter_mut().zip(&self.dist_freq) {
            *cost = sixteenths(2 * dists, 2 * f + 1);
        }
    }

    /// Whether a 3-byte match costs less than its bytes as literals (with
    /// a bit to spare); a longer match always wins.
    #[inline]
    fn worth(&self, data: &[u8], pos: usize, len: usize, dist: usize) -> bool {
        if len >= 4 {
            return true;
        }
        let lits: u32 = data[pos..pos + len]
            .iter()
            .map(|&b| u32::from(self.lit_cost[b as usize]))
            .sum();
        let (lc, dc) = (LEN_CODE[len] as usize, DIST_CODE[dist.min(WINDOW)] as usize);
        let cost = u32::from(self.lit_cost[257 + lc])
            + u32::from(self.dist_cost[dc])
            + 16 * u32::from(LEN_EXTRA[lc] + DIST_EXTRA[dc]);
        cost < lits + 16
    }

    fn literal(&mut self, b: u8) {
        self.tick();
        self.lit_freq[b as usize] += 1;
        self.syms.push(u32::from(b));
    }

    #[inline]
    fn tick(&mut self) {
        self.reprice -= 1;
        if self.reprice == 0 {
            self.reprice();
        }
    }

    fn matched(&mut self, len: usize, dist: usize) {
        self.tick();
        self.lit_freq[257 + LEN_CODE[len] as usize] += 1;
        self.dist_freq[DIST_CODE[dist] as usize] += 1;
        self.syms
            .push(0x8000_0000 | ((dist as u32) << 8) | (len as u32 - 3));
    }

    /// Parse `data` into blocks; None when the output passes `limit`.
    fn parse(&mut self, data: &[u8], e: Effort, limit: usize) -> Option<()> {
        let n = data.len();
        let mut block_start = 0;
        let mut pos = 0;
        while pos < n {
            if self.syms.len() >= BLOCK_SYMS {
                self.write_block(data, block_start, pos, false);
                if self.out.len() > limit {
                    return None;
                }
                block_start = pos;
            }
            if pos + 4 > n {
                self.literal(data[pos]);
                pos += 1;
                continue;
            }
            let (mut len, mut dist) = self.longest(data, pos, 2, e.depth, e.nice);
            if dist == 0 || !self.worth(data, pos, len, dist) {
                self.literal(data[pos]);
                pos += 1;
                continue;
            }
            // The first position the tables do not hold yet.
            let mut next = pos + 1;
            while len < e.lazy && pos + 5 <= n {
                let depth = if len >= e.good {
                    e.depth / 4 + 1
                } else {
                    e.depth
                };
                let (l2, d2) = self.longest(data, pos + 1, len, depth, e.nice);
                next = pos + 2;
                if d2 == 0
                    || 4 * (l2 - len) as i32 + log2(dist) - log2(d2) <= 2
                    || !self.worth(data, pos + 1, l2, d2)
                {
                    break;
                }
                self.literal(data[pos]);
                pos += 1;
                (len, dist) = (l2, d2);
            }
            self.matched(len, dist);
            let end = pos + len;
            for q in next..end.min(n - 3) {
                self.insert(data, q);
            }
            pos = end;
        }
        self.write_block(data, block_start, n, true);
        (self.out.len() <= limit).then_some(())
    }

    /// Write the symbols gathered for `data[start..end]` as one block.
    fn write_block(&mut self, data: &[u8], start: usize, end: usize, last: bool) {
        self.lit_freq[256] = 1;
        let mut lit_len = [0u8; 286];
        let mut dist_len = [0u8; 30];
        code_lengths(&self.lit_freq, 15, &mut lit_len);
        code_lengths(&self.dist_freq, 15, &mut dist_len);
        let header = Header::new(&lit_len, &dist_len);
        // Bits of symbols counted `freq` times at `bits` each.
        let dot = |freq: &[u32], bits: &[u8]| -> u64 {
            freq.iter()
                .zip(bits)
                .map(|(&f, &b)| u64::from(f) * u64::from(b))
                .sum()
        };
        let extra_bits = dot(&self.lit_freq[257..], &LEN_EXTRA) + dot(&self.dist_freq, &DIST_EXTRA);
        let cost =
            |ll: &[u8], dl: &[u8]| dot(&self.lit_freq, ll) + dot(&self.dist_freq, dl) + extra_bits;
        let dynamic = 3 + header.bits + cost(&lit_len, &dist_len);
        let fixed = 3 + cost(&FIXED_LIT[..286], &FIXED_DIST);
        let len = end - start;
        // Stored: each piece of up to 65535 bytes costs its 3 header bits,
        // the padding to a byte (at most 7) and 32 length bits.
        let stored = (len.div_ceil(65535).max(1) as u64) * (3 + 7 + 32) + 8 * len as u64;

        if stored < dynamic.min(fixed) {
            self.write_stored(&data[start..end], last);
        } else if fixed <= dynamic {
            self.out.put(u64::from(last) | (1 << 1), 3);
            let (lc, dc) = (canonical(&FIXED_LIT), canonical(&FIXED_DIST));
            self.write_symbols(&FIXED_LIT, &lc, &FIXED_DIST, &dc);
        } else {
            self.out.put(u64::from(last) | (2 << 1), 3);
            header.write(&mut self.out);
            let (lc, dc) = (canonical(&lit_len), canonical(&dist_len));
            self.write_symbols(&lit_len, &lc, &dist_len, &dc);
        }
        self.syms.clear();
        self.lit_freq = [0; 286];
        self.dist_freq = [0; 30];
    }

    fn write_symbols(&mut self, ll: &[u8], lc: &[u16], dl: &[u8], dc: &[u16]) {
        // Every length's code and extra bits, as one field.
        let mut lens = [(0u32, 0u32); MAX_MATCH + 1];
        for (len, slot) in lens.iter_mut().enumerate().skip(3) {
            let c = LEN_CODE[len] as usize;
            let bits =
                u32::from(lc[257 + c]) | (u32::from(len as u16 - LEN_BASE[c]) << ll[257 + c]);
            *slot = (bits, u32::from(ll[257 + c]) + u32::from(LEN_EXTRA[c]));
        }
        let mut lits = [(0u32, 0u32); 256];
        for (b, slot) in lits.iter_mut().enumerate() {
            *slot = (u32::from(lc[b]), u32::from(ll[b]));
        }
        // The bit stream's state in registers: every symbol (at most 45
        // bits, on top of fewer than 8 held) writes the whole accumulator
        // and moves on by the bytes it completed.
        let out = &mut self.out;
        out.reserve(self.syms.len() * 8);
        let (mut acc, mut n, mut at) = (out.acc, out.n, out.at);
        for &s in &self.syms {
            let (bits, len) = if s & 0x8000_0000 == 0 {
                let (b, l) = lits[(s & 0xFF) as usize];
                (u64::from(b), l)
            } else {
                let (lbits, ln) = lens[(s & 0xFF) as usize + 3];
                let dist = ((s >> 8) & 0x1FFF) as usize;
                let d = DIST_CODE[dist.min(WINDOW)] as usize;
                let dbits = u64::from(dc[d]) | (u64::from(dist as u16 - DIST_BASE[d]) << dl[d]);
                (
                    u64::from(lbits) | (dbits << ln),
                    ln + u32::from(dl[d]) + u32::from(DIST_EXTRA[d]),
                )
            };
            acc |= bits << n;
            n += len;
            if let Some(dst) = out.buf.get_mut(at..at + 8) {
                dst.copy_from_slice(&acc.to_le_bytes());
            }
            let whole = n / 8;
            at += whole as usize;
            acc >>= whole * 8;
            n -= whole * 8;
        }
        (out.acc, out.n, out.at) = (acc, n, at);
        out.put(u64::from(lc[256]), u32::from(ll[256]));
    }

    fn write_stored(&mut self, mut data: &[u8], last: bool) {
        loop {
            let piece = data.len().min(65535);
            let final_piece = last && piece == data.len();
            self.out.put(u64::from(final_piece), 3);
            self.out.align();
            let l = piece as u16;
            self.out.bytes(&l.to_le_bytes());
            self.out.bytes(&(!l).to_le_bytes());
            self.out.bytes(&data[..piece]);
            data = &data[piece..];
            if data.is_empty() {
                break;
            }
        }
    }
}

/// The fixed code's lengths: all 288 symbols, as its codes count on the two
/// that are never sent.
const FIXED_LIT: [u8; 288] = {
    let mut t = [8u8; 288];
    let mut i = 144;
    while i < 256 {
        t[i] = 9;
        i += 1;
    }
    while i < 280 {
        t[i] = 7;
        i += 1;
    }
    t
};
const FIXED_DIST: [u8; 30] = [5; 30];

/// Canonical codes of `lens`, bit-reversed (deflate sends codes from their
/// top bit, into a bit stream filled from the bottom).
fn canonical<const N: usize>(lens: &[u8; N]) -> [u16; N] {
    let mut count = [0u16; 16];
    for &l in lens {
        count[l as usize] += 1;
    }
    count[0] = 0;
    let mut next = [0u16; 16];
    let mut code = 0u16;
    for bits in 1..16 {
        code = (code + count[bits - 1]) << 1;
        next[bits] = code;
    }
    let mut codes = [0u16; N];
    for (c, &l) in codes.iter_mut().zip(lens) {
        if l > 0 {
            let v = next[l as usize];
            next[l as usize] += 1;
            *c = v.reverse_bits() >> (16 - l);
        }
    }
    codes
}

/// Huffman code lengths of at most `limit` bits for `freq` (at most 288
/// symbols). At least two symbols get a code, as zlib does: a lone code
/// would be one bit long anyway, and some decoders want a complete code.
fn code_lengths(freq: &[u32], limit: u32, lens: &mut [u8]) {
    let n_all = freq.len().min(lens.len()).min(288);
    lens.fill(0);
    let mut leaves = [0u64; 288];
    let mut n = 0;
    for (s, &f) in freq.iter().enumerate().take(n_all) {
        if f > 0 {
            leaves[n] = (u64::from(f) << 16) | s as u64;
            n += 1;
        }
    }
    if n < 2 {
        let used = (n == 1).then(|| (leaves[0] & 0xFFFF) as usize);
        let other = if used == Some(0) { 1 } else { 0 };
        lens[used.unwrap_or(1).min(n_all - 1)] = 1;
        lens[other.min(n_all - 1)] = 1;
        return;
    }
    let leaves = &mut leaves[..n];
    leaves.sort_unstable();
    // Two queues: the sorted leaves and the internal nodes as made (their
    // weights only grow). Nodes 0..n are leaves, n.. internal.
    let mut weight = [0u64; 2 * 288];
    let mut parent = [0u16; 2 * 288];
    for (w, l) in weight.iter_mut().zip(leaves.iter()) {
        *w = l >> 16;
    }
    let (mut li, mut ii) = (0, n);
    for next in n..2 * n - 1 {
        let mut pick = || {
            if li < n && (ii >= next || weight[li] <= weight[ii]) {
                li += 1;
                li - 1
            } else {
                ii += 1;
                ii - 1
            }
        };
        let (a, b) = (pick(), pick());
        weight[next] = weight[a] + weight[b];
        parent[a] = next as u16;
        parent[b] = next as u16;
    }
    // Depths, from the root (the last node) down.
    let root = 2 * n - 2;
    let mut depth = [0u8; 2 * 288];
    let mut count = [0u32; 64];
    for i in (0..root).rev() {
        depth[i] = depth[parent[i] as usize].saturating_add(1);
    }
    for &d in &depth[..n] {
        count[d.min(63) as usize] += 1;
    }
    // Too-long codes: fold them into `limit` and rebalance (Kraft sum).
    let limit = limit as usize;
    for d in limit + 1..64 {
        count[limit] += count[d];
        count[d] = 0;
    }
    let mut kraft: u64 = (1..=limit)
        .map(|d| u64::from(count[d]) << (limit - d))
        .sum();
    while kraft > 1 << limit {
        count[limit] -= 1;
        for d in (1..limit).rev() {
            if count[d] != 0 {
                count[d] -= 1;
                count[d + 1] += 2;
                break;
            }
        }
        kraft -= 1;
    }
    // The rarest symbols get the longest codes.
    let mut k = 0;
    for d in (1..=limit).rev() {
        for _ in 0..count[d] {
            lens[(leaves[k] & 0xFFFF) as usize] = d as u8;
            k += 1;
        }
    }
}

/// A dynamic block's header: the code lengths, run-length coded with the
/// code length code.
struct Header {
    hlit: usize,
    hdist: usize,
    hclen: usize,
    /// (symbol, extra value, extra bits)
    ops: Vec<(u8, u8, u8)>,
    pre_len: [u8; 19],
    pre_code: [u16; 19],
    bits: u64,
}

impl Header {
    fn new(lit_len: &[u8; 286], dist_len: &[u8; 30]) -> Header {
        let hlit = 257
            + lit_len[257..]
                .iter()
                .rposition(|&l| l > 0)
                .map_or(0, |p| p + 1);
        let hdist = 1 + dist_len.iter().rposition(|&l| l > 0).unwrap_or(0);
        let all: Vec<u8> = lit_len[..hlit]
            .iter()
            .chain(&dist_len[..hdist])
            .copied()
            .collect();
        let mut ops = Vec::with_capacity(all.len());
        let mut i = 0;
        while i < all.len() {
            let l = all[i];
            let mut run = all[i..].iter().take_while(|&&x| x == l).count();
            i += run;
            if l == 0 {
                while run >= 11 {
                    let r = run.min(138);
                    ops.push((18, (r - 11) as u8, 7));
                    run -= r;
                }
                if run >= 3 {
                    ops.push((17, (run - 3) as u8, 3));
                    run = 0;
                }
            } else {
                ops.push((l, 0, 0));
                run -= 1;
                while run >= 3 {
                    let r = run.min(6);
                    ops.push((16, (r - 3) as u8, 2));
                    run -= r;
                }
            }
            for _ in 0..run {
                ops.push((l, 0, 0));
            }
        }
        let mut pre_freq = [0u32; 19];
        for &(s, _, _) in &ops {
            pre_freq[s as usize] += 1;
        }
        let mut pre_len = [0u8; 19];
        code_lengths(&pre_freq, 7, &mut pre_len);
        let hclen = 4.max(
            PRECODE_ORDER
                .iter()
                .rposition(|&s| pre_len[s] > 0)
                .map_or(0, |p| p + 1),
        );
        let bits = 14
            + 3 * hclen as u64
            + ops
                .iter()
                .map(|&(s, _, e)| u64::from(pre_len[s as usize]) + u64::from(e))
                .sum::<u64>();
        Header {
            hlit,
            hdist,
            hclen,
            ops,
            pre_code: canonical(&pre_len),
            pre_len,
            bits,
        }
    }

    fn write(&self, out: &mut Bits) {
        out.put((self.hlit - 257) as u64, 5);
        out.put((self.hdist - 1) as u64, 5);
        out.put((self.hclen - 4) as u64, 4);
        for &s in &PRECODE_ORDER[..self.hclen] {
            out.put(u64::from(self.pre_len[s]), 3);
        }
        for &(s, v, e) in &self.ops {
            let s = s as usize;
            out.put(
                u64::from(self.pre_code[s]) | (u64::from(v) << self.pre_len[s]),
                u32::from(self.pre_len[s]) + u32::from(e),
            );
        }
    }
}

/// The output bit stream, filled from each byte's low bit. Whole bytes go
/// out eight at a time: `put` writes the whole accumulator behind the last
/// byte and moves on by the bytes it completed.
#[derive(Default)]
struct Bits {
    buf: Vec<u8>,
    at: usize,
    acc: u64,
    n: u32,
}

impl Bits {
    fn clear(&mut self, capacity: usize) {
        let want = capacity + (256 << 10);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        self.at = 0;
        self.acc = 0;
        self.n = 0;
    }

    /// Append `n` bits (`n` at most 56 less the bits held, which are under
    /// 8 after every call).
    #[inline]
    fn put(&mut self, bits: u64, n: u32) {
        self.acc |= bits << self.n;
        self.n += n;
        if self.at + 8 > self.buf.len() {
            self.buf.resize(self.buf.len() * 2 + 8, 0);
        }
        let whole = self.n / 8;
        if let Some(dst) = self.buf.get_mut(self.at..self.at + 8) {
            dst.copy_from_slice(&self.acc.to_le_bytes());
        }
        self.at += whole as usize;
        self.acc = self.acc.checked_shr(whole * 8).unwrap_or(0);
        self.n -= whole * 8;
    }

    /// Make room for `bytes` more bytes (and the 8 a write may touch).
    fn reserve(&mut self, bytes: usize) {
        let want = self.at + bytes + 16;
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
    }

    /// Pad to a byte boundary.
    fn align(&mut self) {
        if self.n > 0 {
            self.put(0, 8 - self.n);
        }
    }

    fn bytes(&mut self, b: &[u8]) {
        self.align();
        if self.buf.len() < self.at + b.len() + 8 {
            self.buf.resize(self.at + b.len() + 8, 0);
        }
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }

    /// Bytes written so far, counting bits held as a byte started.
    fn len(&self) -> usize {
        self.at + self.n.div_ceil(8) as usize
    }

    fn finish(&mut self) -> &[u8] {
        self.align();
        &self.buf[..self.at]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Inflate `z` with zlib itself (the library QEMU inflates clusters
    /// with) and a 4 KiB window, a few hundred bytes of output at a time:
    /// every match must then reach back through zlib's window, which
    /// refuses a distance past 4096 ("invalid distance too far back"); one
    /// call into a whole cluster, as QEMU makes, would let it through.
    #[allow(unsafe_code)]
    fn inflate(z: &[u8], len: usize) -> Option<Vec<u8>> {
        use libz_sys as zs;
        let mut out = vec![0u8; len + 1];
        unsafe extern "C" fn zalloc(_: zs::voidpf, items: zs::uInt, size: zs::uInt) -> zs::voidpf {
            // SAFETY: calloc with zlib's counts; zlib checks for null.
            unsafe { libc::calloc(items as usize, size as usize) }
        }
        unsafe extern "C" fn zfree(_: zs::voidpf, p: zs::voidpf) {
            // SAFETY: `p` came from zalloc.
            unsafe { libc::free(p) }
        }
        // SAFETY: next_in/next_out point into `z` and `out`, which outlive
        // the stream, with their true lengths; the stream is ended before
        // they go.
        unsafe {
            let mut s = zs::z_stream {
                next_in: std::ptr::null_mut(),
                avail_in: 0,
                total_in: 0,
                next_out: std::ptr::null_mut(),
                avail_out: 0,
                total_out: 0,
                msg: std::ptr::null_mut(),
                state: std::ptr::null_mut(),
                zalloc,
                zfree,
                opaque: std::ptr::null_mut(),
                data_type: 0,
                adler: 0,
                reserved: 0,
            };
            let size = std::mem::size_of::<zs::z_stream>() as i32;
            if zs::inflateInit2_(&mut s, -12, zs::zlibVersion(), size) != zs::Z_OK {
                return None;
            }
            s.next_in = z.as_ptr().cast_mut();
            s.avail_in = z.len() as u32;
            let mut at = 0usize;
            let rc = loop {
                let room = (out.len() - at).min(397);
                s.next_out = out.as_mut_ptr().add(at);
                s.avail_out = room as u32;
                let rc = zs::inflate(&mut s, zs::Z_NO_FLUSH);
                at += room - s.avail_out as usize;
                if rc != zs::Z_OK || at == out.len() {
                    break rc;
                }
            };
            let rest = s.avail_in;
            zs::inflateEnd(&mut s);
            (rc == zs::Z_STREAM_END && rest == 0).then_some(())?;
            out.truncate(at);
        }
        Some(out)
    }

    fn round_trip(data: &[u8], level: u32) -> usize {
        let mut d = Deflater::new();
        let mut out = vec![0u8; data.len() * 2 + 64];
        let n = d.compress(data, level, &mut out).unwrap();
        assert_eq!(
            inflate(&out[..n], data.len()).as_deref(),
            Some(data),
            "level {level}, {} bytes",
            data.len()
        );
        n
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        crate::noise(seed, n)
    }

    fn text(n: usize, seed: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 32);
        let mut x = seed | 1;
        while v.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let word = ["cluster", "copy", "before", "write", "bitmap", "qcow2"][(x % 6) as usize];
            v.extend_from_slice(format!("{word} {}\n", (x >> 20) % 977).as_bytes());
        }
        v.truncate(n);
        v
    }

    #[test]
    fn every_level_inflates_back_with_a_4k_window() {
        // Matches at exactly the window's distance and one past it, runs
        // around the longest match, tiny inputs, and a 2 MiB cluster.
        let mut far = noise(5000, 7);
        far.extend_from_within(..900);
        far.extend_from_slice(&noise(3, 8));
        let tail = far[far.len() - 4097..far.len() - 4097 + 300].to_vec();
        far.extend_from_slice(&tail);
        let mut runs = Vec::new();
        for l in [255, 256, 257, 258, 259, 260, 516, 517] {
            runs.extend(std::iter::repeat_n(b'a' + (l % 7) as u8, l));
            runs.push(b'\n');
        }
        let inputs: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![1],
            vec![1, 2, 3],
            vec![9; 4],
            b"abcabcabc".to_vec(),
            vec![0; 65536],
            noise(65536, 3),
            text(65536, 5),
            far,
            runs,
            [text(30000, 9), noise(20000, 10), text(15536, 11)].concat(),
        ];
        for level in 1..=9 {
            for data in &inputs {
                round_trip(data, level);
            }
        }
        for level in [1, 6, 9] {
            round_trip(&text(2 << 20, 12), level);
        }
    }

    #[test]
    fn the_oracle_refuses_a_match_past_the_window() {
        // zlib's own encoder with a 32 KiB window reaches 4500 bytes back:
        // a 4 KiB window cannot inflate that.
        let mut data = noise(4500, 1);
        data.extend_from_within(..300);
        let mut z = flate2::Compress::new_with_window_bits(flate2::Compression::best(), false, 15);
        let mut out = vec![0u8; 10000];
        z.compress(&data, &mut out, flate2::FlushCompress::Finish)
            .unwrap();
        let n = z.total_out() as usize;
        assert!(n < 4700, "no long match: {n}");
        assert_eq!(inflate(&out[..n], data.len()), None);
        // and ours keeps to the window, at the cost of those 300 bytes
        assert!(round_trip(&data, 9) > 4700);
    }

    #[test]
    fn compressible_data_shrinks_and_more_effort_shrinks_it_more() {
        let data = text(65536, 21);
        let fast = round_trip(&data, 1);
        let default = round_trip(&data, 6);
        let best = round_trip(&data, 9);
        assert!(default < data.len() / 3, "{default}");
        assert!(best <= default && default < fast, "{fast} {default} {best}");
        // zeros: a handful of bytes
        assert!(round_trip(&[0; 65536], 6) < 600);
    }

    #[test]
    fn output_that_does_not_fit_is_none() {
        let mut d = Deflater::new();
        let data = noise(65536, 4);
        let mut out = vec![0u8; 65535];
        assert_eq!(d.compress(&data, 6, &mut out), None);
        let mut small = vec![0u8; 10];
        assert_eq!(d.compress(&text(65536, 2), 6, &mut small), None);
        // The encoder is still good for the next cluster.
        let t = text(65536, 2);
        let n = d.compress(&t, 6, &mut out).unwrap();
        assert_eq!(inflate(&out[..n], t.len()).unwrap(), t);
    }

    #[test]
    fn tables_of_earlier_clusters_are_never_matched() {
        // The same encoder over many clusters, every one different but
        // sharing content with the one before (a stale table entry would
        // point into it), of sizes whose positions wrap 16 bits.
        let mut d = Deflater::new();
        let mut prev = text(65536, 100);
        let mut out = vec![0u8; 300_000];
        for i in 0..40u64 {
            let mut cur = prev[prev.len() / 2..].to_vec();
            cur.extend_from_slice(&text([32768, 100_000, 4099][i as usize % 3], 200 + i));
            let n = d.compress(&cur, 6, &mut out).unwrap();
            assert_eq!(inflate(&out[..n], cur.len()).unwrap(), cur, "cluster {i}");
            // and exactly what a new encoder writes
            let mut fresh = vec![0u8; out.len()];
            let m = Deflater::new().compress(&cur, 6, &mut fresh).unwrap();
            assert_eq!(fresh[..m], out[..n], "cluster {i}");
            prev = cur;
        }
    }

    #[test]
    fn code_lengths_are_complete_and_limited() {
        // Fibonacci frequencies make the deepest possible tree.
        let mut freq = [0u32; 30];
        let (mut a, mut b) = (1u32, 1u32);
        for f in freq.iter_mut() {
            *f = a;
            (a, b) = (b, a.saturating_add(b));
        }
        for limit in [7, 15] {
            let mut lens = [0u8; 30];
            code_lengths(&freq, limit, &mut lens);
            assert!(
                lens.iter().all(|&l| (1..=limit as u8).contains(&l)),
                "{lens:?}"
            );
            let kraft: u64 = lens.iter().map(|&l| 1u64 << (limit as u8 - l)).sum();
            assert_eq!(kraft, 1 << limit, "{lens:?}");
        }
        // One or no symbol: two one-bit codes, as zlib gives.
        for used in [None, Some(0), Some(5)] {
            let mut freq = [0u32; 30];
            if let Some(s) = used {
                freq[s] = 10;
            }
            let mut lens = [0u8; 30];
            code_lengths(&freq, 15, &mut lens);
            assert_eq!(lens.iter().filter(|&&l| l == 1).count(), 2);
            assert!(used.is_none_or(|s| lens[s] == 1));
        }
    }

    proptest! {
        #[test]
        fn any_input_round_trips(
            pieces in proptest::collection::vec((0u8..4, 1usize..3000, any::<u64>()), 1..12),
            level in 1u32..=9,
        ) {
            // Pieces of noise, text, runs and copies of earlier bytes.
            let mut data: Vec<u8> = Vec::new();
            for (kind, len, seed) in pieces {
                match kind {
                    0 => data.extend(noise(len, seed)),
                    1 => data.extend(text(len, seed)),
                    2 => data.extend(std::iter::repeat_n(seed as u8, len)),
                    _ => {
                        let from = (seed as usize) % (data.len() + 1);
                        let copy: Vec<u8> = data[from..].iter().take(len).copied().collect();
                        data.extend(copy);
                    }
                }
            }
            round_trip(&data, level);
        }
    }
}
