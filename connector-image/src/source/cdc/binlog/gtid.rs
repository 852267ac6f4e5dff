//! Global transaction ids in both formats. MariaDB: `domain-server-seq`, a position being the
//! last one per domain (`0-1-100,1-2-7`). MySQL: `uuid:gno`, a position being the executed set
//! (`3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7`). Pure.

use std::collections::BTreeMap;

/// MariaDB's GTID position: the last transaction per replication domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MariadbState(BTreeMap<u32, (u32, u64)>);

impl MariadbState {
    /// `0-1-100,1-2-7` (empty: no transaction yet).
    pub fn parse(s: &str) -> Option<MariadbState> {
        let mut m = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (d, s, n) = parse_one(part)?;
            m.insert(d, (s, n));
        }
        Some(MariadbState(m))
    }

    /// A transaction `domain-server-seq` is now done.
    pub fn add(&mut self, domain: u32, server: u32, seq: u64) {
        self.0.insert(domain, (server, seq));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for MariadbState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(d, (s, n))| format!("{d}-{s}-{n}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// One MariaDB GTID, `domain-server-seq`.
pub fn parse_one(s: &str) -> Option<(u32, u32, u64)> {
    let mut it = s.splitn(3, '-');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

/// The body of MariaDB's GTID_EVENT (type 162): sequence number, domain, and whether the group
/// is a single statement (DDL) rather than a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MariadbGtid {
    pub seq: u64,
    pub domain: u32,
    pub standalone: bool,
}

/// MariaDB's GTID_EVENT type code.
pub const MARIADB_GTID_EVENT: u8 = 162;

pub fn parse_mariadb_gtid_event(data: &[u8]) -> Option<MariadbGtid> {
    let seq = u64::from_le_bytes(data.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(data.get(8..12)?.try_into().ok()?);
    let flags = *data.get(12)?;
    Some(MariadbGtid {
        seq,
        domain,
        // FL_STANDALONE: no BEGIN ... COMMIT around the group's one event.
        standalone: flags & 1 != 0,
    })
}

/// A source uuid's bytes and its half-open transaction-number intervals.
pub type SidIntervals = ([u8; 16], Vec<(u64, u64)>);

/// MySQL's executed GTID set: per source uuid, closed intervals of transaction numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MysqlSet(BTreeMap<String, Vec<(u64, u64)>>);

impl MysqlSet {
    /// `uuid:1-5:7,uuid2:1-3` (whitespace and newlines as `SHOW MASTER STATUS` prints them).
    pub fn parse(s: &str) -> Option<MysqlSet> {
        let mut set = MysqlSet::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut it = part.split(':');
            let uuid = it.next()?.trim().to_lowercase();
            if uuid.len() != 36 {
                return None;
            }
            for iv in it {
                let (a, b) = match iv.split_once('-') {
                    Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
                    None => {
                        let n = iv.parse().ok()?;
                        (n, n)
                    }
                };
                set.add_range(&uuid, a, b);
            }
        }
        Some(set)
    }

    /// Adds `uuid:gno`.
    pub fn add(&mut self, uuid: &str, gno: u64) {
        self.add_range(uuid, gno, gno);
    }

    fn add_range(&mut self, uuid: &str, a: u64, b: u64) {
        let ivs = self.0.entry(uuid.to_string()).or_default();
        ivs.push((a, b));
        ivs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ivs.len());
        for &(a, b) in ivs.iter() {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        *ivs = merged;
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// For `COM_BINLOG_DUMP_GTID`: uuid bytes and half-open intervals.
    pub fn sids(&self) -> Vec<SidIntervals> {
        self.0
            .iter()
            .filter_map(|(uuid, ivs)| {
                let hex: String = uuid.chars().filter(|c| *c != '-').collect();
                let mut bytes = [0u8; 16];
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
                }
                Some((bytes, ivs.iter().map(|&(a, b)| (a, b + 1)).collect()))
            })
            .collect()
    }
}

impl std::fmt::Display for MysqlSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(uuid, ivs)| {
                let ivs: Vec<String> = ivs
                    .iter()
                    .map(|&(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                format!("{uuid}:{}", ivs.join(":"))
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// A uuid's 16 bytes as text (`3e11fa47-71ca-11e1-9e33-c80aa9429562`).
pub fn uuid_text(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_positions_keep_the_last_gtid_per_domain() {
        let mut s = MariadbState::parse("0-1-100, 2-5-7").unwrap();
        s.add(0, 1, 101);
        s.add(1, 3, 1);
        assert_eq!(s.to_string(), "0-1-101,1-3-1,2-5-7");
        assert_eq!(MariadbState::parse("").unwrap(), MariadbState::default());
        assert!(MariadbState::parse("0-1").is_none());
        assert_eq!(
            parse_one("0-1-18446744073709551615"),
            Some((0, 1, u64::MAX))
        );
    }

    #[test]
    fn mariadb_gtid_events_decode() {
        let mut body = 42u64.to_le_bytes().to_vec();
        body.extend_from_slice(&3u32.to_le_bytes());
        body.push(1);
        assert_eq!(
            parse_mariadb_gtid_event(&body),
            Some(MariadbGtid {
                seq: 42,
                domain: 3,
                standalone: true
            })
        );
        assert_eq!(parse_mariadb_gtid_event(&body[..10]), None);
    }

    #[test]
    fn mysql_sets_parse_merge_and_print_as_mysql_does() {
        let u = "3E11FA47-71CA-11E1-9E33-C80AA9429562";
        let mut s = MysqlSet::parse(&format!(
            "{u}:1-5:7,\n 4e11fa47-71ca-11e1-9e33-c80aa9429562:3"
        ))
        .unwrap();
        s.add(&u.to_lowercase(), 6);
        s.add(&u.to_lowercase(), 9);
        assert_eq!(
            s.to_string(),
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-7:9,4e11fa47-71ca-11e1-9e33-c80aa9429562:3"
        );
        let sids = s.sids();
        assert_eq!(sids[0].0[0], 0x3e);
        assert_eq!(sids[0].1, vec![(1, 8), (9, 10)], "half-open on the wire");
        assert_eq!(uuid_text(&sids[0].0), u.to_lowercase());
        assert!(MysqlSet::parse("nope:1").is_none());
    }
}
