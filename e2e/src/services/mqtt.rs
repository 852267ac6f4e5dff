//! Mosquitto (Debian's `mosquitto`, MQTT 3.1.1 and 5): a throwaway broker on a free loopback port,
//! persistence in a temp dir, user [`TEST_USER`] / [`TEST_PASSWORD`] only.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use rumqttc::v5::{
    AsyncClient, Event, MqttOptions,
    mqttbytes::{
        QoS,
        v5::{Packet, PublishProperties},
    },
};
use tempfile::TempDir;

use super::{Server, TEST_PASSWORD, TEST_USER, find_binary, free_port, run_to_end, unique_name};

pub struct Mosquitto {
    port: u16,
    server: Option<Server>,
    dir: TempDir,
}

impl Mosquitto {
    pub async fn start() -> Result<Self> {
        let passwd = find_binary("mosquitto_passwd", &["/usr/bin"])?;
        let dir = tempfile::Builder::new()
            .prefix("obsrv-mosquitto-")
            .tempdir()?;
        let port = free_port()?;
        let pw = dir.path().join("passwd");
        run_to_end(
            Command::new(passwd)
                .args(["-b", "-c"])
                .arg(&pw)
                .args([TEST_USER, TEST_PASSWORD]),
            "mosquitto_passwd",
        )?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        // Unlimited in-flight and queued messages: the client's receive maximum is the only
        // window, and nothing is dropped while a session is offline. `user root` only keeps a
        // root test run from switching to the `mosquitto` user (which would lose the death signal).
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous false\n\
                 password_file {}\n\
                 persistence true\n\
                 persistence_location {}/\n\
                 max_inflight_messages 5000\n\
                 max_queued_messages 0\n\
                 log_dest stdout\n\
                 user root\n",
                pw.display(),
                data.display()
            ),
        )?;
        let mut m = Mosquitto {
            port,
            server: None,
            dir,
        };
        m.launch().await?;
        Ok(m)
    }

    async fn launch(&mut self) -> Result<()> {
        let bin = find_binary("mosquitto", &["/usr/sbin"])?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(self.dir.path().join("mosquitto.conf"));
        let mut server = Server::spawn(
            "mosquitto",
            cmd,
            None,
            self.dir.path().join("mosquitto.log"),
        )?;
        server
            .wait_for_port(([127, 0, 0, 1], self.port).into(), Duration::from_secs(30))
            .await?;
        self.server = Some(server);
        Ok(())
    }

    /// Stops the broker (SIGTERM: it saves sessions and queued messages) and starts it again on the
    /// same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.start_again().await
    }

    pub fn stop(&mut self) {
        self.server.take();
    }

    pub async fn start_again(&mut self) -> Result<()> {
        if self.server.is_some() {
            bail!("mosquitto is running");
        }
        self.launch().await
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

    /// Publishes `bodies` to `topic` with QoS 1 and waits for every PUBACK; returns how many.
    pub async fn publish<B: AsRef<[u8]>>(
        &self,
        topic: &str,
        bodies: impl IntoIterator<Item = B>,
    ) -> Result<usize> {
        self.publish_with(topic, bodies, None).await
    }

    /// [`Mosquitto::publish`] with MQTT 5 properties on every message.
    pub async fn publish_with<B: AsRef<[u8]>>(
        &self,
        topic: &str,
        bodies: impl IntoIterator<Item = B>,
        properties: Option<PublishProperties>,
    ) -> Result<usize> {
        let mut o = MqttOptions::new(unique_name("obsrv-test-pub"), "127.0.0.1", self.port);
        o.set_credentials(TEST_USER, TEST_PASSWORD)
            .set_max_packet_size(Some(1 << 24));
        let (client, mut eventloop) = AsyncClient::new(o, 1024);
        // The event loop runs beside the publishes: it sends them and counts the PUBACKs.
        let (acked_tx, mut acked) = tokio::sync::watch::channel(0usize);
        let mut driver = tokio::spawn(async move {
            let mut n = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        n += 1;
                        let _ = acked_tx.send(n);
                    }
                    Ok(_) => {}
                    Err(e) => return anyhow!("publisher connection: {e}"),
                }
            }
        });
        let mut sent = 0;
        for b in bodies {
            let payload = Bytes::copy_from_slice(b.as_ref());
            match &properties {
                Some(p) => {
                    client
                        .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, p.clone())
                        .await?
                }
                None => {
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await?
                }
            }
            sent += 1;
        }
        let all_acked = async {
            tokio::time::timeout(Duration::from_secs(120), acked.wait_for(|n| *n >= sent))
                .await
                .is_ok_and(|r| r.is_ok())
        };
        let outcome = tokio::select! {
            done = all_acked => if done { Ok(sent) } else { Err(anyhow!("not every PUBACK of {sent} messages within 120s")) },
            e = &mut driver => Err(e.unwrap_or_else(|j| anyhow!("publisher task: {j}"))),
        };
        let _ = client.disconnect().await;
        driver.abort();
        outcome.with_context(|| format!("publish to {topic}"))
    }
}
