//! A bit set over clusters: the copy bitmap of a job and the bits of a
//! dirty bitmap. One bit per granule, kept in blocks of 32768 bits (2 GiB of
//! image at 64 KiB): a block whose bits are all clear or all set takes no
//! words, so a 64 TiB image whose holes were claimed whole costs kilobytes,
//! not the 128 MiB a flat bitmap would.

/// Bits per block (a power of two).
const BLOCK_BITS: u64 = 1 << 15;
/// Words per block.
const BLOCK_WORDS: usize = (BLOCK_BITS / 64) as usize;

#[derive(Debug, Clone)]
enum Block {
    /// Every bit clear.
    Zero,
    /// Every bit set (of the block's bits inside the length).
    Ones,
    /// Bit by bit (LSB-first words; bits past the length are clear), and
    /// how many are set.
    Words(Box<[u64]>, u64),
}

/// Bit set of `len` bits.
#[derive(Debug, Clone, Default)]
pub struct Bits {
    blocks: Vec<Block>,
    len: u64,
}

impl PartialEq for Bits {
    fn eq(&self, other: &Bits) -> bool {
        self.len == other.len && self.word_iter().eq(other.word_iter())
    }
}

impl Eq for Bits {}

impl Bits {
    /// `len` bits, all clear.
    pub fn new(len: u64) -> Bits {
        Bits {
            blocks: vec![Block::Zero; len.div_ceil(BLOCK_BITS) as usize],
            len,
        }
    }

    /// `len` bits, all set.
    pub fn full(len: u64) -> Bits {
        Bits {
            blocks: vec![Block::Ones; len.div_ceil(BLOCK_BITS) as usize],
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when it has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of bits of block `b` inside the length.
    fn block_len(&self, b: usize) -> u64 {
        (self.len - b as u64 * BLOCK_BITS).min(BLOCK_BITS)
    }

    /// Word `w` of block `b` as it reads.
    fn word(&self, b: usize, w: usize) -> u64 {
        match &self.blocks[b] {
            Block::Zero => 0,
            Block::Words(ws, _) => ws[w],
            Block::Ones => {
                let bits = self.block_len(b);
                let lo = w as u64 * 64;
                if lo + 64 <= bits {
                    u64::MAX
                } else if lo >= bits {
                    0
                } else {
                    (1u64 << (bits - lo)) - 1
                }
            }
        }
    }

    /// Take block `b` out as words and its count of set bits (to change
    /// them and [`Self::put_words`] them back).
    fn take_words(&mut self, b: usize) -> (Box<[u64]>, u64) {
        let bits = self.block_len(b);
        match std::mem::replace(&mut self.blocks[b], Block::Zero) {
            Block::Words(ws, n) => (ws, n),
            Block::Zero => (vec![0; BLOCK_WORDS].into_boxed_slice(), 0),
            Block::Ones => {
                let ws: Vec<u64> = (0..BLOCK_WORDS as u64)
                    .map(|w| match w * 64 {
                        lo if lo + 64 <= bits => u64::MAX,
                        lo if lo >= bits => 0,
                        lo => (1u64 << (bits - lo)) - 1,
                    })
                    .collect();
                (ws.into_boxed_slice(), bits)
            }
        }
    }

    /// Put block `b` back; uniform words give their memory back.
    fn put_words(&mut self, b: usize, ws: Box<[u64]>, ones: u64) {
        self.blocks[b] = if ones == 0 {
            Block::Zero
        } else if ones == self.block_len(b) {
            Block::Ones
        } else {
            Block::Words(ws, ones)
        };
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let b = (i / BLOCK_BITS) as usize;
        let r = i % BLOCK_BITS;
        match &self.blocks[b] {
            Block::Zero => false,
            Block::Ones => true,
            Block::Words(ws, _) => ws[(r / 64) as usize] & (1 << (r % 64)) != 0,
        }
    }

    /// Set bit `i`.
    pub fn set(&mut self, i: u64) {
        self.update_range(i, i.saturating_add(1), true)
    }

    /// Clear bit `i`.
    pub fn clear(&mut self, i: u64) {
        self.update_range(i, i.saturating_add(1), false)
    }

    fn update_range(&mut self, start: u64, end: u64, value: bool) {
        let end = end.min(self.len);
        let mut i = start;
        while i < end {
            let b = (i / BLOCK_BITS) as usize;
            let base = b as u64 * BLOCK_BITS;
            let stop = (base + BLOCK_BITS).min(end);
            let whole = i == base && stop == base + self.block_len(b);
            let already = matches!(
                (&self.blocks[b], value),
                (Block::Ones, true) | (Block::Zero, false)
            );
            if whole {
                self.blocks[b] = if value { Block::Ones } else { Block::Zero };
            } else if !already {
                let (mut ws, mut ones) = self.take_words(b);
                let (mut j, e) = (i - base, stop - base);
                while j < e {
                    let w = (j / 64) as usize;
                    let lo = j % 64;
                    let hi = ((w as u64 + 1) * 64).min(e) - w as u64 * 64;
                    let mask = if hi - lo == 64 {
                        u64::MAX
                    } else {
                        ((1u64 << (hi - lo)) - 1) << lo
                    };
                    let old = ws[w];
                    ws[w] = if value { old | mask } else { old & !mask };
                    ones = ones + u64::from(ws[w].count_ones()) - u64::from(old.count_ones());
                    j = w as u64 * 64 + hi;
                }
                self.put_words(b, ws, ones);
            }
            i = stop;
        }
    }

    /// Set bits `[start, end)`.
    pub fn set_range(&mut self, start: u64, end: u64) {
        self.update_range(start, end, true)
    }

    /// Clear bits `[start, end)`.
    pub fn clear_range(&mut self, start: u64, end: u64) {
        self.update_range(start, end, false)
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count_range(0, self.len)
    }

    /// Number of set bits in `[start, end)`.
    pub fn count_range(&self, start: u64, end: u64) -> u64 {
        let end = end.min(self.len);
        let mut n = 0;
        let mut i = start;
        while i < end {
            let b = (i / BLOCK_BITS) as usize;
            let base = b as u64 * BLOCK_BITS;
            let stop = (base + BLOCK_BITS).min(end);
            n += match &self.blocks[b] {
                Block::Zero => 0,
                Block::Ones => stop - i,
                Block::Words(ws, _) => {
                    let (s, e) = (i - base, stop - base);
                    let (first, last) = ((s / 64) as usize, ((e - 1) / 64) as usize);
                    let mut c = 0;
                    for (w, &word) in ws.iter().enumerate().take(last + 1).skip(first) {
                        let mut word = word;
                        if w == first {
                            word &= u64::MAX << (s % 64);
                        }
                        if w == last && !e.is_multiple_of(64) {
                            word &= (1u64 << (e % 64)) - 1;
                        }
                        c += u64::from(word.count_ones());
                    }
                    c
                }
            };
            i = stop;
        }
        n
    }

    /// First set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.next_in(from, self.len, false)
    }

    /// First clear bit at or after `from`.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        self.next_in(from, self.len, true)
    }

    /// First set bit in `[from, end)`: the scan stops at `end`.
    pub fn next_set_in(&self, from: u64, end: u64) -> Option<u64> {
        self.next_in(from, end, false)
    }

    /// First clear bit in `[from, end)`: the scan stops at `end`.
    pub fn next_clear_in(&self, from: u64, end: u64) -> Option<u64> {
        self.next_in(from, end, true)
    }

    /// Block by block (a uniform block is one step), word at a time inside
    /// a block, from `from` to `end` (clamped to the length) and no further.
    fn next_in(&self, from: u64, end: u64, invert: bool) -> Option<u64> {
        let end = end.min(self.len);
        let mut i = from;
        while i < end {
            let b = (i / BLOCK_BITS) as usize;
            let base = b as u64 * BLOCK_BITS;
            let stop = (base + BLOCK_BITS).min(end);
            match (&self.blocks[b], invert) {
                (Block::Zero, false) | (Block::Ones, true) => {}
                (Block::Zero, true) | (Block::Ones, false) => return Some(i),
                (Block::Words(ws, _), _) => {
                    let flip = if invert { u64::MAX } else { 0 };
                    let (s, e) = (i - base, stop - base);
                    let last = ((e - 1) / 64) as usize;
                    let mut w = (s / 64) as usize;
                    let mut word = (ws[w] ^ flip) & (u64::MAX << (s % 64));
                    loop {
                        if word != 0 {
                            let at = base + w as u64 * 64 + u64::from(word.trailing_zeros());
                            return (at < stop).then_some(at);
                        }
                        w += 1;
                        if w > last {
                            break;
                        }
                        word = ws[w] ^ flip;
                    }
                }
            }
            i = stop;
        }
        None
    }

    /// True if any bit in `[start, end)` is set.
    pub fn any_in(&self, start: u64, end: u64) -> bool {
        self.next_set_in(start, end).is_some()
    }

    /// Set every bit that is set in `other` (same length).
    pub fn merge(&mut self, other: &Bits) {
        for b in 0..self.blocks.len().min(other.blocks.len()) {
            match (&self.blocks[b], &other.blocks[b]) {
                (_, Block::Zero) | (Block::Ones, _) => {}
                (_, Block::Ones) => self.blocks[b] = Block::Ones,
                (_, Block::Words(theirs, _)) => {
                    let theirs = theirs.clone();
                    let (mut ws, _) = self.take_words(b);
                    for (a, o) in ws.iter_mut().zip(theirs.iter()) {
                        *a |= *o;
                    }
                    let ones = ws.iter().map(|w| u64::from(w.count_ones())).sum();
                    self.put_words(b, ws, ones);
                }
            }
        }
    }

    /// Runs of set bits as `(start, end)` pairs.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(s) = self.next_set(i) {
            let e = self.next_clear(s).unwrap_or(self.len);
            out.push((s, e));
            i = e;
        }
        out
    }

    /// The words (LSB-first within each word), `len.div_ceil(64)` of them.
    pub fn word_iter(&self) -> impl Iterator<Item = u64> + '_ {
        let n = self.len.div_ceil(64) as usize;
        (0..n).map(move |k| self.word(k / BLOCK_WORDS, k % BLOCK_WORDS))
    }

    /// Build from words (LSB-first); bits past `len` are cleared, and
    /// uniform blocks take no memory.
    pub fn from_words(words: Vec<u64>, len: u64) -> Bits {
        let mut b = Bits::new(len);
        let n = len.div_ceil(64) as usize;
        for (k, block) in words.chunks(BLOCK_WORDS).enumerate() {
            if k >= b.blocks.len() {
                break;
            }
            let base_word = k * BLOCK_WORDS;
            let mut ws = vec![0u64; BLOCK_WORDS];
            for (j, &w) in block.iter().enumerate() {
                if base_word + j < n {
                    ws[j] = w;
                }
            }
            let bits = b.block_len(k);
            if !bits.is_multiple_of(64) {
                let last = (bits / 64) as usize;
                ws[last] &= (1u64 << (bits % 64)) - 1;
            }
            let full_words = (bits / 64) as usize;
            let ones = ws[..full_words].iter().all(|&w| w == u64::MAX)
                && (bits.is_multiple_of(64) || ws[full_words] == (1u64 << (bits % 64)) - 1);
            b.blocks[k] = if ws.iter().all(|&w| w == 0) {
                Block::Zero
            } else if ones {
                Block::Ones
            } else {
                let n = ws.iter().map(|w| u64::from(w.count_ones())).sum();
                Block::Words(ws.into_boxed_slice(), n)
            };
        }
        b
    }

    /// Bytes of memory the bits take (blocks that are not uniform).
    pub fn heap_bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<Block>()
            + self
                .blocks
                .iter()
                .filter(|b| matches!(b, Block::Words(..)))
                .count()
                * BLOCK_WORDS
                * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_search() {
        let mut b = Bits::new(200);
        b.set_range(3, 130);
        assert_eq!(b.count(), 127);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_clear(3), Some(130));
        b.clear_range(64, 65);
        assert_eq!(b.runs(), vec![(3, 64), (65, 130)]);
        assert!(b.any_in(129, 140));
        assert!(!b.any_in(130, 200));
        assert_eq!(b.next_set(130), None);
        let f = Bits::full(70);
        assert_eq!(f.count(), 70);
        assert_eq!(f.next_clear(0), None);
        assert_eq!(Bits::from_words(vec![u64::MAX; 2], 70).count(), 70);
        assert_eq!(Bits::from_words(vec![u64::MAX; 2], 70), f);
    }

    #[test]
    fn a_64_tib_bitmap_whose_holes_were_claimed_is_small() {
        // 64 TiB at 64 KiB: 2^30 bits. Full, then cleared in 64 MiB claims
        // but for a few scattered clusters.
        let n = 1u64 << 30;
        let mut b = Bits::full(n);
        assert!(b.heap_bytes() <= 2 << 20, "{} bytes", b.heap_bytes());
        let mut i = 0;
        while i < n {
            b.clear_range(i, (i + 1024).min(n));
            i += 1024;
        }
        for k in [5u64, 1 << 20, (1 << 29) + 77, n - 1] {
            b.set(k);
        }
        assert_eq!(b.count(), 4);
        assert_eq!(b.next_set(6), Some(1 << 20));
        assert_eq!(b.runs().len(), 4);
        assert!(b.heap_bytes() <= 2 << 20, "{} bytes", b.heap_bytes());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Every search and count agrees with a plain vector of booleans,
        /// bounded scans included, across block boundaries.
        #[test]
        fn searches_agree_with_a_model(
            len in 0..(3 * BLOCK_BITS + 100),
            full in proptest::bool::ANY,
            ops in proptest::collection::vec((proptest::bool::ANY, 0..(3 * BLOCK_BITS + 200), 0..(3 * BLOCK_BITS + 200)), 0..12),
            singles in proptest::collection::vec((proptest::bool::ANY, 0..(3 * BLOCK_BITS + 200)), 0..12),
            queries in proptest::collection::vec((0..(3 * BLOCK_BITS + 200), 0..(3 * BLOCK_BITS + 200)), 1..12),
        ) {
            let mut b = if full { Bits::full(len) } else { Bits::new(len) };
            let mut m = vec![full; len as usize];
            for (set, a, z) in ops {
                let (a, z) = (a.min(z), a.max(z));
                if set { b.set_range(a, z) } else { b.clear_range(a, z) }
                for v in m.iter_mut().take(z.min(len) as usize).skip(a as usize) {
                    *v = set;
                }
            }
            for (set, i) in singles {
                if set { b.set(i) } else { b.clear(i) }
                if i < len {
                    m[i as usize] = set;
                }
            }
            let find = |from: u64, end: u64, want: bool| {
                (from..end.min(len)).find(|&i| m[i as usize] == want)
            };
            for (from, end) in queries {
                proptest::prop_assert_eq!(b.next_set_in(from, end), find(from, end, true));
                proptest::prop_assert_eq!(b.next_clear_in(from, end), find(from, end, false));
                proptest::prop_assert_eq!(b.next_set(from), find(from, len, true));
                proptest::prop_assert_eq!(b.next_clear(from), find(from, len, false));
                let count = (from..end.min(len)).filter(|&i| m[i as usize]).count() as u64;
                proptest::prop_assert_eq!(b.count_range(from, end), count);
                proptest::prop_assert_eq!(b.any_in(from, end), count > 0);
            }
            proptest::prop_assert_eq!(b.count(), m.iter().filter(|&&v| v).count() as u64);
            // Words round trip, and merging agrees with the model.
            let words: Vec<u64> = b.word_iter().collect();
            let again = Bits::from_words(words, len);
            proptest::prop_assert_eq!(&again, &b);
            let mut other = Bits::new(len);
            other.set_range(len / 3, len / 2);
            let mut merged = b.clone();
            merged.merge(&other);
            for i in 0..len {
                let want = m[i as usize] || (len / 3..len / 2).contains(&i);
                proptest::prop_assert_eq!(merged.get(i), want);
            }
        }
    }
}
