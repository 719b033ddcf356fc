//! Fault injection (`--inject RULE`), like QEMU's blkdebug: a node that
//! sits under the source or the target and fails chosen requests.
//!
//! RULE is `NODE:OP:ERRNO[@WHERE][,once|,count=N|,prob=P,seed=S][,delay=DUR]`:
//!
//! * NODE `source` or `target`; OP `read`, `write` (writes and
//!   write-zeroes) or `flush`; ERRNO a name such as `EIO`, `ENOSPC`,
//!   `EDQUOT`, `EROFS`, `EFBIG`, or a number.
//! * WHERE `OFFSET` or `OFFSET-END` (bytes, SIZE units allowed; a request
//!   touching the range fails), or `nth=N` (requests of that kind from the
//!   N-th on, counted from 1 per rule). Without WHERE every request matches.
//! * `once` fails one matching request, `count=N` at most N; without either
//!   every matching request fails. `prob=P` fails a matching request with
//!   probability P (0..1), drawn from a generator seeded with `seed=S`
//!   (default 0), so a run is repeatable.
//! * `delay=DUR` waits DUR before returning the failure.

use super::{BlockNode, Filter, WriteFlags};
use crate::error::{BlockError, Op, Result};
use crate::units::{parse_duration, parse_size};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

/// Which node a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Under the source.
    Source,
    /// Under the target.
    Target,
}

/// Which requests a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Reads.
    Read,
    /// Writes, write-zeroes and discards.
    Write,
    /// Flushes.
    Flush,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Where {
    Any,
    Range(u64, u64),
    Nth(u64),
}

/// One parsed `--inject` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Source or target.
    pub side: Side,
    /// Which requests it counts.
    pub op: FaultOp,
    /// The errno a failing request gets.
    pub errno: i32,
    text: String,
    at: Where,
    limit: Option<u64>,
    prob: Option<f64>,
    seed: u64,
    delay: Option<Duration>,
}

const ERRNOS: &[(&str, i32)] = &[
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("EDQUOT", libc::EDQUOT),
    ("EROFS", libc::EROFS),
    ("EFBIG", libc::EFBIG),
    ("EPERM", libc::EPERM),
    ("EACCES", libc::EACCES),
    ("EAGAIN", libc::EAGAIN),
    ("EBUSY", libc::EBUSY),
    ("EINVAL", libc::EINVAL),
    ("ENOMEM", libc::ENOMEM),
    ("ENXIO", libc::ENXIO),
    ("ENODEV", libc::ENODEV),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("ECONNRESET", libc::ECONNRESET),
    ("ESTALE", libc::ESTALE),
];

impl std::str::FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Rule, String> {
        let form = "NODE:OP:ERRNO[@WHERE][,once|,count=N|,prob=P,seed=S][,delay=DUR], e.g. source:read:EIO@nth=2,once";
        let (head, opts) = match s.split_once(',') {
            Some((h, o)) => (h, Some(o)),
            None => (s, None),
        };
        let (head, at) = match head.split_once('@') {
            Some((h, w)) => (h, Some(w)),
            None => (head, None),
        };
        let parts: Vec<&str> = head.split(':').collect();
        if parts.len() != 3 {
            return Err(format!("'{s}' is not an injection rule: expected {form}"));
        }
        let side = match parts[0] {
            "source" => Side::Source,
            "target" => Side::Target,
            n => return Err(format!("'{s}': unknown node '{n}' (source or target)")),
        };
        let op = match parts[1] {
            "read" => FaultOp::Read,
            "write" => FaultOp::Write,
            "flush" => FaultOp::Flush,
            o => {
                return Err(format!(
                    "'{s}': unknown operation '{o}' (read, write or flush)"
                ));
            }
        };
        let e = parts[2];
        let errno = match ERRNOS.iter().find(|(n, _)| n.eq_ignore_ascii_case(e)) {
            Some(&(_, v)) => v,
            None => match e.parse::<i32>() {
                Ok(v) if v > 0 && v < 4096 => v,
                _ => {
                    let names: Vec<&str> = ERRNOS.iter().map(|(n, _)| *n).collect();
                    return Err(format!(
                        "'{s}': unknown errno '{e}' (one of {} or a number)",
                        names.join(", ")
                    ));
                }
            },
        };
        let at = match at {
            None => Where::Any,
            Some(w) => {
                if let Some(n) = w.strip_prefix("nth=") {
                    match n.parse::<u64>() {
                        Ok(n) if n >= 1 => Where::Nth(n),
                        _ => return Err(format!("'{s}': nth= needs a request number from 1")),
                    }
                } else if let Some((a, b)) = w.split_once('-') {
                    let a = parse_size(a).map_err(|e| format!("'{s}': {e}"))?;
                    let b = parse_size(b).map_err(|e| format!("'{s}': {e}"))?;
                    if b <= a {
                        return Err(format!("'{s}': the range end must be after its start"));
                    }
                    Where::Range(a, b)
                } else {
                    let a = parse_size(w).map_err(|e| format!("'{s}': {e}"))?;
                    Where::Range(a, a + 1)
                }
            }
        };
        let mut rule = Rule {
            side,
            op,
            errno,
            text: s.to_string(),
            at,
            limit: None,
            prob: None,
            seed: 0,
            delay: None,
        };
        for opt in opts.into_iter().flat_map(|o| o.split(',')) {
            let (k, v) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            let num = |v: Option<&str>| -> std::result::Result<u64, String> {
                v.and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("'{s}': {k}= needs a whole number"))
            };
            match k {
                "once" if v.is_none() => rule.limit = Some(1),
                "count" => rule.limit = Some(num(v)?),
                "seed" => rule.seed = num(v)?,
                "prob" => {
                    let p: f64 = v
                        .and_then(|v| v.parse().ok())
                        .filter(|p: &f64| (0.0..=1.0).contains(p))
                        .ok_or_else(|| format!("'{s}': prob= needs a probability from 0 to 1"))?;
                    rule.prob = Some(p);
                }
                "delay" => {
                    let d = parse_duration(v.unwrap_or("")).map_err(|e| format!("'{s}': {e}"))?;
                    rule.delay = Some(d);
                }
                _ => {
                    return Err(format!(
                        "'{s}': unknown option '{opt}' (once, count=N, prob=P, seed=S, delay=DUR)"
                    ));
                }
            }
        }
        Ok(rule)
    }
}

/// Per-rule counters.
#[derive(Debug, Default)]
struct RuleState {
    requests: u64,
    failures: u64,
    rng: u64,
}

/// A node that fails requests of `inner` according to its rules, and (like
/// blkdebug's `suspend`/`resume`) can hold a request until a test resumes
/// it.
pub struct FaultNode {
    // set at creation
    inner: Arc<dyn BlockNode>,
    rules: Vec<Rule>,
    // behind a lock
    state: Mutex<Vec<RuleState>>,
    suspensions: Mutex<Vec<Arc<Suspension>>>,
}

/// A breakpoint set by [`FaultNode::suspend`]: the first request of its
/// kind touching its offset waits in the node until [`Suspension::resume`].
#[derive(Debug)]
pub struct Suspension {
    op: FaultOp,
    at: u64,
    // (armed, suspended, resumed)
    state: Mutex<(bool, bool, bool)>,
    cv: std::sync::Condvar,
}

impl Suspension {
    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, bool, bool)> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Wait up to `limit` until a request is held here; true if one is.
    pub fn wait_suspended(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut s = self.lock();
        while !s.1 {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            s = match self.cv.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// Let the held request (and every later one) through.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.0 = false;
        s.2 = true;
        drop(s);
        self.cv.notify_all();
    }

    /// Hold the calling request if it is the first to hit this breakpoint.
    fn hit(&self, op: FaultOp, offset: u64, len: u64) {
        if op != self.op || !(offset <= self.at && self.at < offset + len.max(1)) {
            return;
        }
        let mut s = self.lock();
        if !s.0 {
            return;
        }
        s.0 = false;
        s.1 = true;
        self.cv.notify_all();
        while !s.2 {
            s = match self.cv.wait(s) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }
}

impl FaultNode {
    /// Wrap `inner` with the rules of `side` (None if there are none).
    pub fn wrap(inner: Arc<dyn BlockNode>, rules: &[Rule], side: Side) -> Arc<dyn BlockNode> {
        let rules: Vec<Rule> = rules.iter().filter(|r| r.side == side).cloned().collect();
        if rules.is_empty() {
            return inner;
        }
        Arc::new(FaultNode::new(inner, rules))
    }

    /// A fault node over `inner` with `rules` (of any side).
    pub fn new(inner: Arc<dyn BlockNode>, rules: Vec<Rule>) -> FaultNode {
        let state = rules
            .iter()
            .map(|r| RuleState {
                rng: r.seed ^ 0x9e37_79b9_7f4a_7c15,
                ..Default::default()
            })
            .collect();
        FaultNode {
            inner,
            rules,
            state: Mutex::new(state),
            suspensions: Mutex::new(Vec::new()),
        }
    }

    /// Set a breakpoint (blkdebug's `suspend`): the first `op` request
    /// touching byte `at` waits until the returned suspension is resumed.
    pub fn suspend(&self, op: FaultOp, at: u64) -> Arc<Suspension> {
        let s = Arc::new(Suspension {
            op,
            at,
            state: Mutex::new((true, false, false)),
            cv: std::sync::Condvar::new(),
        });
        if let Ok(mut v) = self.suspensions.lock() {
            v.push(s.clone());
        }
        s
    }

    /// Decide whether this request fails; returns the error to give. A
    /// request at a breakpoint waits here first.
    fn check(&self, op: FaultOp, bop: Op, offset: u64, len: u64) -> Result<()> {
        let held: Vec<Arc<Suspension>> = match self.suspensions.lock() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        };
        for s in held {
            s.hit(op, offset, len);
        }
        let mut hit: Option<(i32, String, Option<Duration>)> = None;
        {
            let mut st = match self.state.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            for (r, s) in self.rules.iter().zip(st.iter_mut()) {
                if r.op != op {
                    continue;
                }
                s.requests += 1;
                let matches = match r.at {
                    Where::Any => true,
                    Where::Range(a, b) => offset < b && a < offset + len.max(1),
                    Where::Nth(n) => s.requests >= n,
                };
                if !matches || r.limit.is_some_and(|l| s.failures >= l) || hit.is_some() {
                    continue;
                }
                if let Some(p) = r.prob {
                    // xorshift64*
                    s.rng ^= s.rng >> 12;
                    s.rng ^= s.rng << 25;
                    s.rng ^= s.rng >> 27;
                    let x = s.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
                    if (x as f64 / (1u64 << 53) as f64) >= p {
                        continue;
                    }
                }
                s.failures += 1;
                hit = Some((r.errno, r.text.clone(), r.delay));
            }
        }
        match hit {
            None => Ok(()),
            Some((errno, rule, delay)) => {
                if let Some(d) = delay {
                    std::thread::sleep(d);
                }
                Err(BlockError::Injected {
                    op: bop,
                    path: self.inner.path().to_path_buf(),
                    offset,
                    len,
                    errno,
                    rule,
                })
            }
        }
    }
}

impl Filter for FaultNode {
    fn child(&self) -> &Arc<dyn BlockNode> {
        &self.inner
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(FaultOp::Read, Op::Read, offset, buf.len() as u64)?;
        self.inner.read(offset, buf)
    }

    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.check(FaultOp::Write, Op::Write, offset, buf.len() as u64)?;
        self.inner.write_with(offset, buf, flags)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(FaultOp::Write, Op::WriteZeroes, offset, len)?;
        self.inner.write_zeroes(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(FaultOp::Write, Op::Discard, offset, len)?;
        self.inner.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.check(FaultOp::Flush, Op::Flush, 0, 0)?;
        self.inner.flush()
    }

    fn copy_source(&self, offset: u64, len: u64) -> Result<Option<&std::fs::File>> {
        // An in-kernel copy reads: the read rules apply to it.
        self.check(FaultOp::Read, Op::Read, offset, len)?;
        self.inner.copy_source(offset, len)
    }

    fn copy_range_from(&self, src: &std::fs::File, offset: u64, len: u64) -> Result<bool> {
        // An in-kernel copy writes: the write rules apply to it.
        self.check(FaultOp::Write, Op::Write, offset, len)?;
        self.inner.copy_range_from(src, offset, len)
    }
}

/// Parse a RULE (clap value parser).
pub fn parse_rule(s: &str) -> std::result::Result<Rule, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        let r: Rule = "source:read:EIO@nth=2,once".parse().unwrap();
        assert_eq!(
            (r.side, r.op, r.errno, r.at, r.limit),
            (
                Side::Source,
                FaultOp::Read,
                libc::EIO,
                Where::Nth(2),
                Some(1)
            )
        );
        let r: Rule = "target:write:ENOSPC@1M-2M,count=3,delay=10ms"
            .parse()
            .unwrap();
        assert_eq!(r.at, Where::Range(1 << 20, 2 << 20));
        assert_eq!(r.limit, Some(3));
        assert_eq!(r.delay, Some(Duration::from_millis(10)));
        let r: Rule = "target:flush:28,prob=0.5,seed=7".parse().unwrap();
        assert_eq!((r.errno, r.prob, r.seed), (28, Some(0.5), 7));
        for bad in [
            "source:read",
            "disk:read:EIO",
            "source:peek:EIO",
            "source:read:EWHAT",
            "source:read:EIO@nth=0",
            "source:read:EIO@2M-1M",
            "source:read:EIO,prob=2",
            "source:read:EIO,sometimes",
            "source:read:EIO,delay=soon",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }
}
