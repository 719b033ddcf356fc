//! SIZE, DURATION, RATE and worker counts: parsing with errors that say what
//! was wrong and show a valid form.

use std::time::Duration;

const UNITS: &[(&str, u32)] = &[
    ("", 0),
    ("b", 0),
    ("k", 10),
    ("kb", 10),
    ("kib", 10),
    ("m", 20),
    ("mb", 20),
    ("mib", 20),
    ("g", 30),
    ("gb", 30),
    ("gib", 30),
    ("t", 40),
    ("tb", 40),
    ("tib", 40),
    ("p", 50),
    ("pb", 50),
    ("pib", 50),
];

/// Parse a SIZE: a whole number with an optional unit K, M, G, T or P
/// (powers of 1024; `KiB`, `kb` and a trailing `B` are accepted too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size: expected a number with an optional unit, e.g. 512, 64K, 1M, 2G"
        ));
    }
    let unit_l = unit.trim().to_ascii_lowercase();
    let Some(&(_, shift)) = UNITS.iter().find(|(u, _)| *u == unit_l) else {
        if unit.starts_with('.') || unit.starts_with(',') {
            return Err(format!(
                "'{s}': fractional sizes are not accepted; use a smaller unit, e.g. 1536M instead of 1.5G"
            ));
        }
        return Err(format!(
            "'{s}': unknown size unit '{unit}'; use K, M, G, T or P (powers of 1024), e.g. 64K"
        ));
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is too large to be a size"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large to be a size"))
}

/// Parse a SIZE that must be a power of two and at least 512 bytes.
pub fn parse_cluster_size(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v < 512 || !v.is_power_of_two() {
        return Err(format!(
            "'{s}' must be a power of two of at least 512 bytes, e.g. 64K"
        ));
    }
    Ok(v)
}

/// Parse a SIZE that is not zero.
pub fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(format!("'{s}' must be larger than zero")),
        v => Ok(v),
    }
}

/// Parse a DURATION in humantime form: `500ms`, `30s`, `2h 5m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("'{s}' needs a unit: e.g. {t}s, {t}ms or {t}m"));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("'{s}' is not a duration ({e}); e.g. 500ms, 30s, 2h 5m"))
}

/// Parse a RATE in bytes per second: a SIZE with an optional `/s`, e.g.
/// `100M` or `100M/s`. Zero is refused.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("/S"))
        .unwrap_or(t);
    let v = parse_size(t)
        .map_err(|e| format!("{e} (a rate is bytes per second, e.g. 100M or 100M/s)"))?;
    if v == 0 {
        return Err(format!("'{s}': a rate must be larger than zero"));
    }
    Ok(v)
}

/// Parse a worker count: 1 to 256.
pub fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a worker count: expected a number from 1 to 256"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("3T"), Ok(3 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("1.5G").unwrap_err().contains("fractional"));
        assert!(parse_size("12Q").unwrap_err().contains("unit"));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16777216T").is_err());
        assert_eq!(parse_cluster_size("64K"), Ok(65536));
        assert!(parse_cluster_size("3K").is_err());
        assert!(parse_cluster_size("256").is_err());
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2h 5m"), Ok(Duration::from_secs(7500)));
        assert!(parse_duration("30").unwrap_err().contains("30s"));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        assert_eq!(parse_rate("100M/s"), Ok(100 << 20));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_jobs("4"), Ok(4));
        assert!(parse_jobs("0").is_err());
    }
}
