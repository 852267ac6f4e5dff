//! The test support brings up real services and leaves nothing behind.

use std::time::Duration;

use obsrv_e2e::services::{Broker, MariaDb, Postgres, S3, unique_name};

fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); /proc/<pid>/stat tells it apart.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|state| state != "Z"))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_round_trip_through_the_broker() -> anyhow::Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql(
        "CREATE TABLE orders (id int PRIMARY KEY, item text, qty int);
         INSERT INTO orders SELECT g, 'item-' || g, g * 2 FROM generate_series(1, 50) g;",
    )
    .await?;
    let rows = pg
        .psql("SELECT row_to_json(o) FROM orders o ORDER BY id")
        .await?;
    let rows: Vec<&str> = rows.lines().collect();
    assert_eq!(rows.len(), 50, "Postgres returned {} rows", rows.len());

    let topic = unique_name("orders");
    broker.create_topic(&topic, 3).await?;
    assert_eq!(broker.partition_count(&topic)?, 3);
    for (i, row) in rows.iter().enumerate() {
        broker
            .produce(&topic, Some(&format!("order-{}", i + 1)), row)
            .await?;
    }
    let read = broker
        .consume_all(&topic, 50, Duration::from_secs(30))
        .await?;
    assert_eq!(read.len(), 50, "read back {} of 50 records", read.len());
    let mut ids: Vec<i64> = read
        .iter()
        .map(|r| r.json().unwrap()["id"].as_i64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, (1..=50).collect::<Vec<_>>());
    let first = read
        .iter()
        .find(|r| r.key_str() == Some("order-7"))
        .expect("key order-7");
    assert_eq!(first.json()?["item"], "item-7");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_requires_the_password_and_is_gone_after_drop() -> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    assert_eq!(pg.psql("SHOW wal_level").await?, "logical");
    assert!(pg.url().starts_with("postgres://obsrv:"));
    let pid = pg.pid();
    drop(pg);
    if let Some(pid) = pid {
        assert!(!alive(pid), "postgres (pid {pid}) still running after drop");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_runs_sql_with_row_binlog() -> anyhow::Result<()> {
    let db = MariaDb::start().await?;
    db.sql("CREATE TABLE t (id int PRIMARY KEY, v varchar(10)); INSERT INTO t VALUES (1, 'a'), (2, 'b');")
        .await?;
    assert_eq!(db.sql("SELECT COUNT(*) FROM t").await?, "2");
    assert_eq!(db.sql("SELECT @@binlog_format").await?, "ROW");
    assert!(db.url().starts_with("mysql://obsrv:"));
    let pid = db.pid();
    drop(db);
    if let Some(pid) = pid {
        assert!(!alive(pid), "mariadbd (pid {pid}) still running after drop");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_accepts_signed_requests_and_rejects_wrong_keys() -> anyhow::Result<()> {
    let s3 = S3::start().await?;
    s3.create_bucket("landing").await?;
    s3.put_object("landing", "in/a.json", r#"{"a":1}"#).await?;
    let url = format!("{}/landing/in/a.json", s3.endpoint());
    let anonymous = reqwest::get(&url).await?;
    assert!(
        !anonymous.status().is_success(),
        "unsigned GET must be refused, got {}",
        anonymous.status()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_keeps_persistent_messages_across_a_restart_and_stops_with_its_epmd()
-> anyhow::Result<()> {
    use obsrv_e2e::services::rabbitmq::RabbitMq;
    let mut mq = RabbitMq::start().await?;
    mq.declare_queue("orders").await?;
    assert_eq!(mq.publish("orders", ["{\"a\":1}", "{\"a\":2}"]).await?, 2);
    mq.restart().await?;
    assert_eq!(mq.queue_depth("orders").await?, (2, 0));
    let pid = mq.pid();
    drop(mq);
    if let Some(pid) = pid {
        assert!(!alive(pid), "rabbitmq (pid {pid}) still running after drop");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_keeps_messages_across_a_restart() -> anyhow::Result<()> {
    use obsrv_e2e::services::nats::Nats;
    let mut nats = Nats::start().await?;
    nats.create_stream("ORDERS", &["orders.>"]).await?;
    assert_eq!(nats.publish("orders.new", ["{\"a\":1}"; 3]).await?, 3);
    nats.restart().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let mut s = js.get_stream("ORDERS").await?;
    assert_eq!(s.info().await?.state.messages, 3);
    let pid = nats.pid();
    drop(nats);
    if let Some(pid) = pid {
        assert!(
            !alive(pid),
            "nats-server (pid {pid}) still running after drop"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_requires_the_password_and_acknowledges_qos1() -> anyhow::Result<()> {
    use obsrv_e2e::services::mqtt::Mosquitto;
    use rumqttc::v5::{AsyncClient, MqttOptions};
    let m = Mosquitto::start().await?;
    assert_eq!(m.publish("sensors/1", ["{\"t\":20}"; 5]).await?, 5);
    // Anonymous clients are refused.
    let (_c, mut ev) = AsyncClient::new(MqttOptions::new("anon", "127.0.0.1", m.port()), 8);
    assert!(
        ev.poll().await.is_err(),
        "an anonymous connect must be refused"
    );
    let pid = m.pid();
    drop(m);
    if let Some(pid) = pid {
        assert!(
            !alive(pid),
            "mosquitto (pid {pid}) still running after drop"
        );
    }
    Ok(())
}
