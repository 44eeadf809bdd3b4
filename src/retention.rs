//! Snapshot retention: which snapshots a prune keeps and why.
//!
//! Pure planning, no store access: the caller lists snapshots, [`plan_prune`] returns a
//! [`PrunePlan`], and only then does anything get deleted (so a dry run is the plan
//! printed). The rules mean what restic's `forget --keep-*` flags mean, evaluated in UTC:
//! walking snapshots newest first, a bucket rule (hourly, daily, weekly, monthly, yearly)
//! keeps a snapshot whenever its bucket differs from the last bucket that rule kept, until
//! the rule has kept its count. So each rule keeps the newest snapshot of each of its N
//! newest non-empty buckets; gaps in the history do not use up the count. Unlike restic
//! 0.14+, a rule with counts left over does not also keep the oldest snapshot.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A count that never runs out: `u32::MAX` snapshots is more than any store holds.
pub const KEEP_ALL: u32 = u32::MAX;

/// How many snapshots to keep per rule; 0 means the rule keeps none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeepPolicy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl KeepPolicy {
    /// True when no rule keeps anything, so a prune would remove every snapshot.
    pub fn is_empty(&self) -> bool {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
        .iter()
        .all(|&n| n == 0)
    }
}

/// One snapshot as the planner sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub name: String,
    pub created_ns: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub name: String,
    pub created_ns: i64,
    pub keep: bool,
    /// Every rule that keeps this snapshot, e.g. "daily snapshot 2 (2026-11-20)"; empty
    /// when it is removed.
    pub reasons: Vec<String>,
}

/// What prune would do: every candidate once, newest first.
#[derive(Clone, Debug)]
pub struct PrunePlan {
    pub decisions: Vec<Decision>,
}

impl PrunePlan {
    pub fn keep(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| d.keep)
    }

    pub fn remove(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| !d.keep)
    }
}

#[derive(Debug, Error)]
pub enum RetentionError {
    #[error("no keep policy was given (every count is zero): refusing to remove every snapshot")]
    EmptyPolicy,
}

/// A bucket rule: its name in reasons, its count, and the label naming a time's bucket.
/// Labels are unique per bucket, so comparing labels compares buckets.
struct BucketRule {
    name: &'static str,
    count: u32,
    label: fn(&UtcTime) -> String,
    kept: u32,
    last_label: Option<String>,
}

impl BucketRule {
    fn new(name: &'static str, count: u32, label: fn(&UtcTime) -> String) -> Self {
        BucketRule {
            name,
            count,
            label,
            kept: 0,
            last_label: None,
        }
    }
}

/// Decide for every candidate whether `policy` keeps it.
///
/// Refuses an empty policy: a typo in the flags must not delete the whole history.
pub fn plan_prune(
    candidates: &[Candidate],
    policy: &KeepPolicy,
) -> Result<PrunePlan, RetentionError> {
    if policy.is_empty() {
        return Err(RetentionError::EmptyPolicy);
    }
    let mut order: Vec<&Candidate> = candidates.iter().collect();
    order.sort_by(|a, b| {
        b.created_ns
            .cmp(&a.created_ns)
            .then_with(|| b.name.cmp(&a.name))
    });

    let mut rules = [
        BucketRule::new("hourly", policy.hourly, |t| {
            format!("{:04}-{:02}-{:02} {:02}h", t.year, t.month, t.day, t.hour)
        }),
        BucketRule::new("daily", policy.daily, |t| {
            format!("{:04}-{:02}-{:02}", t.year, t.month, t.day)
        }),
        BucketRule::new("weekly", policy.weekly, |t| {
            format!("{:04}-W{:02}", t.iso_year, t.iso_week)
        }),
        BucketRule::new("monthly", policy.monthly, |t| {
            format!("{:04}-{:02}", t.year, t.month)
        }),
        BucketRule::new("yearly", policy.yearly, |t| format!("{:04}", t.year)),
    ];
    let keep_last = usize::try_from(policy.last).unwrap_or(usize::MAX);

    let mut decisions = Vec::with_capacity(order.len());
    for (nr, cand) in order.into_iter().enumerate() {
        let mut reasons = Vec::new();
        if nr < keep_last {
            reasons.push(format!("last snapshot {}", nr + 1));
        }
        let time = UtcTime::from_ns(cand.created_ns);
        for rule in rules.iter_mut().filter(|r| r.kept < r.count) {
            let label = (rule.label)(&time);
            if rule.last_label.as_deref() != Some(label.as_str()) {
                rule.kept += 1;
                reasons.push(format!("{} snapshot {} ({label})", rule.name, rule.kept));
                rule.last_label = Some(label);
            }
        }
        decisions.push(Decision {
            name: cand.name.clone(),
            created_ns: cand.created_ns,
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    Ok(PrunePlan { decisions })
}

/// "2026-11-22T15:04:05Z" for a time in ns since the Unix epoch (UTC) — used for default
/// snapshot names and listings. Sub-second parts are floored, so -1 ns is 23:59:59.
pub fn format_utc(ns: i64) -> String {
    let t = UtcTime::from_ns(ns);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

const NS_PER_SEC: i64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// A UTC civil time plus its ISO week. Every i64 of ns lies within years 1677..=2262,
/// so the arithmetic below cannot overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct UtcTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    iso_year: i64,
    iso_week: u32,
}

impl UtcTime {
    fn from_ns(ns: i64) -> Self {
        let secs = ns.div_euclid(NS_PER_SEC);
        let days = secs.div_euclid(SECS_PER_DAY);
        // rem_euclid keeps these in 0..86_400, so the casts are lossless.
        let sod = secs.rem_euclid(SECS_PER_DAY) as u32;
        let (year, month, day) = civil_from_days(days);
        let (iso_year, iso_week) = iso_week(days);
        UtcTime {
            year,
            month,
            day,
            hour: sod / 3600,
            minute: sod / 60 % 60,
            second: sod % 60,
            iso_year,
            iso_week,
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil:
/// eras of 400 years, years starting in March so the leap day comes last).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`]: (year, month 1..=12, day 1..=31).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // Both are small and positive by construction: day 1..=31, month 1..=12.
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// ISO 8601 (year, week) of a day: weeks start on Monday and belong to the year that
/// holds their Thursday, so 2021-01-03 is in 2020-W53.
fn iso_week(days: i64) -> (i64, u32) {
    // 1970-01-01 was a Thursday; 0 = Monday.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (iso_year, _, _) = civil_from_days(thursday);
    let ordinal = thursday - days_from_civil(iso_year, 1, 1);
    // ordinal is 0..366, so the week is 1..=53.
    (iso_year, (ordinal / 7 + 1) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR_NS: i64 = 3600 * NS_PER_SEC;

    fn at(year: i64, month: u32, day: u32, hour: i64) -> i64 {
        (days_from_civil(year, month, day) * SECS_PER_DAY + hour * 3600) * NS_PER_SEC
    }

    fn cand(name: &str, created_ns: i64) -> Candidate {
        Candidate {
            name: name.to_string(),
            created_ns,
        }
    }

    /// Counts in flag order: last, hourly, daily, weekly, monthly, yearly.
    fn pol([last, hourly, daily, weekly, monthly, yearly]: [u32; 6]) -> KeepPolicy {
        KeepPolicy {
            last,
            hourly,
            daily,
            weekly,
            monthly,
            yearly,
        }
    }

    /// One snapshot every 6 hours for the 90 days 2026-01-01 ..= 2026-03-31, oldest first.
    fn series() -> Vec<Candidate> {
        let start = at(2026, 1, 1, 0);
        (0..360)
            .map(|i| cand(&format!("s{i:03}"), start + i * 6 * HOUR_NS))
            .collect()
    }

    fn plan(cands: &[Candidate], counts: [u32; 6]) -> PrunePlan {
        plan_prune(cands, &pol(counts)).expect("non-empty policy")
    }

    fn kept_names(p: &PrunePlan) -> Vec<&str> {
        p.keep().map(|d| d.name.as_str()).collect()
    }

    /// Kept snapshots of the 2026 series as "MM-DDTHH", newest first.
    fn kept_hours(p: &PrunePlan) -> Vec<String> {
        p.keep()
            .map(|d| format_utc(d.created_ns)[5..13].to_string())
            .collect()
    }

    #[test]
    fn keep_last_keeps_newest_in_any_input_order() {
        let cands = ["c", "a", "e", "b", "d"].map(|n| cand(n, i64::from(n.as_bytes()[0])));
        let p = plan(&cands, [3, 0, 0, 0, 0, 0]);
        let order: Vec<&str> = p.decisions.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(order, ["e", "d", "c", "b", "a"]);
        assert_eq!(kept_names(&p), ["e", "d", "c"]);
        assert_eq!(p.decisions[2].reasons, ["last snapshot 3"]);
        assert_eq!(p.remove().count(), 2);
        assert!(p.remove().all(|d| d.reasons.is_empty()));
    }

    #[test]
    fn equal_times_break_ties_by_name_descending() {
        let cands = [cand("a", 5), cand("c", 5), cand("b", 5)];
        assert_eq!(kept_names(&plan(&cands, [0, 0, 1, 0, 0, 0])), ["c"]);
    }

    #[test]
    fn each_bucket_rule_keeps_the_newest_of_its_newest_buckets() {
        let s = series();
        let kept = |counts| kept_hours(&plan(&s, counts));
        // Every 6-hourly snapshot is its own hour bucket.
        assert_eq!(
            kept([0, 3, 0, 0, 0, 0]),
            ["03-31T18", "03-31T12", "03-31T06"]
        );
        assert_eq!(
            kept([0, 0, 3, 0, 0, 0]),
            ["03-31T18", "03-30T18", "03-29T18"]
        );
        // 2026-03-31 is a Tuesday: its week began Monday 03-30, so Sunday 03-29 ends W13.
        let weekly = ["03-31T18", "03-29T18", "03-22T18", "03-15T18"];
        assert_eq!(kept([0, 0, 0, 4, 0, 0]), weekly);
        // Only three months and one year have snapshots; unused counts keep nothing more.
        assert_eq!(
            kept([0, 0, 0, 0, 12, 0]),
            ["03-31T18", "02-28T18", "01-31T18"]
        );
        assert_eq!(kept([0, 0, 0, 0, 0, 5]), ["03-31T18"]);
        assert_eq!(kept([0, 100, 0, 0, 0, 0]).len(), 100);
        assert_eq!(kept([0, 0, KEEP_ALL, 0, 0, 0]).len(), 90);
        assert_eq!(kept([0, 0, 0, KEEP_ALL, 0, 0]).len(), 14); // 2026-W01 ..= W14
    }

    #[test]
    fn combined_rules_keep_the_union() {
        let p = plan(&series(), [2, 4, 7, 4, 6, 1]);
        // last/hourly: the 4 of 03-31; daily adds 03-25..=03-30 at 18:00; weekly adds
        // 03-22 and 03-15 (W13's newest, 03-29, daily already keeps); monthly adds 02-28
        // and 01-31; yearly adds nothing.
        assert_eq!(p.keep().count(), 4 + 6 + 2 + 2);
        assert_eq!(p.remove().count(), 360 - 14);
    }

    #[test]
    fn gaps_do_not_use_up_the_count() {
        let cands: Vec<Candidate> = [1, 2, 5, 9]
            .iter()
            .flat_map(|&d| {
                [(1, "am"), (20, "pm")].map(|(h, n)| cand(&format!("{d}{n}"), at(2026, 5, d, h)))
            })
            .collect();
        assert_eq!(
            kept_names(&plan(&cands, [0, 0, 3, 0, 0, 0])),
            ["9pm", "5pm", "2pm"]
        );
    }

    #[test]
    fn a_snapshot_lists_every_rule_that_keeps_it() {
        let p = plan(&series(), [1, 2, 2, 2, 2, 2]);
        assert_eq!(
            p.decisions[0].reasons,
            [
                "last snapshot 1",
                "hourly snapshot 1 (2026-03-31 18h)",
                "daily snapshot 1 (2026-03-31)",
                "weekly snapshot 1 (2026-W14)",
                "monthly snapshot 1 (2026-03)",
                "yearly snapshot 1 (2026)",
            ]
        );
        assert_eq!(
            p.decisions[1].reasons,
            ["hourly snapshot 2 (2026-03-31 12h)"]
        );
        let feb = p
            .keep()
            .find(|d| format_utc(d.created_ns) == "2026-02-28T18:00:00Z");
        assert_eq!(
            feb.map(|d| d.reasons.as_slice()),
            Some(&["monthly snapshot 2 (2026-02)".to_string()][..])
        );
    }

    #[test]
    fn empty_policy_is_refused() {
        let err = plan_prune(&series(), &KeepPolicy::default()).expect_err("must refuse");
        assert!(matches!(err, RetentionError::EmptyPolicy));
        assert!(err.to_string().contains("no keep policy"));
        assert!(!pol([0, 0, 0, 0, 0, 1]).is_empty());
        assert!(plan(&[], [1, 0, 0, 0, 0, 0]).decisions.is_empty());
    }

    #[test]
    fn policy_reads_partial_json() {
        let p: KeepPolicy = serde_json::from_str(r#"{"daily":7}"#).expect("decodes");
        assert_eq!(p, pol([0, 0, 7, 0, 0, 0]));
    }

    #[test]
    fn iso_week_edges() {
        let cases = [
            ((2020, 12, 31), "2020-W53"),
            ((2021, 1, 3), "2020-W53"),
            ((2021, 1, 4), "2021-W01"),
            ((2026, 1, 1), "2026-W01"),
            ((2015, 12, 31), "2015-W53"),
            ((2016, 1, 3), "2015-W53"),
            ((2008, 12, 29), "2009-W01"),
            ((2024, 12, 30), "2025-W01"),
            ((2026, 3, 29), "2026-W13"),
        ];
        for ((y, m, d), want) in cases {
            let t = UtcTime::from_ns(at(y, m, d, 12));
            let got = format!("{:04}-W{:02}", t.iso_year, t.iso_week);
            assert_eq!(got, want, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn format_utc_known_times() {
        let s = NS_PER_SEC;
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_700_000_000 * s), "2023-11-14T22:13:20Z");
        assert_eq!(format_utc(951_782_400 * s), "2000-02-29T00:00:00Z");
        assert_eq!(
            format_utc(1_609_372_800 * s + s - 1),
            "2020-12-31T00:00:00Z"
        );
        assert_eq!(format_utc(-1), "1969-12-31T23:59:59Z");
        assert_eq!(format_utc(i64::MIN), "1677-09-21T00:12:43Z");
        assert_eq!(format_utc(i64::MAX), "2262-04-11T23:47:16Z");
    }

    #[test]
    fn civil_days_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for days in -110_000..110_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    proptest! {
        #[test]
        fn plan_invariants(
            times in prop::collection::vec(
                prop_oneof![any::<i64>(), -HOUR_NS * 24 * 800..HOUR_NS * 24 * 800], 0..40),
            counts in prop::array::uniform6(0..4u32)
                .prop_filter("non-empty", |c| c.iter().any(|&n| n > 0)),
        ) {
            let cands: Vec<Candidate> =
                times.iter().enumerate().map(|(i, &t)| cand(&format!("n{i}"), t)).collect();
            let p = plan(&cands, counts);
            prop_assert_eq!(p.decisions.len(), cands.len());
            let mut names: Vec<&str> = p.decisions.iter().map(|d| d.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            prop_assert_eq!(names.len(), cands.len());
            for d in &p.decisions {
                prop_assert_eq!(d.keep, !d.reasons.is_empty());
                let orig = cands.iter().find(|c| c.name == d.name).map(|c| c.created_ns);
                prop_assert_eq!(orig, Some(d.created_ns));
            }
            prop_assert!(p.decisions.windows(2).all(|w| w[0].created_ns >= w[1].created_ns));
            prop_assert!(p.keep().count() >= cands.len().min(counts[0] as usize));
            if let Some(newest) = p.decisions.first() {
                prop_assert!(newest.keep);
                prop_assert_eq!(Some(newest.created_ns), times.iter().copied().max());
            }
            let rules = ["last", "hourly", "daily", "weekly", "monthly", "yearly"];
            for (rule, count) in rules.iter().zip(counts) {
                let used = p.decisions.iter().flat_map(|d| &d.reasons)
                    .filter(|r| r.starts_with(rule)).count();
                prop_assert!(used <= count as usize);
            }
        }
    }
}
