//! The simulated guest: a seeded workload generator.
//!
//! SPEC is comma-separated `key=value`: `iops=N` (total writes per second,
//! 0 = as fast as it can; default 100), `bs=SIZE` or `bs=MIN-MAX` (default
//! 4K), `pattern=random|sequential|hotspot` (default random), `threads=N`
//! (default 1), `seed=N` (default 1), `count=N` or `duration=DUR` (default:
//! until the backup ends), `zero=PCT` (share of writes that write zeroes,
//! default 0).
//!
//! The same SPEC gives the same writes: thread `t` of `T` writes only inside
//! its own stripe `[t*size/T, (t+1)*size/T)` with its own seeded generator,
//! so the final content does not depend on how threads interleave. Offsets
//! are aligned to 512 bytes when every block size is a multiple of 512, and
//! unaligned otherwise. `hotspot` sends 80 % of the writes into a tenth of the
//! stripe.

use crate::error::BlockError;
use crate::job::cancel::Cancel;
use crate::node::BlockNode;
use crate::stats::Histogram;
use crate::units::{parse_duration, parse_size};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where a guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Uniformly at random.
    Random,
    /// One after the other.
    Sequential,
    /// 80 % of the writes into a tenth of the image.
    Hotspot,
}

/// A parsed guest SPEC.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GuestSpec {
    /// Writes per second in all (0: as fast as possible).
    pub iops: u64,
    /// Smallest write, bytes.
    pub bs_min: u64,
    /// Largest write, bytes.
    pub bs_max: u64,
    /// Where writes go.
    pub pattern: Pattern,
    /// Writer threads.
    pub threads: u64,
    /// Seed of the generator.
    pub seed: u64,
    /// Number of writes (None: until stopped).
    pub count: Option<u64>,
    #[serde(skip)]
    /// How long to write (None: until stopped).
    pub duration: Option<Duration>,
    /// Share of writes that write zeroes, percent.
    pub zero_pct: u64,
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            iops: 100,
            bs_min: 4096,
            bs_max: 4096,
            pattern: Pattern::Random,
            threads: 1,
            seed: 1,
            count: None,
            duration: None,
            zero_pct: 0,
        }
    }
}

impl std::str::FromStr for GuestSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<GuestSpec, String> {
        let mut g = GuestSpec::default();
        let keys = "iops, bs, pattern, threads, seed, count, duration, zero";
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((k, v)) = item.split_once('=') else {
                return Err(format!(
                    "'{item}' in guest SPEC is not key=value (keys: {keys})"
                ));
            };
            let num = |v: &str| -> Result<u64, String> {
                v.parse::<u64>()
                    .map_err(|_| format!("guest SPEC: {k}={v} needs a whole number"))
            };
            match k {
                "iops" => g.iops = num(v)?,
                "bs" => {
                    let (a, b) = match v.split_once('-') {
                        Some((a, b)) => (parse_size(a)?, parse_size(b)?),
                        None => {
                            let x = parse_size(v)?;
                            (x, x)
                        }
                    };
                    if a == 0 || b < a || b > 64 << 20 {
                        return Err(format!(
                            "guest SPEC: bs={v} must be 1 byte to 64M, MIN-MAX with MIN <= MAX"
                        ));
                    }
                    g.bs_min = a;
                    g.bs_max = b;
                }
                "pattern" => {
                    g.pattern = match v {
                        "random" => Pattern::Random,
                        "sequential" => Pattern::Sequential,
                        "hotspot" => Pattern::Hotspot,
                        _ => {
                            return Err(format!(
                                "guest SPEC: pattern={v} (random, sequential or hotspot)"
                            ));
                        }
                    }
                }
                "threads" => {
                    g.threads = num(v)?;
                    if !(1..=64).contains(&g.threads) {
                        return Err("guest SPEC: threads= must be 1 to 64".into());
                    }
                }
                "seed" => g.seed = num(v)?,
                "count" => g.count = Some(num(v)?),
                "duration" => g.duration = Some(parse_duration(v)?),
                "zero" => {
                    g.zero_pct = num(v)?;
                    if g.zero_pct > 100 {
                        return Err("guest SPEC: zero= is a percentage, 0 to 100".into());
                    }
                }
                _ => return Err(format!("guest SPEC: unknown key '{k}' (keys: {keys})")),
            }
        }
        if g.count.is_some() && g.duration.is_some() {
            return Err("guest SPEC: give count= or duration=, not both".into());
        }
        Ok(g)
    }
}

/// Parse a guest SPEC (clap value parser).
pub fn parse_spec(s: &str) -> Result<GuestSpec, String> {
    s.parse()
}

impl GuestSpec {
    /// True when the workload ends by itself.
    pub fn is_bounded(&self) -> bool {
        self.count.is_some() || self.duration.is_some()
    }
}

/// What a guest did.
#[derive(Debug, Default, Clone)]
pub struct GuestStats {
    /// Writes done.
    pub writes: u64,
    /// Writes that wrote zeroes.
    pub zero_writes: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Writes that failed.
    pub failed: u64,
    /// The first failure, in words.
    pub first_error: Option<String>,
    /// Latency histogram.
    pub latency: Histogram,
}

/// The summary's view of [`GuestStats`].
#[derive(Debug, serde::Serialize)]
pub struct GuestReport {
    /// Writes done.
    pub writes: u64,
    /// Writes that wrote zeroes.
    pub zero_writes: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Writes that failed.
    pub failed_writes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The first failure, in words.
    pub first_error: Option<String>,
    /// Write latency, ms.
    pub latency_ms: LatencyReport,
}

#[derive(Debug, serde::Serialize)]
/// Write latency, milliseconds.
pub struct LatencyReport {
    /// Number of writes measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl GuestStats {
    /// The report of these statistics.
    pub fn report(&self) -> GuestReport {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        GuestReport {
            writes: self.writes,
            zero_writes: self.zero_writes,
            bytes: self.bytes,
            failed_writes: self.failed,
            first_error: self.first_error.clone(),
            latency_ms: LatencyReport {
                count: self.latency.count(),
                p50: ms(self.latency.percentile(50.0)),
                p99: ms(self.latency.percentile(99.0)),
                max: ms(self.latency.max()),
            },
        }
    }
}

/// SplitMix64: small, fast, seedable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// One write the guest issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestWrite {
    /// Byte offset.
    pub offset: u64,
    /// Length, bytes.
    pub len: u64,
    /// Write zeroes instead of data.
    pub zero: bool,
}

/// The deterministic sequence of writes of one guest thread.
pub struct Plan {
    rng: Rng,
    data_rng: Rng,
    spec: GuestSpec,
    stripe: (u64, u64),
    align: u64,
    seq: u64,
}

impl Plan {
    /// The plan of writer `thread` over an image of `size` bytes.
    pub fn new(spec: &GuestSpec, size: u64, thread: u64) -> Plan {
        let t = spec.threads;
        // Stripes start on 4 KiB boundaries.
        let lo = (size / t * thread) / 4096 * 4096;
        let hi = if thread + 1 == t {
            size
        } else {
            (size / t * (thread + 1)) / 4096 * 4096
        };
        let align = if spec.bs_min.is_multiple_of(512) && spec.bs_max.is_multiple_of(512) {
            512
        } else {
            1
        };
        let seed = spec.seed.wrapping_mul(0x100_0000_01b3) ^ thread.wrapping_mul(0x9e37_79b9);
        Plan {
            rng: Rng(seed),
            data_rng: Rng(seed ^ 0xdead_beef_cafe_f00d),
            spec: spec.clone(),
            stripe: (lo, hi),
            align,
            seq: lo,
        }
    }

    /// The next write (None when the stripe is too small for any write).
    pub fn next_write(&mut self) -> Option<GuestWrite> {
        let (lo, hi) = self.stripe;
        let span = hi - lo;
        let s = &self.spec;
        let mut len = s.bs_min + self.rng.below(s.bs_max - s.bs_min + 1);
        if self.align > 1 {
            len = (len / self.align).max(1) * self.align;
        }
        let len = len.min(span);
        if len == 0 {
            return None;
        }
        let slots = (span - len) / self.align + 1;
        let offset = match s.pattern {
            Pattern::Random => lo + self.rng.below(slots) * self.align,
            Pattern::Sequential => {
                if self.seq + len > hi {
                    self.seq = lo;
                }
                let o = self.seq;
                self.seq += len;
                o
            }
            Pattern::Hotspot => {
                let hot_slots = (slots / 10).max(1);
                if self.rng.below(100) < 80 {
                    lo + self.rng.below(hot_slots) * self.align
                } else {
                    lo + self.rng.below(slots) * self.align
                }
            }
        };
        let zero = s.zero_pct > 0 && self.rng.below(100) < s.zero_pct;
        Some(GuestWrite { offset, len, zero })
    }

    /// Fill `buf` with this write's (incompressible, seeded) data.
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.data_rng.fill(buf);
    }
}

/// Run the guest against `node` until its count or duration is done, `stop`
/// is set, or the job is cancelled. Returns the merged statistics.
pub fn run(
    node: &dyn BlockNode,
    spec: &GuestSpec,
    stop: &AtomicBool,
    cancel: &Cancel,
) -> GuestStats {
    let size = node.size();
    let total = Mutex::new(GuestStats::default());
    let start = Instant::now();
    let deadline = spec.duration.map(|d| start + d);
    std::thread::scope(|s| {
        for t in 0..spec.threads {
            let total = &total;
            s.spawn(move || {
                let mut st = GuestStats::default();
                let mut plan = Plan::new(spec, size, t);
                let share = spec
                    .count
                    .map(|c| c / spec.threads + u64::from(t < c % spec.threads));
                let interval = if spec.iops == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs_f64(spec.threads as f64 / spec.iops as f64)
                };
                let mut due = start;
                let mut buf = Vec::new();
                let mut n = 0u64;
                loop {
                    if share.is_some_and(|c| n >= c)
                        || stop.load(Ordering::Relaxed)
                        || cancel.is_cancelled()
                    {
                        break;
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    if !interval.is_zero() {
                        due += interval;
                        while Instant::now() < due {
                            if stop.load(Ordering::Relaxed) || cancel.is_cancelled() {
                                break;
                            }
                            std::thread::sleep(
                                (due - Instant::now()).min(Duration::from_millis(20)),
                            );
                        }
                        if stop.load(Ordering::Relaxed) || cancel.is_cancelled() {
                            break;
                        }
                    }
                    let Some(w) = plan.next_write() else { break };
                    // Paced writes count their latency from when they were
                    // due (open loop), so a write that waits behind a slow
                    // one shows it; unpaced ones from when they start.
                    let t0 = if interval.is_zero() {
                        Instant::now()
                    } else {
                        due
                    };
                    let res: Result<(), BlockError> = if w.zero {
                        node.write_zeroes(w.offset, w.len)
                    } else {
                        buf.resize(w.len as usize, 0);
                        plan.fill(&mut buf);
                        node.write(w.offset, &buf)
                    };
                    st.latency.record(t0.elapsed());
                    n += 1;
                    match res {
                        Ok(()) => {
                            st.writes += 1;
                            st.bytes += w.len;
                            st.zero_writes += u64::from(w.zero);
                        }
                        Err(e) => {
                            st.failed += 1;
                            if st.first_error.is_none() {
                                st.first_error = Some(crate::error::error_chain(&e));
                            }
                        }
                    }
                }
                if let Ok(mut tot) = total.lock() {
                    tot.writes += st.writes;
                    tot.zero_writes += st.zero_writes;
                    tot.bytes += st.bytes;
                    tot.failed += st.failed;
                    if tot.first_error.is_none() {
                        tot.first_error = st.first_error.take();
                    }
                    tot.latency.merge(&st.latency);
                }
            });
        }
    });
    total.into_inner().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_and_plans_repeat() {
        let g: GuestSpec = "iops=500,bs=512-64K,pattern=hotspot,threads=3,seed=9,count=100,zero=30"
            .parse()
            .unwrap();
        assert_eq!(
            (
                g.iops, g.bs_min, g.bs_max, g.threads, g.seed, g.count, g.zero_pct
            ),
            (500, 512, 65536, 3, 9, Some(100), 30)
        );
        let a: Vec<_> = {
            let mut p = Plan::new(&g, 1 << 30, 1);
            (0..50).filter_map(|_| p.next_write()).collect()
        };
        let b: Vec<_> = {
            let mut p = Plan::new(&g, 1 << 30, 1);
            (0..50).filter_map(|_| p.next_write()).collect()
        };
        assert_eq!(a, b);
        let stripe = ((1u64 << 30) / 3, (1u64 << 30) / 3 * 2);
        for w in &a {
            assert!(w.offset >= stripe.0 && w.offset + w.len <= stripe.1);
            assert_eq!(w.offset % 512, 0);
            assert!((512..=65536).contains(&w.len));
        }
        assert!(a.iter().any(|w| w.zero) && a.iter().any(|w| !w.zero));
        for bad in [
            "iops",
            "bs=0",
            "bs=8K-4K",
            "pattern=zigzag",
            "threads=0",
            "zero=101",
            "count=1,duration=1s",
            "colour=red",
        ] {
            assert!(bad.parse::<GuestSpec>().is_err(), "{bad}");
        }
        let u: GuestSpec = "bs=1000-3000".parse().unwrap();
        let mut p = Plan::new(&u, 1 << 20, 0);
        assert!(
            (0..100)
                .filter_map(|_| p.next_write())
                .any(|w| w.offset % 512 != 0)
        );
    }
}
