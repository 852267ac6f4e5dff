//! `spec.schedule` for batch loads: `once`, or a standard 5-field cron expression in UTC. A
//! scheduled run reads until caught up, commits, and idles until the next run.

use k8s_openapi::jiff::{Timestamp, ToSpan, tz::TimeZone};

/// A schedule that cannot run, with what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(pub String);

type Result<T> = std::result::Result<T, ScheduleError>;

/// One cron field: the allowed values as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Field(u64);

impl Field {
    fn parse(s: &str, min: u32, max: u32, name: &str) -> Result<Field> {
        let bad = || ScheduleError(format!("schedule.cron: bad {name} field `{s}`"));
        let mut bits = 0u64;
        for part in s.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, st)) => (r, st.parse::<u32>().map_err(|_| bad())?),
                None => (part, 1),
            };
            if step == 0 {
                return Err(bad());
            }
            let (lo, hi) = if range == "*" {
                (min, max)
            } else if let Some((a, b)) = range.split_once('-') {
                (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?)
            } else {
                let v: u32 = range.parse().map_err(|_| bad())?;
                (v, if part.contains('/') { max } else { v })
            };
            // Sunday may be written 7.
            let (lo, hi) = if name == "weekday" && hi == 7 {
                (lo, 7)
            } else {
                (lo, hi)
            };
            if lo < min || hi > max.max(if name == "weekday" { 7 } else { max }) || lo > hi {
                return Err(bad());
            }
            let mut v = lo;
            while v <= hi {
                bits |= 1 << (if name == "weekday" && v == 7 { 0 } else { v });
                v += step;
            }
        }
        Ok(Field(bits))
    }

    fn has(self, v: u32) -> bool {
        self.0 & (1 << v) != 0
    }
}

/// A parsed cron expression (minute hour day-of-month month day-of-week), UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cron {
    minute: Field,
    hour: Field,
    dom: Field,
    month: Field,
    dow: Field,
    dom_any: bool,
    dow_any: bool,
}

impl Cron {
    pub fn parse(expr: &str) -> Result<Cron> {
        let f: Vec<&str> = expr.split_whitespace().collect();
        if f.len() != 5 {
            return Err(ScheduleError(format!(
                "schedule.cron `{expr}` must have 5 fields (minute hour day month weekday)"
            )));
        }
        Ok(Cron {
            minute: Field::parse(f[0], 0, 59, "minute")?,
            hour: Field::parse(f[1], 0, 23, "hour")?,
            dom: Field::parse(f[2], 1, 31, "day")?,
            month: Field::parse(f[3], 1, 12, "month")?,
            dow: Field::parse(f[4], 0, 6, "weekday")?,
            dom_any: f[2] == "*",
            dow_any: f[4] == "*",
        })
    }

    /// The first matching minute strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let z = t.to_zoned(TimeZone::UTC);
        let start = z.round(k8s_openapi::jiff::Unit::Minute).ok()?;
        let mut m = if start.timestamp() <= t {
            start.checked_add(1.minute()).ok()?
        } else {
            start
        };
        // Every minute of up to ~4 years covers any valid expression (Feb 29 included).
        for _ in 0..(4 * 366 * 24 * 60) {
            let day_ok = match (self.dom_any, self.dow_any) {
                (true, true) => true,
                (false, true) => self.dom.has(m.day() as u32),
                (true, false) => self.dow.has(m.weekday().to_sunday_zero_offset() as u32),
                // Classic cron: either day field matching is enough when both are restricted.
                (false, false) => {
                    self.dom.has(m.day() as u32)
                        || self.dow.has(m.weekday().to_sunday_zero_offset() as u32)
                }
            };
            if self.month.has(m.month() as u32)
                && day_ok
                && self.hour.has(m.hour() as u32)
                && self.minute.has(m.minute() as u32)
            {
                return Some(m.timestamp());
            }
            m = m.checked_add(1.minute()).ok()?;
        }
        None
    }
}

/// When the connector reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Poll forever.
    Continuous,
    /// Read everything once, then idle.
    Once,
    /// Read everything at each matching minute.
    Cron(Cron),
}

impl Plan {
    pub fn from_spec(s: Option<&crate::Schedule>) -> Result<Plan> {
        match s {
            None => Ok(Plan::Continuous),
            Some(s) => match (&s.cron, s.once) {
                (Some(c), _) => Ok(Plan::Cron(Cron::parse(c)?)),
                (None, Some(true)) => Ok(Plan::Once),
                (None, _) => Ok(Plan::Continuous),
            },
        }
    }

    /// Whether a run ends once the source is caught up.
    pub fn is_batch(&self) -> bool {
        !matches!(self, Plan::Continuous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn next_run_times() {
        let hourly = Cron::parse("0 * * * *").unwrap();
        assert_eq!(
            hourly.next_after(ts("2024-01-01T10:00:00Z")),
            Some(ts("2024-01-01T11:00:00Z"))
        );
        assert_eq!(
            hourly.next_after(ts("2024-01-01T10:59:30Z")),
            Some(ts("2024-01-01T11:00:00Z"))
        );
        let every15 = Cron::parse("*/15 2-3 * * *").unwrap();
        assert_eq!(
            every15.next_after(ts("2024-01-01T03:50:00Z")),
            Some(ts("2024-01-02T02:00:00Z"))
        );
        let mondays = Cron::parse("30 6 * * 1").unwrap();
        // 2024-01-01 is a Monday.
        assert_eq!(
            mondays.next_after(ts("2024-01-01T07:00:00Z")),
            Some(ts("2024-01-08T06:30:00Z"))
        );
        let sundays = Cron::parse("0 0 * * 7").unwrap();
        assert_eq!(
            sundays.next_after(ts("2024-01-01T00:00:00Z")),
            Some(ts("2024-01-07T00:00:00Z"))
        );
        let leap = Cron::parse("0 0 29 2 *").unwrap();
        assert_eq!(
            leap.next_after(ts("2024-03-01T00:00:00Z")),
            Some(ts("2028-02-29T00:00:00Z"))
        );
    }

    #[test]
    fn bad_expressions_are_refused() {
        for bad in [
            "* * * *",
            "60 * * * *",
            "*/0 * * * *",
            "a * * * *",
            "5-1 * * * *",
            "* * 0 * *",
        ] {
            assert!(matches!(Cron::parse(bad), Err(ScheduleError(_))), "{bad}");
        }
        assert_eq!(
            Plan::from_spec(Some(&crate::Schedule {
                cron: None,
                once: Some(true)
            }))
            .unwrap(),
            Plan::Once
        );
        assert!(Plan::from_spec(None).unwrap() == Plan::Continuous);
    }
}
