//! The connector and files benches (`harness = false` targets, where cargo runs no `#[test]`) as
//! tests: their figures' arithmetic, and every source's bench run end to end on a few thousand
//! rows against real services, so a bench that stopped working fails here
//! rather than in the hands of the next person measuring. A source added to `SOURCES` is covered
//! without a change here.

#[allow(dead_code)]
#[path = "../benches/connector/main.rs"]
mod bench;

#[allow(dead_code)]
#[path = "../benches/files.rs"]
mod files;

use bench::{
    connector::Usage,
    kafka::{self, ON_PAR, event},
    postgres,
};
use clap::Parser as _;
use obsrv_crds::Delivery;

#[tokio::test]
async fn every_source_bench_runs_end_to_end() {
    for source in bench::SOURCES {
        let args = bench::Args::parse_from(["bench", "--source", source.name, "--rows", "3000"]);
        let report = bench::run(args)
            .await
            .unwrap_or_else(|e| panic!("--source {}: {e:#}", source.name));
        assert!(
            report.starts_with("rows: 3000 "),
            "--source {}:\n{report}",
            source.name
        );
        assert!(
            report.contains("peak RSS"),
            "--source {}:\n{report}",
            source.name
        );
    }
}

/// The files bench (its own target) on a 1 MiB object in each store: every line through each
/// bound and the connector, and a report that says so.
#[tokio::test]
async fn the_files_bench_runs_end_to_end() {
    for kind in ["s3", "azure-blob", "gcs"] {
        let report = files::run(kind, 1)
            .await
            .unwrap_or_else(|e| panic!("files bench on {kind}: {e:#}"));
        let text = report.to_string();
        assert!(text.starts_with(&format!("source {kind}, ")), "{text}");
        assert!(report.rows() > 7000, "{text}");
        for line in [
            "bound: GET + line split",
            "bound: produce of the connector's records",
            "to the same records' produce",
            "peak RSS",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
    }
}

#[test]
fn events_are_distinct_json_objects_of_realistic_size() {
    for i in [0u64, 1, 2, 999, 123_456, 4_999_999, u32::MAX as u64] {
        let e = event(i);
        let v: serde_json::Value = serde_json::from_str(&e).expect("valid JSON");
        assert_eq!(v["id"], i, "{e}");
        assert!(v.is_object());
        assert!((120..=180).contains(&e.len()), "{} bytes: {e}", e.len());
    }
    assert_ne!(event(1), event(2));
}

#[test]
fn ratio_and_verdict() {
    let relay = |delivery, secs, first_secs| kafka::Relay {
        delivery,
        secs,
        first_secs,
        usage: Usage {
            peak_rss_kib: 40 * 1024,
            cpu_secs: 1.0,
        },
    };
    let f = kafka::Figures {
        rows: 1000,
        input_bytes: 150_000,
        fill_secs: 0.5,
        pipe_secs: 1.0,
        pipe_first_secs: 0.5,
        records_pipe_secs: 1.25,
        records_pipe_first_secs: 0.5,
        relays: vec![relay(Delivery::AtLeastOnce, 2.0, 1.0)],
        ingest_counted: 1000,
    };
    let alo = f.relays[0];
    assert_eq!(f.ratio(&alo), 0.5);
    assert_eq!(f.steady_ratio(&alo), 0.5);
    // The same-records pipe took 0.75s after its first record, the connector 1s.
    assert_eq!(f.records_ratio(&alo), 0.75);
    assert!(
        f.report().contains("to the same records: 0.75"),
        "{}",
        f.report()
    );
    assert!(
        f.report()
            .contains("(envelope, key, id header):       1333 rows/s after its first record"),
        "{}",
        f.report()
    );
    assert!(
        f.report()
            .contains("ratio to the pipe: 0.50 start-up included, 0.50 after")
    );
    assert!(f.report().contains("NOT met"));
    // 1000 rows in the 0.5s after the pipe's first record.
    assert!(
        f.report()
            .contains("2000 rows/s after its first record at 0.50s")
    );
    assert!(!f.report().contains("exactlyOnce / atLeastOnce"));
    let fast = relay(Delivery::AtLeastOnce, 1.1, 0.6);
    assert!(f.on_par(&fast));
    // Start-up hides a slow steady state: 0.91 overall, 0.5 after the first record.
    let h = kafka::Figures {
        pipe_secs: 5.5,
        pipe_first_secs: 5.0,
        ..f.clone()
    };
    let slow = relay(Delivery::AtLeastOnce, 6.0, 5.0);
    assert!(h.ratio(&slow) > ON_PAR);
    assert!(!h.on_par(&slow));
    // Both deliveries: each has its verdict, and exactlyOnce is also put against atLeastOnce.
    let both = kafka::Figures {
        relays: vec![fast, relay(Delivery::ExactlyOnce, 2.2, 0.6)],
        ..f
    };
    let report = both.report();
    assert!(report.contains("atLeastOnce"), "{report}");
    assert_eq!(report.matches("NOT met").count(), 1, "{report}");
    assert!(
        report.contains("exactlyOnce / atLeastOnce: 0.50 start-up included, 0.31 after"),
        "{report}"
    );
}

#[test]
fn kafka_medians_over_runs_carry_both_targets() {
    let relay = |delivery, secs, rss_mib: u64| kafka::Relay {
        delivery,
        secs,
        first_secs: 0.5,
        usage: Usage {
            peak_rss_kib: rss_mib * 1024,
            cpu_secs: 1.0,
        },
    };
    let run = |alo_secs, alo_rss, eo_secs| kafka::Figures {
        rows: 1000,
        input_bytes: 150_000,
        fill_secs: 0.5,
        pipe_secs: 1.5,
        pipe_first_secs: 0.5,
        records_pipe_secs: 2.5,
        records_pipe_first_secs: 0.5,
        relays: vec![
            relay(Delivery::AtLeastOnce, alo_secs, alo_rss),
            relay(Delivery::ExactlyOnce, eo_secs, 50),
        ],
        ingest_counted: 6000,
    };
    // atLeastOnce ratios 1.5/1.6, 1.5/3.0, 1.5/1.55 -> median 0.94 (0.91 after the first
    // record); RSS 60, 70, 62 -> 62. exactlyOnce: 1.5/3.0 each run.
    let runs = [run(1.6, 60, 3.0), run(3.0, 70, 3.0), run(1.55, 62, 3.0)];
    let m = kafka::medians(&runs);
    assert!(m.starts_with("medians of 3 run(s):"), "{m}");
    assert_eq!(m.lines().count(), 3, "one line per delivery: {m}");
    let alo = m.lines().find(|l| l.contains("atLeastOnce")).expect(&m);
    assert!(
        alo.contains("0.94 start-up included, 0.91 after the first record"),
        "{alo}"
    );
    assert!(alo.contains("peak RSS 62.0 MiB"), "{alo}");
    // 2s of the same-records pipe over 1.1, 2.5 and 1.05s after the first record -> 1.82.
    assert!(alo.contains("to the same records: 1.82"), "{alo}");
    assert_eq!(alo.matches("NOT met").count(), 0, "{alo}");
    let eo = m.lines().find(|l| l.contains("exactlyOnce")).expect(&m);
    assert!(eo.contains("0.50 start-up included"), "{eo}");
    assert_eq!(eo.matches("NOT met").count(), 1, "the ratio only: {eo}");
}

#[test]
fn postgres_ratios_are_to_the_pipe_bound_and_exactly_once_to_at_least_once() {
    let usage = |mib: u64| Usage {
        peak_rss_kib: mib * 1024,
        cpu_secs: 1.5,
    };
    let run = |pipe_secs, alo, eo| postgres::Run {
        psql_secs: 1.0,
        copy_secs: 1.5,
        produce_secs: 1.6,
        pipe_secs,
        envelope_pipe_secs: 2.4,
        connector: vec![
            (Delivery::AtLeastOnce, alo, usage(48)),
            (Delivery::ExactlyOnce, eo, usage(40)),
        ],
    };
    // Per run (ratio to the pipe; exactlyOnce over atLeastOnce): 0.80, 0.50; 0.92, 0.27; 0.73, 0.68.
    let runs = [run(2.0, 2.5, 5.0), run(2.2, 2.4, 9.0), run(1.9, 2.6, 3.8)];
    let r = postgres::report(&postgres::SHAPES[0], 1000, 200_000, &runs);
    assert!(r.contains("medians of 3 run(s)"), "{r}");
    assert!(
        r.contains("bound psql \\copy row_to_json to /dev/null:         1000"),
        "{r}"
    );
    assert!(r.contains("<- the ratios' bound"), "{r}");
    assert!(
        r.contains("producing the connector's records (envelope, key, id header):      417"),
        "{r}"
    );
    // To the same records: 2.4 s over the connector's seconds, per run, then the median.
    assert!(
        r.contains("atLeastOnce       400  ratio 0.80 (runs: 0.80 0.92 0.73; to the same records: 0.96), peak RSS 48.0 MiB"),
        "{r}"
    );
    assert!(
        r.contains(
            "exactlyOnce       200  ratio 0.40 (runs: 0.40 0.24 0.50; to the same records: 0.48)"
        ),
        "{r}"
    );
    assert!(
        r.contains("exactlyOnce / atLeastOnce: 0.50 (runs: 0.50 0.27 0.68; target >= 0.8)"),
        "{r}"
    );
    assert_eq!(postgres::median(vec![3.0, 1.0, 2.0]), 2.0);
    assert_eq!(postgres::median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
}

/// Every `cargo bench ... --bench connector -- <args>` line of the README and the bench's own
/// docs parses: a renamed or removed flag fails here, not in the hands of a reader.
#[test]
fn the_documented_bench_commands_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for file in ["../README.md", "benches/connector/main.rs"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for line in text.lines() {
            let Some((_, args)) = line.split_once("--bench connector -- ") else {
                continue;
            };
            let args = args.split('#').next().unwrap_or_default();
            if args.contains('<') {
                continue; // a pattern (`--source <name> ...`), not a command
            }
            let argv = std::iter::once("bench").chain(args.split_whitespace());
            if let Err(e) = bench::Args::try_parse_from(argv) {
                panic!("{file}: `{line}` does not parse: {e}");
            }
            seen += 1;
        }
    }
    assert!(seen >= 8, "only {seen} documented bench commands found");
}

#[test]
fn latency_quantiles_are_of_the_sorted_values() {
    use bench::cdc::quantile;
    let ms: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(quantile(&ms, 0.5), 50.0);
    assert_eq!(quantile(&ms, 0.99), 99.0);
    assert_eq!(quantile(&ms, 1.0), 100.0);
    assert_eq!(quantile(&[7.0], 0.99), 7.0);
    assert!(quantile(&[], 0.5).is_nan());
}

#[test]
fn cdc_report_gives_each_figure_against_its_bound() {
    use bench::cdc::{BigTransaction, Figures, Latency, Runs, Snapshot};
    let usage = Usage {
        peak_rss_kib: 50 * 1024,
        cpu_secs: 2.0,
    };
    let f = Figures {
        kind: "postgresCdc",
        bound: "pg_recvlogical pgoutput",
        snapshot_bound: "psql \\copy <table>",
        rows: 1000,
        fill_secs: 0.1,
        bound_secs: 1.0,
        runs: Runs {
            connector_secs: 2.0,
            replay_secs: 1.5,
            connector: usage,
            big_transaction: BigTransaction {
                rows: 1000,
                commit_secs: 0.1,
                secs: 0.5,
                usage,
            },
            latency: Latency {
                changes: 1000,
                secs: 0.1,
                p50_ms: 20.0,
                p99_ms: 40.0,
                max_ms: 45.0,
            },
            snapshot: Snapshot {
                rows: 2000,
                bound_secs: 1.0,
                secs: 4.0,
                replay_secs: 2.0,
                usage,
            },
        },
    };
    let r = f.report();
    assert!(r.starts_with("rows: 1000 "), "{r}");
    assert!(
        r.contains("ratio to the raw read: 0.50 (target >= 0.8)"),
        "{r}"
    );
    assert!(
        r.contains("all ingested 0.50s later (2000 changes/s)"),
        "{r}"
    );
    assert!(r.contains("p50 20.0 ms, p99 40.0 ms"), "{r}");
    assert!(
        r.contains("psql \\copy <table> to /dev/null 2000 rows/s"),
        "{r}"
    );
    assert!(r.contains("ratio 0.25 (target >= 0.7)"), "{r}");
    // 1000 records produced again in 1.5s; the connector took 2s.
    assert!(
        r.contains("produced again (nothing read from the source): 667 changes/s; the connector at 0.75 of it"),
        "{r}"
    );
    assert!(
        r.contains("its records produced again 1000 rows/s, the connector at 0.50 of it"),
        "{r}"
    );
}
