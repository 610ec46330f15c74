//! Reading `stream-client --json` output around a migration: the gap the
//! client saw, against the gap the same stream shows with no migration.
//!
//! On an emulated guest (docs/pvm-emulation.md) the stream's segments
//! arrive in bursts several ms apart, so the largest gap around a
//! migration mixes what the migration costs with what the client sees
//! anyway. [`around`] separates the two; the client must have been run
//! with `--gap-ms 1 --max-gaps 1000000` so that every gap is listed.

use serde_json::Value;

/// `stream-client` arguments that list every gap [`around`] needs.
pub const CLIENT_ARGS: [&str; 4] = ["--gap-ms", "1", "--max-gaps", "1000000"];

/// A gap for people: the client lists only gaps of 1 ms or more
/// ([`CLIENT_ARGS`]), so a 0 means "under 1 ms".
pub fn show(ms: f64) -> String {
    if ms.is_nan() {
        "unknown".into()
    } else if ms < 1.0 {
        "under 1 ms".into()
    } else {
        format!("{ms:.1} ms")
    }
}

/// Gap measures of one migration.
#[derive(Clone, Copy, Debug)]
pub struct Gaps {
    /// The largest gap between arrivals from 200 ms before the migration
    /// started until 500 ms after it ended (the paper's migration delay).
    pub gap_ms: f64,
    /// When that gap ended, ms after the migration started.
    pub gap_at_ms: f64,
    /// The same stream before the migration, cut into windows of the same
    /// length: the median of each window's largest gap (what the client
    /// sees with no migration). NaN if the stream ran too briefly.
    pub own_gap_ms: f64,
}

impl Gaps {
    /// What the migration added to the client's largest gap.
    pub fn added_ms(&self) -> f64 {
        self.gap_ms - self.own_gap_ms
    }
}

/// The gaps (ms) listed in a client report, with when each ended (s after
/// the client started).
fn list(client: &Value) -> Vec<(f64, f64)> {
    client["gaps"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter_map(|x| Some((x["at_s"].as_f64()?, x["gap_ms"].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The median of `v` (NaN if empty).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The gaps around a migration that started `at_s` after the client and
/// took `total_s`.
pub fn around(client: &Value, at_s: f64, total_s: f64) -> Gaps {
    let list = list(client);
    let largest = |a: f64, b: f64| {
        list.iter()
            .filter(|(t, _)| (a..b).contains(t))
            .fold((0.0f64, a), |m, &(t, g)| if g > m.0 { (g, t) } else { m })
    };
    let (from, to) = (at_s - 0.2, at_s + total_s + 0.5);
    let (gap_ms, when) = largest(from, to);
    let mut own = own_windows(&list, from, to);
    Gaps {
        gap_ms,
        gap_at_ms: (when - at_s) * 1e3,
        own_gap_ms: median(&mut own),
    }
}

/// The largest gap of each window before the migration's (from `from` to
/// `to`), cut to its length, leaving out the connection's first 300 ms
/// (slow start).
fn own_windows(list: &[(f64, f64)], from: f64, to: f64) -> Vec<f64> {
    let len = to - from;
    let mut own = Vec::new();
    let mut start = 0.3;
    while start + len <= from {
        let w = start..start + len;
        own.push(
            list.iter()
                .filter(|(t, _)| w.contains(t))
                .fold(0.0f64, |m, &(_, g)| m.max(g)),
        );
        start += len;
    }
    own
}

/// The same measure as [`Gaps::added_ms`] where nothing migrated: for each
/// window before the migration, its largest gap less the median of them
/// all. A migration's added gap reads against these: on a busy host the
/// stream's largest gap varies from window to window by itself, and an
/// added gap within that spread is not the migration's.
pub fn added_without_migration(client: &Value, at_s: f64, total_s: f64) -> Vec<f64> {
    let list = list(client);
    let mut own = own_windows(&list, at_s - 0.2, at_s + total_s + 0.5);
    let m = median(&mut own.clone());
    own.iter_mut().for_each(|g| *g -= m);
    own
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_gap_is_read_against_the_streams_own() {
        // Bursts every 8 ms for 3 s, a 20 ms gap at 2.0 s (the migration
        // started at 1.99 s and took 10 ms).
        let mut gaps = Vec::new();
        let mut t = 0.0;
        while t < 3.0 {
            t += 0.008;
            gaps.push(serde_json::json!({"at_s": t, "gap_ms": 8.0}));
        }
        gaps.push(serde_json::json!({"at_s": 2.0, "gap_ms": 20.0}));
        let client = serde_json::json!({ "gaps": gaps });
        let g = around(&client, 1.99, 0.01);
        assert_eq!(g.gap_ms, 20.0);
        assert_eq!(g.own_gap_ms, 8.0);
        assert!((g.added_ms() - 12.0).abs() < 1e-9);
        assert!((g.gap_at_ms - 10.0).abs() < 1e-6);
        // Too short a run before the migration: no own gap to compare.
        assert!(around(&client, 0.4, 0.01).own_gap_ms.is_nan());
        // Before a migration at 2.9 s: three windows of 0.71 s, and the
        // 20 ms gap at 2.0 s in the third stands out by 12 ms.
        let null = added_without_migration(&client, 2.9, 0.01);
        assert_eq!(null, vec![0.0, 0.0, 12.0]);
    }
}
