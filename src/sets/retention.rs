//! Retention rules with restic's `forget` semantics, over the start times
//! of one source's backups: a backup is kept if any rule keeps it.
//!
//! * `last N`: the N newest.
//! * `within DUR`: those started at most DUR before the newest one.
//! * `hourly|daily|weekly|monthly N`: going from the newest, the newest
//!   backup of each hour, day, week (Monday to Sunday) or month, for the N
//!   newest such periods that have a backup.
//!
//! Periods are in UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The rules of one `prune`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// `--keep-last N`.
    pub last: Option<usize>,
    /// `--keep-within DUR`.
    pub within: Option<Duration>,
    /// `--keep-hourly N`.
    pub hourly: Option<usize>,
    /// `--keep-daily N`.
    pub daily: Option<usize>,
    /// `--keep-weekly N`.
    pub weekly: Option<usize>,
    /// `--keep-monthly N`.
    pub monthly: Option<usize>,
}

impl Rules {
    /// True when no rule is given (prune refuses: it would remove all).
    pub fn is_empty(&self) -> bool {
        *self == Rules::default()
    }
}

/// Seconds since the epoch (before it: 0).
fn secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The civil date (year, month) of a day number since 1970-01-01
/// (Howard Hinnant's days_from_civil, inverted).
fn year_month(days: i64) -> (i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

/// The period of `t` for a bucket rule.
fn period(t: SystemTime, kind: &str) -> i64 {
    let s = secs(t);
    let days = s.div_euclid(86_400);
    match kind {
        "hourly" => s.div_euclid(3600),
        "daily" => days,
        // 1970-01-01 was a Thursday: +3 makes weeks start on Monday.
        "weekly" => (days + 3).div_euclid(7),
        _ => {
            let (y, m) = year_month(days);
            y * 12 + m
        }
    }
}

/// For backups started at `started` (any order): why each is kept (an
/// empty list: removed).
pub fn apply(rules: &Rules, started: &[SystemTime]) -> Vec<Vec<String>> {
    let mut order: Vec<usize> = (0..started.len()).collect();
    // Newest first; equal times keep their given order.
    order.sort_by(|&a, &b| started[b].cmp(&started[a]).then(a.cmp(&b)));
    let mut why = vec![Vec::new(); started.len()];
    if let Some(n) = rules.last {
        for (k, &i) in order.iter().enumerate().take(n) {
            why[i].push(format!("last {}", k + 1));
        }
    }
    if let (Some(d), Some(&newest)) = (rules.within, order.first()) {
        let from = started[newest].checked_sub(d).unwrap_or(UNIX_EPOCH);
        for &i in &order {
            if started[i] >= from {
                why[i].push(format!("within {}", humantime::format_duration(d)));
            }
        }
    }
    for (kind, n) in [
        ("hourly", rules.hourly),
        ("daily", rules.daily),
        ("weekly", rules.weekly),
        ("monthly", rules.monthly),
    ] {
        let Some(n) = n else { continue };
        let mut last = None;
        let mut kept = 0;
        for &i in &order {
            if kept >= n {
                break;
            }
            let p = period(started[i], kind);
            if last != Some(p) {
                last = Some(p);
                kept += 1;
                why[i].push(format!("{kind} {kept}"));
            }
        }
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    fn kept(rules: &Rules, times: &[&str]) -> Vec<usize> {
        let t: Vec<SystemTime> = times.iter().map(|s| at(s)).collect();
        apply(rules, &t)
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.is_empty())
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn dates_are_civil() {
        for (s, y, m) in [
            ("1970-01-01T00:00:00Z", 1970, 1),
            ("2000-02-29T12:00:00Z", 2000, 2),
            ("2026-12-31T23:59:59Z", 2026, 12),
            ("2027-01-01T00:00:00Z", 2027, 1),
        ] {
            assert_eq!(year_month(secs(at(s)).div_euclid(86_400)), (y, m), "{s}");
        }
        // Monday 2026-11-30 starts a week; Sunday 2026-11-29 ends one.
        assert_ne!(
            period(at("2026-11-29T23:00:00Z"), "weekly"),
            period(at("2026-11-30T01:00:00Z"), "weekly")
        );
        assert_eq!(
            period(at("2026-11-30T01:00:00Z"), "weekly"),
            period(at("2026-12-06T23:00:00Z"), "weekly")
        );
    }

    #[test]
    fn rules_keep_as_restic_forget_does() {
        let nights: Vec<String> = (1..=20)
            .map(|d| format!("2026-11-{d:02}T02:00:00Z"))
            .collect();
        let t: Vec<&str> = nights.iter().map(String::as_str).collect();
        let daily = Rules {
            daily: Some(7),
            ..Rules::default()
        };
        assert_eq!(kept(&daily, &t), (13..20).collect::<Vec<_>>());
        // Weekly 2: the newest of this week (Mon 16 .. Fri 20: the 20th)
        // and of the week before (Mon 9 .. Sun 15: the 15th).
        let weekly = Rules {
            weekly: Some(2),
            ..Rules::default()
        };
        assert_eq!(kept(&weekly, &t), vec![14, 19]);
        let both = Rules {
            daily: Some(7),
            weekly: Some(2),
            ..Rules::default()
        };
        assert_eq!(kept(&both, &t), (13..20).collect::<Vec<_>>());
        let both3 = Rules {
            daily: Some(3),
            weekly: Some(3),
            ..Rules::default()
        };
        // Weeks: 16-20 (20th), 9-15 (15th), 2-8 (8th).
        assert_eq!(kept(&both3, &t), vec![7, 14, 17, 18, 19]);
        let last = Rules {
            last: Some(2),
            ..Rules::default()
        };
        assert_eq!(kept(&last, &t), vec![18, 19]);
        let within = Rules {
            within: Some(Duration::from_secs(3 * 86_400)),
            ..Rules::default()
        };
        assert_eq!(kept(&within, &t), vec![16, 17, 18, 19]);
        // Two backups on one day: daily keeps the newer.
        let t2 = [
            "2026-11-01T01:00:00Z",
            "2026-11-01T05:00:00Z",
            "2026-11-02T01:00:00Z",
        ];
        assert_eq!(kept(&daily, &t2), vec![1, 2]);
        let monthly = Rules {
            monthly: Some(1),
            ..Rules::default()
        };
        assert_eq!(
            kept(&monthly, &["2026-10-31T23:00:00Z", "2026-11-01T00:30:00Z"]),
            vec![1]
        );
        assert!(Rules::default().is_empty() && !daily.is_empty());
    }
}
