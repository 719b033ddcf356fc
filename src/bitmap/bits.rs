//! A dense bit set over clusters: the copy bitmap of a job and the bits of a
//! dirty bitmap. One bit per granule; 1 MiB of bits maps 512 GiB at 64 KiB.

/// Dense bit set of `len` bits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    /// `len` bits, all clear.
    pub fn new(len: u64) -> Bits {
        Bits {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// `len` bits, all set.
    pub fn full(len: u64) -> Bits {
        let mut b = Bits::new(len);
        b.set_range(0, len);
        b
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when it has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Set bit `i`.
    pub fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Clear bit `i`.
    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    fn update_range(&mut self, start: u64, end: u64, value: bool) {
        let end = end.min(self.len);
        let mut i = start;
        while i < end {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = ((w as u64 + 1) * 64).min(end) - w as u64 * 64;
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if value {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            i = w as u64 * 64 + hi;
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
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Number of set bits in `[start, end)`.
    pub fn count_range(&self, start: u64, end: u64) -> u64 {
        let end = end.min(self.len);
        if start >= end {
            return 0;
        }
        let (first, last) = ((start / 64) as usize, ((end - 1) / 64) as usize);
        let mut n = 0;
        for w in first..=last {
            let mut word = self.words[w];
            if w == first {
                word &= u64::MAX << (start % 64);
            }
            if w == last && !end.is_multiple_of(64) {
                word &= (1u64 << (end % 64)) - 1;
            }
            n += u64::from(word.count_ones());
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

    /// Word at a time, from `from` to `end` (clamped to the length) and no
    /// further.
    fn next_in(&self, from: u64, end: u64, invert: bool) -> Option<u64> {
        let end = end.min(self.len);
        if from >= end {
            return None;
        }
        let flip = if invert { u64::MAX } else { 0 };
        let last = ((end - 1) / 64) as usize;
        let mut w = (from / 64) as usize;
        let mut word = (self.words[w] ^ flip) & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let i = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (i < end).then_some(i);
            }
            w += 1;
            if w > last {
                return None;
            }
            word = self.words[w] ^ flip;
        }
    }

    /// True if any bit in `[start, end)` is set.
    pub fn any_in(&self, start: u64, end: u64) -> bool {
        self.next_set_in(start, end).is_some()
    }

    /// Set every bit that is set in `other` (same length).
    pub fn merge(&mut self, other: &Bits) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
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

    /// The raw words (LSB-first within each word).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Build from raw words; bits past `len` are cleared.
    pub fn from_words(mut words: Vec<u64>, len: u64) -> Bits {
        words.resize(len.div_ceil(64) as usize, 0);
        let mut b = Bits { words, len };
        if !len.is_multiple_of(64) {
            let last = b.words.len() - 1;
            b.words[last] &= (1u64 << (len % 64)) - 1;
        }
        b
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
    }

    proptest::proptest! {
        /// Every search and count agrees with a plain vector of booleans,
        /// bounded scans included.
        #[test]
        fn searches_agree_with_a_model(
            len in 0..300u64,
            ops in proptest::collection::vec((proptest::bool::ANY, 0..320u64, 0..320u64), 0..12),
            queries in proptest::collection::vec((0..320u64, 0..320u64), 1..12),
        ) {
            let mut b = Bits::new(len);
            let mut m = vec![false; len as usize];
            for (set, a, z) in ops {
                let (a, z) = (a.min(z), a.max(z));
                if set { b.set_range(a, z) } else { b.clear_range(a, z) }
                for v in m.iter_mut().take(z.min(len) as usize).skip(a as usize) {
                    *v = set;
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
        }
    }
}
