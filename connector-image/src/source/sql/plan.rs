//! Planning: one table resolved against its catalog into the SQL that pages through it by keyset
//! on `(cursor, tieBreaker)`, counts what is left and estimates it. Pure: strings in, strings out.

use obsrv_crds::TableSpec;

use super::{Column, Dialect, keyset::TablePosition, pg_json::ValueFormat, postgres::KeyFormat};
use crate::error::{Error, Result};

/// Quotes an identifier for the dialect.
pub fn quote_ident(d: Dialect, name: &str) -> String {
    match d {
        Dialect::Postgres => format!("\"{}\"", name.replace('"', "\"\"")),
        Dialect::MySql => format!("`{}`", name.replace('`', "``")),
    }
}

/// `s` as a SQL string literal (quotes doubled, backslashes doubled for an `E'...'` literal).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// The expression rendering a column into the row's JSON, so that types map faithfully:
/// bytes as base64, timestamps ISO-8601 with zone (sessions run in UTC).
pub fn column_expr(d: Dialect, c: &Column) -> String {
    let col = format!("s.{}", quote_ident(d, &c.name));
    match d {
        Dialect::Postgres => match c.base_type.as_str() {
            "bytea" => format!("translate(encode({col}, 'base64'), E'\\n', '')"),
            "timestamp" => format!("({col} AT TIME ZONE 'UTC')"),
            _ => col,
        },
        Dialect::MySql => match c.base_type.as_str() {
            "binary" | "varbinary" | "blob" | "tinyblob" | "mediumblob" | "longblob" => {
                format!("REPLACE(TO_BASE64({col}), CHAR(10), '')")
            }
            "datetime" | "timestamp" => format!("DATE_FORMAT({col}, '%Y-%m-%dT%H:%i:%s.%fZ')"),
            "bit" => format!("CAST({col} AS UNSIGNED)"),
            _ => col,
        },
    }
}

/// How a bound text parameter is cast back to a column's type for the keyset comparison.
pub fn param_cast(d: Dialect, c: &Column, placeholder: &str) -> String {
    match d {
        Dialect::Postgres => format!("{placeholder}::{}", c.full_type),
        Dialect::MySql => {
            let unsigned = c.full_type.contains("unsigned");
            match c.base_type.as_str() {
                "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => {
                    format!(
                        "CAST({placeholder} AS {})",
                        if unsigned { "UNSIGNED" } else { "SIGNED" }
                    )
                }
                "decimal" | "numeric" => {
                    let ty = c
                        .full_type
                        .split_whitespace()
                        .next()
                        .unwrap_or("decimal(65,30)");
                    format!("CAST({placeholder} AS {})", ty.to_uppercase())
                }
                "datetime" | "timestamp" => format!("CAST({placeholder} AS DATETIME(6))"),
                "date" => format!("CAST({placeholder} AS DATE)"),
                "time" => format!("CAST({placeholder} AS TIME(6))"),
                "float" | "double" | "real" => format!("CAST({placeholder} AS DOUBLE)"),
                _ => placeholder.to_string(),
            }
        }
    }
}

/// Everything needed to page through one table, resolved against its catalog once at start.
#[derive(Clone, Debug, PartialEq)]
pub struct TablePlan {
    /// The table as configured (state key).
    pub name: String,
    pub dialect: Dialect,
    /// The table as the FROM clause names it.
    pub from: String,
    pub select: Vec<String>,
    /// The columns of the row's JSON, in order.
    pub columns: Vec<Column>,
    pub cursor: Column,
    pub tie_breaker: Option<Column>,
}

/// Which query to run next on a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// From the start (no position yet).
    First,
    /// Rows after the position.
    After,
    /// Every row whose cursor equals the bound value (completing a tie group when there is no
    /// tie-breaker).
    TieGroup,
}

impl TablePlan {
    /// Builds the plan from the table's catalog columns; fails on unknown columns.
    pub fn new(
        dialect: Dialect,
        t: &TableSpec,
        from: String,
        columns: &[Column],
    ) -> Result<TablePlan> {
        let find = |n: &str| {
            columns
                .iter()
                .find(|c| c.name == n)
                .or_else(|| columns.iter().find(|c| c.name.eq_ignore_ascii_case(n)))
                .cloned()
                .ok_or_else(|| Error::Schema(format!("table {} has no column {n}", t.name)))
        };
        if columns.is_empty() {
            return Err(Error::Schema(format!(
                "table {} not found or has no columns",
                t.name
            )));
        }
        let cursor = find(&t.cursor.column)?;
        let tie_breaker = t.cursor.tie_breaker.as_deref().map(find).transpose()?;
        let chosen: Vec<Column> = if t.columns.is_empty() {
            columns.to_vec()
        } else {
            t.columns.iter().map(|c| find(c)).collect::<Result<_>>()?
        };
        let select = chosen
            .iter()
            .map(|c| match dialect {
                Dialect::Postgres => format!(
                    "{} AS {}",
                    column_expr(dialect, c),
                    quote_ident(dialect, &c.name)
                ),
                Dialect::MySql => {
                    format!("{}, {}", quote_literal(&c.name), column_expr(dialect, c))
                }
            })
            .collect();
        Ok(TablePlan {
            name: t.name.clone(),
            dialect,
            from,
            select,
            columns: chosen,
            cursor,
            tie_breaker,
        })
    }

    /// The SQL of one page. Binds, in order: for `After` the cursor (MySQL: twice) and tie-breaker;
    /// for `TieGroup` the cursor. Columns returned: row JSON text, cursor text, tie-breaker text.
    pub fn query(&self, page: Page, limit: usize) -> String {
        let params = match self.dialect {
            Dialect::Postgres => ["$1", "$2", "$3"],
            Dialect::MySql => ["?", "?", "?"],
        };
        self.query_with(page, limit, params, false)
    }

    /// How the cursor and tie-breaker travel in this table's COPY stream.
    pub fn key_formats(&self) -> [KeyFormat; 2] {
        let of = |c: &Column| match self.dialect {
            Dialect::Postgres => KeyFormat::of_postgres(&c.base_type),
            Dialect::MySql => KeyFormat::Text,
        };
        [
            of(&self.cursor),
            self.tie_breaker.as_ref().map_or(KeyFormat::Text, of),
        ]
    }

    /// Postgres: the columns of the row's JSON in a COPY stream, with how each becomes JSON.
    pub fn json_columns(&self) -> Vec<(String, ValueFormat)> {
        self.columns
            .iter()
            .map(|c| (c.name.clone(), ValueFormat::of_postgres(&c.base_type)))
            .collect()
    }

    /// Postgres: the page at `pos` as `COPY (...) TO STDOUT (FORMAT binary)`. COPY takes no
    /// parameters, so the position's values are inlined as escaped string literals (`E'...'`,
    /// read the same whatever `standard_conforming_strings` says) cast to the column types.
    /// Columns: those of [`TablePlan::json_columns`] (the ones rendered here as they are, the others
    /// as their JSON text), then cursor and tie-breaker in their [`TablePlan::key_formats`].
    pub fn copy_query(&self, page: Page, limit: usize, pos: Option<&TablePosition>) -> String {
        let lits: Vec<String> = self
            .binds(page, pos)
            .iter()
            .map(|b| format!("E{}", quote_literal(b)))
            .collect();
        let lit = |i: usize| lits.get(i).map(String::as_str).unwrap_or("NULL");
        format!(
            "COPY ({}) TO STDOUT (FORMAT binary)",
            self.query_with(page, limit, [lit(0), lit(1), lit(2)], true)
        )
    }

    /// `copy`: the columns and keys as selected for a binary COPY (see [`ValueFormat`] and
    /// [`KeyFormat`]); otherwise the row's JSON and the keys as text.
    fn query_with(&self, page: Page, limit: usize, params: [&str; 3], copy: bool) -> String {
        let d = self.dialect;
        let c = format!("s.{}", quote_ident(d, &self.cursor.name));
        let tb = self
            .tie_breaker
            .as_ref()
            .map(|t| format!("s.{}", quote_ident(d, &t.name)));
        let [p1, p2, p3] = params;
        let mut conds = vec![format!("{c} IS NOT NULL")];
        if let Some(tb) = &tb {
            conds.push(format!("{tb} IS NOT NULL"));
        }
        match (page, &tb, d) {
            (Page::First, _, _) => {}
            (Page::TieGroup, _, _) => {
                conds.push(format!("{c} = {}", param_cast(d, &self.cursor, p1)))
            }
            (Page::After, None, _) => {
                conds.push(format!("{c} > {}", param_cast(d, &self.cursor, p1)))
            }
            (Page::After, Some(tb), Dialect::Postgres) => {
                let tbc = self.tie_breaker.as_ref().expect("tie-breaker column");
                conds.push(format!(
                    "({c}, {tb}) > ({}, {})",
                    param_cast(d, &self.cursor, p1),
                    param_cast(d, tbc, p2)
                ));
            }
            (Page::After, Some(tb), Dialect::MySql) => {
                // Expanded so MySQL/MariaDB use a range scan on the (cursor, tieBreaker) index.
                let tbc = self.tie_breaker.as_ref().expect("tie-breaker column");
                let cv = param_cast(d, &self.cursor, p1);
                let cv2 = param_cast(d, &self.cursor, p2);
                conds.push(format!(
                    "{c} >= {cv} AND ({c} > {cv2} OR {tb} > {})",
                    param_cast(d, tbc, p3)
                ));
            }
        }
        let order = match &tb {
            Some(tb) => format!("{c}, {tb}"),
            None => c.clone(),
        };
        let limit = if page == Page::TieGroup {
            String::new()
        } else {
            format!(" LIMIT {limit}")
        };
        match d {
            Dialect::Postgres => {
                let [cf, tf] = if copy {
                    self.key_formats()
                } else {
                    [KeyFormat::Text; 2]
                };
                let key = |col: &str, f: KeyFormat| match f {
                    KeyFormat::Text => format!("{col}::text"),
                    _ => col.to_string(),
                };
                let c_sel = key(&c, cf);
                let tb_sel = tb
                    .as_ref()
                    .map(|tb| key(tb, tf))
                    .unwrap_or_else(|| "NULL::text".into());
                if copy {
                    let columns: Vec<String> = self
                        .columns
                        .iter()
                        .map(|col| match ValueFormat::of_postgres(&col.base_type) {
                            ValueFormat::Rendered => {
                                format!("to_json({})::text", column_expr(d, col))
                            }
                            _ => format!("s.{}", quote_ident(d, &col.name)),
                        })
                        .collect();
                    format!(
                        "SELECT {}, {c_sel}, {tb_sel} FROM {} s WHERE {} ORDER BY {order}{limit}",
                        columns.join(", "),
                        self.from,
                        conds.join(" AND ")
                    )
                } else {
                    // The database's JSON of the row: what the connector renders from COPY
                    // ([`super::pg_json`]); this query's WHERE also serves the lag count.
                    format!(
                        "SELECT row_to_json(r)::text, {c_sel}, {tb_sel} FROM {} s CROSS JOIN LATERAL (SELECT {}) r WHERE {} ORDER BY {order}{limit}",
                        self.from,
                        self.select.join(", "),
                        conds.join(" AND ")
                    )
                }
            }
            Dialect::MySql => {
                let tb_sel = tb
                    .as_ref()
                    .map(|tb| format!("CAST({tb} AS CHAR)"))
                    .unwrap_or_else(|| "CAST(NULL AS CHAR)".into());
                format!(
                    "SELECT CAST(JSON_OBJECT({}) AS CHAR), CAST({c} AS CHAR), {tb_sel} FROM {} s WHERE {} ORDER BY {order}{limit}",
                    self.select.join(", "),
                    self.from,
                    conds.join(" AND ")
                )
            }
        }
    }

    /// Binds for `page` at `pos`, in placeholder order.
    pub fn binds(&self, page: Page, pos: Option<&TablePosition>) -> Vec<String> {
        let Some(p) = pos else { return Vec::new() };
        match (page, self.dialect, &self.tie_breaker) {
            (Page::First, _, _) => Vec::new(),
            (Page::TieGroup, _, _) | (Page::After, _, None) => vec![p.cursor.clone()],
            (Page::After, Dialect::Postgres, Some(_)) => {
                vec![p.cursor.clone(), p.tie_breaker.clone().unwrap_or_default()]
            }
            (Page::After, Dialect::MySql, Some(_)) => {
                vec![
                    p.cursor.clone(),
                    p.cursor.clone(),
                    p.tie_breaker.clone().unwrap_or_default(),
                ]
            }
        }
    }

    /// Age in seconds of the oldest unread row, when the cursor is a time (else `None`).
    pub fn age_query(&self, pos_known: bool) -> Option<String> {
        let c = format!("s.{}", quote_ident(self.dialect, &self.cursor.name));
        let age = match (self.dialect, self.cursor.base_type.as_str()) {
            (Dialect::Postgres, "timestamptz" | "timestamp" | "date") => {
                format!("EXTRACT(EPOCH FROM (now() - min({c})::timestamptz))::float8")
            }
            (Dialect::MySql, "datetime" | "timestamp" | "date") => {
                format!(
                    "CAST(TIMESTAMPDIFF(MICROSECOND, min({c}), UTC_TIMESTAMP(6)) AS DOUBLE) / 1000000"
                )
            }
            _ => return None,
        };
        let count = self.count_query(pos_known);
        let where_at = count.find(" WHERE ").expect("count queries have a WHERE");
        let end = count.rfind(" LIMIT ").expect("count queries have a LIMIT");
        Some(format!(
            "SELECT {age} FROM {} s{}",
            self.from,
            &count[where_at..end]
        ))
    }

    /// Rows remaining after `pos` (capped), for lag.
    pub fn count_query(&self, pos_known: bool) -> String {
        format!(
            "SELECT count(*) FROM (SELECT 1 FROM {} s{} LIMIT 10000000) x",
            self.from,
            self.remaining_where(pos_known)
        )
    }

    /// Postgres: the planner's estimate of the rows remaining after `pos` (`EXPLAIN`, nothing
    /// read). Same binds as [`TablePlan::count_query`].
    pub fn estimate_query(&self, pos_known: bool) -> String {
        format!(
            "EXPLAIN SELECT 1 FROM {} s{}",
            self.from,
            self.remaining_where(pos_known)
        )
    }

    /// ` WHERE ...` of the page query: the rows after the position.
    fn remaining_where(&self, pos_known: bool) -> String {
        let page = if pos_known { Page::After } else { Page::First };
        let q = self.query(page, 10_000_000);
        let where_at = q.find(" WHERE ").expect("page queries have a WHERE");
        let order_at = q.find(" ORDER BY ").expect("page queries have an ORDER BY");
        q[where_at..order_at].to_string()
    }
}

/// Below this many remaining rows (by the planner's estimate) lag is counted exactly; above it the
/// estimate is reported, since counting millions of rows every few seconds would cost the database
/// a good share of what the load itself costs.
pub const EXACT_LAG_BELOW: i64 = 100_000;

/// The row estimate of the top node of a text `EXPLAIN` plan
/// (`Seq Scan on t s  (cost=0.00..1.10 rows=10 width=4)` -> 10). Pure.
pub fn plan_rows(first_line: &str) -> Option<i64> {
    let after = &first_line[first_line.find(" rows=")? + 6..];
    let digits: &str = &after[..after.find(|c: char| !c.is_ascii_digit())?];
    digits.parse().ok()
}

// SQL safety: page queries are built only from catalog identifiers (quoted by `quote_ident`) and
// casts of catalog types; every value is a bound parameter.

/// One row as fetched: JSON text, cursor text, tie-breaker text.
pub type RawRow = (String, Option<String>, Option<String>);

/// What a fetched page means for the position, given whether it was full. Pure.
/// When the page is full and there is no tie-breaker, the rows sharing the last cursor value are
/// held back (returned as `Some(cursor)`) so the caller fetches that whole tie group at once.
pub fn split_page(
    rows: Vec<RawRow>,
    full: bool,
    has_tie_breaker: bool,
) -> (Vec<RawRow>, Option<String>) {
    if !full || has_tie_breaker {
        return (rows, None);
    }
    let Some(last) = rows.last().and_then(|r| r.1.clone()) else {
        return (rows, None);
    };
    let keep: Vec<RawRow> = rows
        .into_iter()
        .filter(|r| r.1.as_deref() != Some(last.as_str()))
        .collect();
    (keep, Some(last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use obsrv_crds::CursorSpec;

    fn col(name: &str, base: &str, full: &str) -> Column {
        Column {
            name: name.into(),
            base_type: base.into(),
            full_type: full.into(),
        }
    }

    fn table(tb: Option<&str>) -> TableSpec {
        TableSpec {
            name: "public.orders".into(),
            cursor: CursorSpec {
                column: "updated_at".into(),
                tie_breaker: tb.map(Into::into),
            },
            columns: vec![],
        }
    }

    /// `orders` keyed on (updated_at, id), with the columns of [`pg_cols`].
    fn pg_plan() -> TablePlan {
        TablePlan::new(
            Dialect::Postgres,
            &table(Some("id")),
            "orders".into(),
            &pg_cols(),
        )
        .unwrap()
    }

    fn pg_cols() -> Vec<Column> {
        vec![
            col("id", "int8", "bigint"),
            col("updated_at", "timestamptz", "timestamp with time zone"),
            col("blob", "bytea", "bytea"),
            col("local", "timestamp", "timestamp without time zone"),
        ]
    }

    #[test]
    fn postgres_keyset_query_never_uses_offset_and_compares_the_pair() {
        let plan = pg_plan();
        let q = plan.query(Page::After, 500);
        assert!(!q.to_uppercase().contains("OFFSET"));
        assert!(
            q.contains(r#"(s."updated_at", s."id") > ($1::timestamp with time zone, $2::bigint)"#),
            "{q}"
        );
        assert!(
            q.ends_with(r#"ORDER BY s."updated_at", s."id" LIMIT 500"#),
            "{q}"
        );
        assert!(
            q.contains(r#"translate(encode(s."blob", 'base64'), E'\n', '') AS "blob""#),
            "{q}"
        );
        assert!(
            q.contains(r#"(s."local" AT TIME ZONE 'UTC') AS "local""#),
            "{q}"
        );
        let pos = TablePosition {
            cursor: "2024-01-01".into(),
            tie_breaker: Some("7".into()),
        };
        assert_eq!(plan.binds(Page::After, Some(&pos)), vec!["2024-01-01", "7"]);
        let first = plan.query(Page::First, 500);
        assert!(
            !first.contains("$1") && first.contains("IS NOT NULL"),
            "{first}"
        );
    }

    #[test]
    fn postgres_copy_query_inlines_the_position_as_escaped_literals() {
        let plan = pg_plan();
        let pos = TablePosition {
            cursor: "2024-01-01 00:00:00+00".into(),
            tie_breaker: Some(r"it's \ 7".into()),
        };
        let q = plan.copy_query(Page::After, 500, Some(&pos));
        // Keys of types rendered from their binary form are selected as they are.
        assert_eq!(
            plan.key_formats(),
            [KeyFormat::Timestamptz, KeyFormat::Int8]
        );
        // Columns rendered here come as they are; the others as Postgres's JSON of them.
        assert!(
            q.starts_with(
                r#"COPY (SELECT s."id", s."updated_at", to_json(translate(encode(s."blob", 'base64'), E'\n', ''))::text, s."local", s."updated_at", s."id" FROM orders s WHERE"#
            ),
            "{q}"
        );
        assert_eq!(
            plan.json_columns(),
            [
                ("id".to_string(), ValueFormat::Int8),
                ("updated_at".to_string(), ValueFormat::Timestamp),
                ("blob".to_string(), ValueFormat::Rendered),
                ("local".to_string(), ValueFormat::Timestamp),
            ]
        );
        // The page query (sqlx, text protocol) keeps text keys.
        assert!(plan.query(Page::After, 500).starts_with(
            r#"SELECT row_to_json(r)::text, s."updated_at"::text, s."id"::text FROM"#
        ));
        assert!(q.ends_with(" LIMIT 500) TO STDOUT (FORMAT binary)"), "{q}");
        assert!(
            q.contains(
                r#"(s."updated_at", s."id") > (E'2024-01-01 00:00:00+00'::timestamp with time zone, E'it''s \\ 7'::bigint)"#
            ),
            "{q}"
        );
        assert!(
            !q.contains('$') && !q.to_uppercase().contains("OFFSET"),
            "{q}"
        );
        let first = plan.copy_query(Page::First, 500, None);
        assert!(!first.contains(") > ("), "{first}");
    }

    #[test]
    fn mysql_keyset_query_is_an_index_friendly_range() {
        let cols = vec![
            col("id", "bigint", "bigint unsigned"),
            col("updated_at", "datetime", "datetime(6)"),
            col("b", "varbinary", "varbinary(10)"),
        ];
        let plan = TablePlan::new(
            Dialect::MySql,
            &table(Some("id")),
            "`shop`.`orders`".into(),
            &cols,
        )
        .unwrap();
        let q = plan.query(Page::After, 10);
        assert!(
            q.contains("s.`updated_at` >= CAST(? AS DATETIME(6)) AND (s.`updated_at` > CAST(? AS DATETIME(6)) OR s.`id` > CAST(? AS UNSIGNED))"),
            "{q}"
        );
        assert!(q.contains("JSON_OBJECT('id', s.`id`, 'updated_at', DATE_FORMAT(s.`updated_at`, '%Y-%m-%dT%H:%i:%s.%fZ'), 'b', REPLACE(TO_BASE64(s.`b`), CHAR(10), ''))"), "{q}");
        let pos = TablePosition {
            cursor: "c".into(),
            tie_breaker: Some("t".into()),
        };
        assert_eq!(plan.binds(Page::After, Some(&pos)), vec!["c", "c", "t"]);
    }

    #[test]
    fn unknown_columns_are_schema_errors() {
        let e = TablePlan::new(
            Dialect::Postgres,
            &table(Some("nope")),
            "orders".into(),
            &pg_cols(),
        )
        .unwrap_err();
        assert_eq!(e.reason(), "SchemaError");
        assert!(e.to_string().contains("nope"));
        let e = TablePlan::new(Dialect::Postgres, &table(None), "orders".into(), &[]).unwrap_err();
        assert_eq!(e.reason(), "SchemaError");
    }

    #[test]
    fn without_tie_breaker_a_full_page_holds_back_its_last_tie_group() {
        let r = |c: &str| (format!("{{\"c\":\"{c}\"}}"), Some(c.to_string()), None);
        let (keep, tie) = split_page(vec![r("1"), r("2"), r("2")], true, false);
        assert_eq!(keep, vec![r("1")]);
        assert_eq!(tie.as_deref(), Some("2"));
        // A short page is everything there is: nothing held back.
        let (keep, tie) = split_page(vec![r("1"), r("2")], false, false);
        assert_eq!((keep.len(), tie), (2, None));
        // With a tie-breaker the pair is unique: nothing held back.
        let (keep, tie) = split_page(vec![r("1"), r("2")], true, true);
        assert_eq!((keep.len(), tie), (2, None));
        let plan =
            TablePlan::new(Dialect::Postgres, &table(None), "orders".into(), &pg_cols()).unwrap();
        let q = plan.query(Page::TieGroup, 10);
        assert!(
            q.contains(r#"s."updated_at" = $1::timestamp with time zone"#) && !q.contains("LIMIT"),
            "{q}"
        );
    }

    #[test]
    fn plan_rows_reads_the_top_node_estimate() {
        assert_eq!(
            plan_rows("Seq Scan on orders s  (cost=0.00..18334.00 rows=999994 width=4)"),
            Some(999_994)
        );
        assert_eq!(
            plan_rows("Index Only Scan using t_idx on t s  (cost=0.42..4.44 rows=1 width=4)"),
            Some(1)
        );
        assert_eq!(plan_rows("Result  (cost=0.00..0.01 width=4)"), None);
        assert_eq!(plan_rows(""), None);
    }

    #[test]
    fn estimate_query_explains_the_remaining_rows() {
        let p = pg_plan();
        let q = p.estimate_query(true);
        assert!(
            q.starts_with(r#"EXPLAIN SELECT 1 FROM orders s WHERE s."updated_at" IS NOT NULL"#),
            "{q}"
        );
        assert!(
            q.ends_with("($1::timestamp with time zone, $2::bigint)"),
            "{q}"
        );
        assert!(!q.contains("LIMIT"), "{q}");
    }

    #[test]
    fn age_query_only_for_time_cursors() {
        let plan = pg_plan();
        let q = plan.age_query(true).unwrap();
        assert!(q.starts_with(r#"SELECT EXTRACT(EPOCH FROM (now() - min(s."updated_at")::timestamptz))::float8 FROM orders s WHERE"#), "{q}");
        assert!(
            q.ends_with("($1::timestamp with time zone, $2::bigint)"),
            "{q}"
        );
        let mut by_id = table(None);
        by_id.cursor.column = "id".into();
        let plan = TablePlan::new(Dialect::Postgres, &by_id, "orders".into(), &pg_cols()).unwrap();
        assert_eq!(plan.age_query(true), None);
    }

    #[test]
    fn count_query_reuses_the_keyset_condition() {
        let plan = pg_plan();
        let q = plan.count_query(true);
        assert!(
            q.starts_with("SELECT count(*) FROM (SELECT 1 FROM orders s WHERE"),
            "{q}"
        );
        assert!(
            q.contains("> ($1::timestamp with time zone, $2::bigint) LIMIT 10000000) x"),
            "{q}"
        );
    }
}
