//! The broker side of every bench: the connector's sink settings, topics, and raw produce and
//! consume (the bounds), all with the runtime's own librdkafka configuration so that a bound and
//! the connector produce alike.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use obsrv_connector::{
    config::{Secrets, SinkSettings},
    envelope::{Context, EVENT_ID_HEADER},
    sink::{
        Acks,
        kafka::{SinkProducer, client_config, create_producer, enqueue, producer_config},
    },
};
use obsrv_crds::{Compression, Delivery};
use rdkafka::{
    ClientConfig, Message as _, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{Consumer, StreamConsumer},
    message::{Header, Headers as _, OwnedHeaders},
};

/// The sink every bench's connector writes to (topics set by the caller): the runtime's defaults
/// (zstd, linger 20 ms, 1 MiB records, atLeastOnce).
pub fn sink_settings(bootstrap: &str) -> SinkSettings {
    SinkSettings {
        bootstrap_servers: bootstrap.to_string(),
        topic: String::new(),
        failed_topic: String::new(),
        state_topic: String::new(),
        max_message_bytes: 1_048_576,
        compression: Compression::Zstd,
        linger_ms: 20,
        batch_bytes: None,
        tls: None,
        sasl: None,
        delivery: Delivery::AtLeastOnce,
    }
}

/// Creates `(name, partitions)` topics on the sink's broker.
pub async fn create_topics(sink: &SinkSettings, topics: &[(&str, i32)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(sink, &Secrets::default())
        .create()
        .context("admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .context("create topics")?
    {
        r.map_err(|(t, e)| anyhow!("create topic {t}: {e}"))?;
    }
    Ok(())
}

/// A producer with the connector's own settings for `sink`.
pub fn sink_producer(sink: &SinkSettings) -> Result<Arc<SinkProducer>> {
    Ok(create_producer(&producer_config(
        sink,
        &Secrets::default(),
        "obsrv-bench",
    ))?)
}

/// Produces one record to `topic` and waits for it: the idempotent producer's start (producer
/// id, connections) is not throughput.
pub async fn warm_up(producer: &SinkProducer, topic: &str) -> Result<()> {
    let acks = Acks::new();
    enqueue(producer, topic, None, Some(b"{}"), None, &acks).await?;
    acks.wait().await?;
    Ok(())
}

/// A producer for filling input topics fast: large batches, no compression.
pub fn fill_producer(sink: &SinkSettings) -> Result<Arc<SinkProducer>> {
    let mut config = client_config(sink, &Secrets::default());
    config
        .set("client.id", "obsrv-bench-fill")
        .set("linger.ms", "50")
        .set("batch.num.messages", "100000")
        .set("batch.size", "4000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "none");
    Ok(create_producer(&config)?)
}

/// Produces each payload to `topic`, keyed by its index, and waits until all are acknowledged.
pub async fn produce_numbered<P: AsRef<[u8]>>(
    producer: &SinkProducer,
    topic: &str,
    payloads: impl IntoIterator<Item = P>,
) -> Result<()> {
    let acks = Acks::new();
    for (i, p) in payloads.into_iter().enumerate() {
        let key = i.to_string();
        enqueue(
            producer,
            topic,
            Some(key.as_bytes()),
            Some(p.as_ref()),
            None,
            &acks,
        )
        .await
        .with_context(|| format!("produce to {topic}"))?;
    }
    acks.wait()
        .await
        .with_context(|| format!("produce to {topic}"))?;
    Ok(())
}

/// Produces `event` (the text of a JSON object) as the connector writes a record: in Obsrv's
/// envelope of `ctx` at `syncts`, keyed by a 32-character id (record number `n`) that also
/// travels in the `obsrv-event-id` header. A bound producing these costs the broker and the
/// producer what the connector's records cost them: the data contract, nothing else.
pub async fn produce_record(
    producer: &SinkProducer,
    topic: &str,
    ctx: &Context,
    syncts: i64,
    n: u64,
    event: &str,
    acks: &Arc<Acks>,
) -> Result<()> {
    let id = format!("{n:032x}");
    let record = ctx.envelope(event, syncts);
    let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
        key: EVENT_ID_HEADER,
        value: Some(&id),
    });
    enqueue(
        producer,
        topic,
        Some(id.as_bytes()),
        Some(&record),
        Some(headers),
        acks,
    )
    .await
    .with_context(|| format!("produce to {topic}"))
}

/// The bound of a source whose records only the connector can build (change events): the `n`
/// records the connector wrote to partition 0 of the sink's ingest topic from `offset` on, read
/// back untimed, then produced again as they are (key, payload, headers) to a new topic `to`
/// with the connector's producer settings. Returns the seconds of that produce: what producing
/// the connector's own records costs on this machine, with nothing read from the source.
pub async fn replay(sink: &SinkSettings, offset: i64, n: usize, to: &str) -> Result<f64> {
    type Kept = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Vec<u8>)>);
    let c = consumer(&sink.bootstrap_servers, &format!("{to}-read"), None)?;
    let mut from = TopicPartitionList::new();
    from.add_partition_offset(&sink.topic, 0, Offset::Offset(offset))?;
    c.assign(&from)?;
    let mut kept: Vec<Kept> = Vec::with_capacity(n);
    while kept.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
            .await
            .map_err(|_| anyhow!("replay: {} of {n} records read back", kept.len()))?
            .context("replay: reading the ingest topic")?;
        let headers = m.headers().map_or_else(Vec::new, |h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        });
        kept.push((
            m.key().map(<[u8]>::to_vec),
            m.payload().map(<[u8]>::to_vec),
            headers,
        ));
    }
    drop(c);
    create_topics(sink, &[(to, 1)]).await?;
    let producer = sink_producer(sink)?;
    warm_up(&producer, to).await?;
    let acks = Acks::new();
    let t = std::time::Instant::now();
    for (key, payload, headers) in &kept {
        let h = headers.iter().fold(
            OwnedHeaders::new_with_capacity(headers.len()),
            |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        );
        enqueue(
            &producer,
            to,
            key.as_deref(),
            payload.as_deref(),
            Some(h),
            &acks,
        )
        .await
        .with_context(|| format!("replay to {to}"))?;
    }
    acks.wait()
        .await
        .with_context(|| format!("replay to {to}"))?;
    Ok(t.elapsed().as_secs_f64())
}

/// A consumer in `group` (from the earliest offset, no commits), subscribed to `topic` when one
/// is given.
pub fn consumer(bootstrap: &str, group: &str, topic: Option<&str>) -> Result<StreamConsumer> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        // As the connector's source: librdkafka's default (1 s between fetches once its queue
        // is above its thresholds) would make the raw pipe, the Kafka bench's bound, slow.
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .context("consumer")?;
    if let Some(t) = topic {
        c.subscribe(&[t]).context("subscribe")?;
    }
    Ok(c)
}

/// Sum of the high watermarks of `topic`'s partitions.
pub fn end_offsets(c: &StreamConsumer, topic: &str) -> Result<i64> {
    let t = Duration::from_secs(5);
    let md = c
        .fetch_metadata(Some(topic), t)
        .with_context(|| format!("metadata of {topic}"))?;
    let mut sum = 0;
    for p in md.topics().iter().flat_map(|m| m.partitions()) {
        sum += c
            .fetch_watermarks(topic, p.id(), t)
            .with_context(|| format!("end offsets of {topic}"))?
            .1;
    }
    Ok(sum)
}

/// Consumes `topic` from the beginning with a fresh `group` until `expected` records arrived or
/// nothing came for 10 s; returns how many arrived (records are counted, not kept).
pub async fn count(bootstrap: &str, group: &str, topic: &str, expected: usize) -> Result<usize> {
    let c = consumer(bootstrap, group, Some(topic))?;
    let mut n = 0;
    while n < expected {
        match tokio::time::timeout(Duration::from_secs(10), c.recv()).await {
            Err(_) => break,
            Ok(m) => {
                m.with_context(|| format!("count {topic}"))?;
                n += 1;
            }
        }
    }
    Ok(n)
}
