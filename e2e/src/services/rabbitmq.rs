//! RabbitMQ (Debian's `rabbitmq-server`): a throwaway node on free loopback ports. It gets its own
//! `epmd` (on its own port, stopped with it), node name, Erlang cookie home, data and config, so
//! it never meets another node or the package's system service.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::FieldTable,
};
use tempfile::TempDir;

use super::{Server, TEST_PASSWORD, TEST_USER, find_binary, free_port, unique_name};

/// Where Debian puts the server's own scripts (the `/usr/sbin` wrapper switches to the
/// `rabbitmq` user and its system directories).
const RABBITMQ_LIB: &str = "/usr/lib/rabbitmq/lib";

/// A local RabbitMQ node; user [`TEST_USER`] / [`TEST_PASSWORD`] on vhost `/`.
pub struct RabbitMq {
    port: u16,
    dist_port: u16,
    epmd_port: u16,
    node: String,
    script: PathBuf,
    server: Option<Server>,
    _epmd: Server,
    dir: TempDir,
}

fn server_script() -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(RABBITMQ_LIB)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("sbin/rabbitmq-server"))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().with_context(|| {
        format!(
            "rabbitmq-server was not found under {RABBITMQ_LIB}: {}",
            super::SETUP_HINT
        )
    })
}

impl RabbitMq {
    pub async fn start() -> Result<Self> {
        let script = server_script()?;
        let epmd = find_binary("epmd", &["/usr/bin"])?;
        let dir = tempfile::Builder::new()
            .prefix("obsrv-rabbitmq-")
            .tempdir()?;
        let (port, dist_port, epmd_port) = (free_port()?, free_port()?, free_port()?);
        let mut cmd = Command::new(epmd);
        cmd.args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"]);
        let mut epmd = Server::spawn("epmd", cmd, None, dir.path().join("epmd.log"))?;
        epmd.wait_for_port(([127, 0, 0, 1], epmd_port).into(), Duration::from_secs(10))
            .await?;
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n")?;
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\n\
                 default_user = {TEST_USER}\n\
                 default_pass = {TEST_PASSWORD}\n\
                 loopback_users = none\n"
            ),
        )?;
        let mut mq = RabbitMq {
            port,
            dist_port,
            epmd_port,
            node: format!("{}@localhost", unique_name("obsrv")),
            script,
            server: None,
            _epmd: epmd,
            dir,
        };
        mq.launch().await?;
        Ok(mq)
    }

    async fn launch(&mut self) -> Result<()> {
        let d = self.dir.path();
        let mut cmd = Command::new(&self.script);
        cmd.env("HOME", d)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            // The script then execs the VM (no signal-forwarding shell between us and it), and
            // `-noinput` keeps the VM from reading its (empty) stdin.
            .env("RABBITMQ_ALLOW_INPUT", "1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-noinput -kernel inet_dist_use_interface {127,0,0,1}",
            );
        let mut server = Server::spawn("rabbitmq-server", cmd, None, d.join("rabbitmq.log"))?;
        server
            .wait_for_port(([127, 0, 0, 1], self.port).into(), Duration::from_secs(60))
            .await?;
        self.server = Some(server);
        // The listener opens at the end of boot; a login proves the default user exists.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.connect().await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Stops the node (SIGTERM: a clean shutdown, durable queues and persistent messages kept)
    /// and starts it again on the same port with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch().await
    }

    /// Stops the node (SIGTERM); [`RabbitMq::start_again`] brings it back.
    pub fn stop(&mut self) {
        self.server.take();
    }

    pub async fn start_again(&mut self) -> Result<()> {
        if self.server.is_some() {
            bail!("rabbitmq is running");
        }
        self.launch().await
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &str {
        TEST_USER
    }

    pub fn password(&self) -> &str {
        TEST_PASSWORD
    }

    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Server::pid)
    }

    /// `amqp://user:password@127.0.0.1:port/%2f`.
    pub fn url(&self) -> String {
        format!(
            "amqp://{TEST_USER}:{TEST_PASSWORD}@127.0.0.1:{}/%2f",
            self.port
        )
    }

    pub async fn connect(&self) -> Result<Connection> {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to rabbitmq on port {}", self.port))
    }

    /// A channel in publisher-confirm mode (its connection stays open while the channel is used).
    pub async fn channel(&self) -> Result<(Connection, Channel)> {
        let conn = self.connect().await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok((conn, ch))
    }

    /// Declares a durable classic queue.
    pub async fn declare_queue(&self, queue: &str) -> Result<()> {
        let (_conn, ch) = self.channel().await?;
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring queue {queue}"))?;
        Ok(())
    }

    /// Publishes persistent messages to `queue` (default exchange) and waits for the broker's
    /// confirms of all of them.
    pub async fn publish<B: AsRef<[u8]>>(
        &self,
        queue: &str,
        bodies: impl IntoIterator<Item = B>,
    ) -> Result<usize> {
        let (_conn, ch) = self.channel().await?;
        let props = BasicProperties::default().with_delivery_mode(2);
        publish_on(&ch, "", queue, bodies, &props).await
    }

    /// Ready messages and consumers of `queue` (a passive declare).
    pub async fn queue_depth(&self, queue: &str) -> Result<(u32, u32)> {
        let (_conn, ch) = self.channel().await?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("queue {queue}"))?;
        Ok((q.message_count(), q.consumer_count()))
    }
}

/// Publishes `bodies` with `props` and waits for every confirm; returns how many were confirmed.
pub async fn publish_on<B: AsRef<[u8]>>(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    bodies: impl IntoIterator<Item = B>,
    props: &BasicProperties,
) -> Result<usize> {
    let mut confirms = Vec::new();
    let mut sent = 0;
    for b in bodies {
        let c = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                b.as_ref(),
                props.clone(),
            )
            .await
            .context("basic.publish")?;
        confirms.push(c);
        sent += 1;
        // Bounded memory for large loads: wait for the oldest half now and then.
        if confirms.len() >= 10_000 {
            for c in confirms.drain(..5_000) {
                confirmed(c).await?;
            }
        }
    }
    for c in confirms {
        confirmed(c).await?;
    }
    Ok(sent)
}

async fn confirmed(c: lapin::PublisherConfirm) -> Result<()> {
    if !c.await.context("publisher confirm")?.is_ack() {
        bail!("the broker refused a message (nack)");
    }
    Ok(())
}
