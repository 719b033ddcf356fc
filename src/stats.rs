//! A bounded latency histogram: log-linear buckets (64 per power of two,
//! under 1.6 % error), so memory does not grow with the number of samples.

use std::time::Duration;

const SUB: u32 = 64;

/// Latencies in microseconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max_us: u64,
    sum_us: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; (64 * SUB) as usize],
            count: 0,
            max_us: 0,
            sum_us: 0,
        }
    }
}

fn bucket(v: u64) -> usize {
    if v < u64::from(SUB) {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= 6
    let shift = exp - SUB.trailing_zeros();
    let mant = (v >> shift) as u32 - SUB; // 0..SUB
    ((exp - SUB.trailing_zeros() + 1) * SUB + mant) as usize
}

fn bucket_low(b: usize) -> u64 {
    let b = b as u32;
    if b < SUB {
        return u64::from(b);
    }
    let group = b / SUB; // >= 1
    let mant = b % SUB;
    let shift = group - 1;
    u64::from(SUB + mant) << shift
}

impl Histogram {
    /// Count one sample.
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let b = bucket(us).min(self.buckets.len() - 1);
        self.buckets[b] += 1;
        self.count += 1;
        self.max_us = self.max_us.max(us);
        self.sum_us += u128::from(us);
    }

    /// Add the samples of `o`.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
        self.max_us = self.max_us.max(o.max_us);
        self.sum_us += o.sum_us;
    }

    /// Samples counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.max_us)
    }

    /// The `p`-th percentile (0..=100), never above the maximum.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_micros(bucket_low(i).min(self.max_us));
            }
        }
        self.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_close() {
        let mut h = Histogram::default();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.percentile(50.0).as_micros() as f64;
        let p99 = h.percentile(99.0).as_micros() as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.02, "{p50}");
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.02, "{p99}");
        assert_eq!(h.max(), Duration::from_micros(10_000));
        assert_eq!(h.count(), 10_000);
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1 << 20, u64::MAX >> 8] {
            let b = bucket(v);
            assert!(bucket_low(b) <= v, "{v}");
        }
    }
}
