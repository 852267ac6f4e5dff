//! End-to-end: every metric the Grafana dashboard (`helm/obsrv-connectors/dashboards/`) and the alert
//! rules (`helm/ci/alert-rules.yaml`, the chart's rendered PrometheusRule) read is served by a
//! running connector's and the running operator's `/metrics`, with the labels the queries select and
//! group by, so no panel stays empty and no alert is blind because a name or a label drifted.
//!
//! The real operator and connector binaries run on the local control plane: one Connector ingests
//! good and malformed records (records and bytes by outcome, batch latency, lag, last success), one
//! reads a topic that does not exist (connector errors by reason, a Degraded phase), one has a name
//! taken by a foreign ConfigMap (operator reconcile failures by reason), so every series has samples.
//!
//! Metric names come from the queries through a real PromQL parser; labels Prometheus adds when it
//! scrapes ([`TARGET_LABELS`]) and series from outside the project ([`EXTERNAL`]) are listed below.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use obsrv_e2e::harness::{Stack, binaries_dir};
use obsrv_e2e::services::unique_name;
use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{Expr, LabelModifier};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const DASHBOARD: &str = "helm/obsrv-connectors/dashboards/obsrv-connectors.json";
const RULES: &str = "helm/ci/alert-rules.yaml";

/// Series from outside the project (docs/monitoring.md): Prometheus' own `up`, and
/// kube-state-metrics for container restarts.
const EXTERNAL: &[&str] = &[
    "up",
    "kube_pod_container_status_restarts_total",
    "kube_pod_labels",
];

/// Labels Prometheus puts on every series when the chart's monitors scrape it: the Prometheus
/// Operator's target labels, and the PodMonitor's relabelings of the pod labels `obsrv.io/connector`,
/// `obsrv.io/dataset`, `obsrv.io/source` (scripts/check_chart.py checks these against the chart).
/// The binaries themselves serve none of them.
const TARGET_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "container",
    "job",
    "endpoint",
    "service",
    "instance",
    "connector",
    "dataset",
    "source",
];

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the repository")
        .to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// What the dashboard and the rules read

/// One query: where it comes from and its PromQL.
struct Query {
    origin: String,
    promql: String,
}

/// A dashboard query as plain PromQL: Grafana's interval variables become `5m`, the dashboard's
/// own variables (`$namespace`, `${connector}`) a placeholder string (they only occur in matchers).
fn grafana_to_promql(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let braced = after.starts_with('{');
        let body = if braced { &after[1..] } else { after };
        let name_len = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let name = &body[..name_len];
        let mut consumed = name_len + usize::from(braced);
        if braced {
            // `${name:format}`: skip to the closing brace.
            consumed = body.find('}').map(|j| j + 2).unwrap_or(consumed);
        }
        if name.starts_with("__") {
            out.push_str("5m");
        } else {
            out.push_str(&format!("__var_{name}__"));
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out
}

/// Every panel target and query variable of the dashboard (a `label_values(<selector>, <label>)`
/// variable reads its selector and groups by its label).
fn dashboard_queries() -> Result<Vec<Query>> {
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(repo().join(DASHBOARD))?)?;
    let mut out = vec![];
    let mut panels: Vec<&Value> = vec![];
    for p in dash["panels"].as_array().context("dashboard panels")? {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten()); // a collapsed row's panels
    }
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                origin: format!(
                    "panel '{}' {}",
                    p["title"].as_str().unwrap_or_default(),
                    t["refId"].as_str().unwrap_or_default()
                ),
                promql: grafana_to_promql(t["expr"].as_str().context("target expr")?),
            });
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .context("variable query")?;
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .with_context(|| format!("variable {}: not label_values(..): {q}", v["name"]))?;
        let (selector, label) = inner
            .rsplit_once(',')
            .with_context(|| format!("variable {}: label_values without a label", v["name"]))?;
        out.push(Query {
            origin: format!("variable {}", v["name"].as_str().unwrap_or_default()),
            promql: format!(
                "sum by ({}) ({})",
                label.trim(),
                grafana_to_promql(selector.trim())
            ),
        });
    }
    Ok(out)
}

fn rule_queries() -> Result<Vec<Query>> {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join(RULES))?)?;
    let mut out = vec![];
    for g in rules["groups"].as_sequence().context("rule groups")? {
        for r in g["rules"].as_sequence().context("rules")? {
            out.push(Query {
                origin: format!(
                    "alert {}",
                    r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?")
                ),
                promql: r["expr"].as_str().context("rule expr")?.to_string(),
            });
        }
    }
    Ok(out)
}

/// What one PromQL expression reads: its vector selectors, and the labels it groups or matches on.
#[derive(Default)]
struct Reads {
    selectors: Vec<(String, Vec<Matcher>)>,
    grouping: BTreeSet<String>,
}

impl Reads {
    fn of(q: &Query) -> Result<Reads> {
        let expr = promql_parser::parser::parse(&q.promql)
            .map_err(|e| anyhow::anyhow!("{}: not PromQL ({e}): {}", q.origin, q.promql))?;
        let mut r = Reads::default();
        r.visit(&expr);
        Ok(r)
    }

    fn labels(&mut self, m: &LabelModifier) {
        self.grouping.extend(m.labels().labels.iter().cloned());
    }

    fn visit(&mut self, e: &Expr) {
        match e {
            Expr::VectorSelector(vs) => self.selector(vs),
            Expr::MatrixSelector(ms) => self.selector(&ms.vs),
            Expr::Aggregate(a) => {
                if let Some(m) = &a.modifier {
                    self.labels(m);
                }
                self.visit(&a.expr);
                if let Some(p) = &a.param {
                    self.visit(p);
                }
            }
            Expr::Binary(b) => {
                if let Some(m) = b.modifier.as_ref().and_then(|m| m.matching.as_ref()) {
                    self.labels(m);
                }
                self.visit(&b.lhs);
                self.visit(&b.rhs);
            }
            Expr::Call(c) => c.args.args.iter().for_each(|a| self.visit(a)),
            Expr::Paren(p) => self.visit(&p.expr),
            Expr::Unary(u) => self.visit(&u.expr),
            Expr::Subquery(s) => self.visit(&s.expr),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }

    fn selector(&mut self, vs: &promql_parser::parser::VectorSelector) {
        let matchers = vs
            .matchers
            .matchers
            .iter()
            .filter(|m| m.name != "__name__")
            .cloned()
            .collect();
        self.selectors
            .push((vs.name.clone().unwrap_or_default(), matchers));
    }
}

// ---------------------------------------------------------------------------------------------
// What the binaries serve

/// A `/metrics` page (Prometheus / OpenMetrics text): family types and the samples' label sets.
#[derive(Default)]
struct Exposition {
    /// `# TYPE` name -> type.
    types: BTreeMap<String, String>,
    /// Sample name -> the label sets it was served with.
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

impl Exposition {
    fn parse(text: &str) -> Result<Exposition> {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').context("TYPE line")?;
                e.types.insert(name.into(), kind.trim().into());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (name, labels) = match line.find(['{', ' ']) {
                Some(i) if line.as_bytes()[i] == b'{' => {
                    (&line[..i], parse_labels(&line[i + 1..])?)
                }
                Some(i) => (&line[..i], BTreeMap::new()),
                None => bail!("sample line without a value: {line}"),
            };
            e.samples.entry(name.into()).or_default().push(labels);
        }
        Ok(e)
    }

    /// Whether `name` is a sample name of a declared family (a counter `x` serves `x_total`, a
    /// histogram `x` serves `x_bucket`, `x_sum`, `x_count`).
    fn declares(&self, name: &str) -> Option<&str> {
        self.types.iter().find_map(|(family, kind)| {
            let names: Vec<String> = match kind.as_str() {
                "counter" => vec![format!("{family}_total"), family.clone()],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{family}{s}"))
                    .collect(),
                _ => vec![family.clone()],
            };
            names.iter().any(|n| n == name).then_some(kind.as_str())
        })
    }

    fn merge(&mut self, other: Exposition) {
        self.types.extend(other.types);
        for (k, v) in other.samples {
            self.samples.entry(k).or_default().extend(v);
        }
    }
}

/// `a="x",b="y\"z"} 1` -> {a: x, b: y"z}
fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek() == Some(&'}') || chars.peek().is_none() {
            return Ok(out);
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            bail!("label {name} without a quoted value in {s}");
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(o) => value.push(o),
                    None => bail!("dangling escape in {s}"),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(name.trim().to_string(), value);
    }
}

async fn scrape(addr: &str) -> Result<Exposition> {
    let resp = reqwest::get(format!("http://{addr}/metrics")).await?;
    if !resp.status().is_success() {
        bail!("GET http://{addr}/metrics: {}", resp.status());
    }
    Exposition::parse(&resp.text().await?)
}

// ---------------------------------------------------------------------------------------------
// The checks, as pure functions of (queries, what was served)

/// Problems with one query against what the binaries serve: metric names nobody serves, label
/// matchers and groupings on labels the series do not carry, matcher values no series has.
fn problems(q: &Query, served: &Exposition) -> Result<Vec<String>> {
    let reads = Reads::of(q)?;
    let mut out = vec![];
    let mut own_labels: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
    let mut external_only = true;
    for (name, matchers) in &reads.selectors {
        if name.is_empty() {
            out.push(format!("{}: a selector without a metric name", q.origin));
            continue;
        }
        if EXTERNAL.contains(&name.as_str()) {
            if name == "up" {
                // up carries only target labels.
                for m in matchers {
                    if !TARGET_LABELS.contains(&m.name.as_str()) {
                        out.push(format!("{}: up has no label {}", q.origin, m.name));
                    }
                }
            }
            continue;
        }
        external_only = false;
        if served.declares(name).is_none() {
            out.push(format!(
                "{}: {name} is served by neither the connector's nor the operator's /metrics",
                q.origin
            ));
            continue;
        }
        let Some(sets) = served.samples.get(name) else {
            out.push(format!(
                "{}: {name} is declared but had no sample in this run (the scenario must exercise it)",
                q.origin
            ));
            continue;
        };
        for set in sets {
            own_labels.extend(set.keys().map(String::as_str));
        }
        for m in matchers {
            if TARGET_LABELS.contains(&m.name.as_str()) {
                continue;
            }
            let values: BTreeSet<&str> = sets
                .iter()
                .filter_map(|s| s.get(&m.name).map(String::as_str))
                .collect();
            if values.is_empty() {
                out.push(format!("{}: {name} has no label {}", q.origin, m.name));
            } else if !matches!(m.op, MatchOp::NotEqual | MatchOp::NotRe(_))
                && !values.iter().any(|v| m.is_match(v))
            {
                out.push(format!(
                    "{}: {name}{{{m}}} matches none of the served values {values:?}",
                    q.origin
                ));
            }
        }
    }
    if !external_only {
        let bucket = reads.selectors.iter().any(|(n, _)| n.ends_with("_bucket"));
        for l in &reads.grouping {
            let histogram_bound = bucket && l == "le";
            if !(own_labels.contains(l.as_str()) || histogram_bound) {
                out.push(format!(
                    "{}: groups or matches by {l}, which its series do not carry",
                    q.origin
                ));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The scenario

fn kafka_connector(name: &str, bootstrap: &str, topic: &str) -> String {
    let c = json!({
        "apiVersion": "obsrv.io/v1alpha1", "kind": "Connector", "metadata": {"name": name},
        "spec": {"dataset": name, "source": {"kafka": {"bootstrapServers": bootstrap, "topics": [topic]}}},
    });
    serde_yaml::to_string(&c).expect("a JSON value is YAML")
}

/// A ConfigMap that is not the operator's, with the name of a Connector applied next: the operator
/// refuses to take it over and reports a reconcile failure (reason NameConflict).
fn foreign_config_map(name: &str) -> String {
    let c = json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
        "data": {"owner": "somebody else"},
    });
    serde_yaml::to_string(&c).expect("a JSON value is YAML")
}

/// `ip:port` of a running pod of the Connector (ready or not: a Connector in error still serves
/// `/metrics`).
fn pod_address(stack: &Stack, connector: &str) -> Result<Option<String>> {
    Ok(stack
        .pods(connector)?
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .find_map(|p| p["status"]["podIP"].as_str())
        .map(|ip| format!("{ip}:{}", obsrv_crds::runtime::HTTP_PORT)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_read_is_served() -> Result<()> {
    let mut queries = dashboard_queries()?;
    let dashboard_count = queries.len();
    queries.extend(rule_queries()?);
    assert!(
        dashboard_count >= 10 && queries.len() > dashboard_count,
        "read {dashboard_count} dashboard queries and {} rules",
        queries.len() - dashboard_count
    );

    let stack = Stack::start_with(None, binaries_dir()?).await?;
    let topic = unique_name("clicks");
    stack.broker.create_topic(&topic, 1).await?;
    for i in 0..20 {
        stack
            .broker
            .produce(&topic, None, &json!({"id": i}).to_string())
            .await?;
    }
    stack
        .broker
        .produce(&topic, None, "this is not a JSON object")
        .await?;
    stack.apply(&kafka_connector("clicks", stack.broker.bootstrap(), &topic))?;
    stack.apply(&kafka_connector(
        "no-topic",
        stack.broker.bootstrap(),
        &unique_name("absent"),
    ))?;
    stack.apply(&foreign_config_map("taken"))?;
    stack.apply(&kafka_connector("taken", stack.broker.bootstrap(), &topic))?;

    // The good Connector: every record ingested or failed, as its status says.
    stack
        .eventually("clicks: 20 ingested and 1 failed", WAIT, async || {
            let s = &stack.get_json(&["connector", "clicks"])?["status"]["totals"];
            Ok((s["recordsIngested"] == 20 && s["recordsFailed"] == 1).then_some(()))
        })
        .await?;
    let operator = stack
        .operator_admin()
        .context("the local operator's admin address")?
        .to_string();

    // Scrape until every series the scenario causes has a sample (the operator's gauges and the
    // erroring connector's counter appear after their first reconcile / attempt).
    let served = stack
        .eventually("samples of every series on /metrics", WAIT, async || {
            let mut served = Exposition::default();
            for c in ["clicks", "no-topic"] {
                let addr = pod_address(&stack, c)?.with_context(|| format!("no pod of {c} yet"))?;
                served.merge(scrape(&addr).await?);
            }
            served.merge(scrape(&operator).await?);
            let missing: Vec<String> = queries
                .iter()
                .map(|q| problems(q, &served))
                .collect::<Result<Vec<_>>>()?
                .concat();
            if missing.is_empty() {
                Ok(Some(served))
            } else {
                bail!("{}", missing.join("\n"))
            }
        })
        .await?;

    // Both binaries contributed: the connector's series and the operator's.
    for family in ["obsrv_connector_records", "obsrv_operator_reconciles"] {
        assert!(
            served.types.contains_key(family),
            "{family} not served: {:?}",
            served.types.keys()
        );
    }
    Ok(())
}

/// The checks can fail: a misspelt metric, a label the series do not have, a matcher value no
/// series has, and grouping by a label nobody sets are each reported.
#[test]
fn the_checks_catch_names_and_labels_that_drifted() -> Result<()> {
    let served = Exposition::parse(
        "# TYPE obsrv_connector_records counter\n\
         obsrv_connector_records_total{outcome=\"ingested\"} 3\n\
         # TYPE obsrv_connector_batch_latency_seconds histogram\n\
         obsrv_connector_batch_latency_seconds_bucket{le=\"0.1\"} 1\n\
         # TYPE obsrv_connector_lag_records gauge\n\
         obsrv_connector_lag_records 0\n\
         # EOF\n",
    )?;
    let check = |promql: &str| -> Result<Vec<String>> {
        problems(
            &Query {
                origin: "test".into(),
                promql: grafana_to_promql(promql),
            },
            &served,
        )
    };
    let good = [
        r#"sum by (namespace, connector) (rate(obsrv_connector_records_total{outcome="ingested", namespace=~"$namespace", connector=~"${connector}"}[$__rate_interval]))"#,
        "histogram_quantile(0.9, sum by (connector, le) (rate(obsrv_connector_batch_latency_seconds_bucket[5m])))",
        r#"sum by (namespace) (obsrv_connector_lag_records) and on (namespace) up{job="x"} == 1"#,
        r#"increase(kube_pod_container_status_restarts_total{namespace=~"$namespace"}[10m])"#,
    ];
    for q in good {
        assert_eq!(check(q)?, Vec::<String>::new(), "{q}");
    }
    for (q, says) in [
        (
            "rate(obsrv_connector_record_total[5m])",
            "served by neither",
        ),
        (
            r#"obsrv_connector_lag_records{tenant="a"}"#,
            "no label tenant",
        ),
        (
            r#"obsrv_connector_records_total{outcome="dropped"}"#,
            "matches none",
        ),
        (
            "sum by (dataset_id) (obsrv_connector_lag_records)",
            "dataset_id",
        ),
        (
            "sum by (le) (obsrv_connector_lag_records)",
            "groups or matches by le",
        ),
        (r#"up{tenant="a"}"#, "up has no label tenant"),
    ] {
        let found = check(q)?;
        assert!(
            found.iter().any(|p| p.contains(says)),
            "{q}: expected a problem saying {says:?}, got {found:?}"
        );
    }
    Ok(())
}
