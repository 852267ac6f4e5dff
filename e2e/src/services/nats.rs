//! NATS (Debian's `nats-server`) with JetStream: a throwaway server on a free loopback port, a file
//! store in a temp dir, user [`TEST_USER`] / [`TEST_PASSWORD`]; optionally TLS-only.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_nats::{
    Client, ConnectOptions,
    jetstream::{self, stream},
};
use tempfile::TempDir;

use super::{Server, TEST_PASSWORD, TEST_USER, TestCertificates, find_binary, free_port};

pub struct Nats {
    port: u16,
    /// The CA of a TLS-only server.
    ca_pem: Option<String>,
    server: Option<Server>,
    args: Vec<String>,
    dir: TempDir,
}

impl Nats {
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// A server that accepts TLS connections only, with a certificate for 127.0.0.1 signed by a
    /// throwaway CA; returns it with the CA's PEM.
    pub async fn start_tls() -> Result<(Self, String)> {
        let certs = TestCertificates::generate()?;
        let nats = Self::start_with(Some(&certs)).await?;
        Ok((nats, certs.ca_pem))
    }

    async fn start_with(tls: Option<&TestCertificates>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("obsrv-nats-").tempdir()?;
        let port = free_port()?;
        let mut args: Vec<String> = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.path().join("store").display().to_string(),
            "--user".into(),
            TEST_USER.into(),
            "--pass".into(),
            TEST_PASSWORD.into(),
        ];
        if let Some(certs) = tls {
            let (crt, key) = certs.write_server_files(dir.path(), None)?;
            args.extend([
                "--tls".into(),
                "--tlscert".into(),
                crt.display().to_string(),
                "--tlskey".into(),
                key.display().to_string(),
            ]);
        }
        let mut nats = Nats {
            port,
            ca_pem: tls.map(|c| c.ca_pem.clone()),
            server: None,
            args,
            dir,
        };
        nats.launch().await?;
        Ok(nats)
    }

    async fn launch(&mut self) -> Result<()> {
        let bin = find_binary("nats-server", &["/usr/sbin", "/usr/bin"])?;
        let mut cmd = Command::new(bin);
        cmd.args(&self.args);
        let mut server = Server::spawn("nats-server", cmd, None, self.dir.path().join("nats.log"))?;
        server
            .wait_for_port(([127, 0, 0, 1], self.port).into(), Duration::from_secs(30))
            .await?;
        self.server = Some(server);
        Ok(())
    }

    /// Stops the server (SIGTERM; JetStream keeps its file store) and starts it again on the same
    /// port.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.start_again().await
    }

    pub fn stop(&mut self) {
        self.server.take();
    }

    pub async fn start_again(&mut self) -> Result<()> {
        if self.server.is_some() {
            bail!("nats-server is running");
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

    /// `nats://127.0.0.1:port` (`tls://` for a TLS-only server).
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> Result<Client> {
        let mut o = ConnectOptions::new()
            .user_and_password(TEST_USER.into(), TEST_PASSWORD.into())
            .connection_timeout(Duration::from_secs(5));
        if let Some(ca) = &self.ca_pem {
            let path = self.dir.path().join("client-ca.pem");
            std::fs::write(&path, ca)?;
            o = o.require_tls(true).add_root_certificates(path);
        }
        o.connect(self.url())
            .await
            .with_context(|| format!("connecting to nats on port {}", self.port))
    }

    /// Creates a file-backed stream holding `subjects`.
    pub async fn create_stream(&self, name: &str, subjects: &[&str]) -> Result<()> {
        let js = jetstream::new(self.client().await?);
        js.create_stream(stream::Config {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            storage: stream::StorageType::File,
            ..stream::Config::default()
        })
        .await
        .with_context(|| format!("creating stream {name}"))?;
        Ok(())
    }

    /// Publishes to JetStream and waits for every acknowledgement; returns how many.
    pub async fn publish<B: AsRef<[u8]>>(
        &self,
        subject: &str,
        bodies: impl IntoIterator<Item = B>,
    ) -> Result<usize> {
        let js = jetstream::new(self.client().await?);
        let mut acks = Vec::new();
        let mut sent = 0;
        for b in bodies {
            let ack = js
                .publish(subject.to_string(), b.as_ref().to_vec().into())
                .await
                .with_context(|| format!("publish to {subject}"))?;
            acks.push(ack);
            sent += 1;
            if acks.len() >= 5_000 {
                for a in acks.drain(..) {
                    a.await.context("JetStream publish ack")?;
                }
            }
        }
        for a in acks {
            a.await.context("JetStream publish ack")?;
        }
        Ok(sent)
    }

    /// Messages of `stream` not yet delivered to `consumer`, and delivered but not acknowledged.
    pub async fn consumer_pending(&self, stream: &str, consumer: &str) -> Result<(u64, usize)> {
        let js = jetstream::new(self.client().await?);
        let info = js
            .get_stream(stream)
            .await?
            .consumer_info(consumer)
            .await
            .with_context(|| format!("consumer {consumer} of {stream}"))?;
        Ok((info.num_pending, info.num_ack_pending))
    }
}
