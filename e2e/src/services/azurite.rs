//! Azure Blob Storage for tests: a local Azurite (`azurite-blob` from npm, in-memory, no telemetry)
//! with an account and key of its own, or the account at `AZURE_BLOB_ENDPOINT`
//! (`AZURE_STORAGE_ACCOUNT`, `AZURE_STORAGE_KEY`). The test side signs its own requests with an
//! account SAS, so no Azure SDK is needed.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use tempfile::TempDir;

use super::{Server, find_binary, free_port};

/// The account Azurite is started with (its name and base64 key are throwaway test values).
pub const AZURITE_ACCOUNT: &str = "obsrvtest";
pub const AZURITE_KEY: &str = "b2JzcnYtdGVzdC1henVyaXRlLWtleS1ub3QtYS1zZWNyZXQ=";

/// An Azure Blob service: endpoint (including the account, path-style), account and key.
pub struct Azurite {
    endpoint: String,
    account: String,
    key: String,
    server: Option<Server>,
    _dir: Option<TempDir>,
}

impl Azurite {
    pub async fn start() -> Result<Azurite> {
        if let Ok(endpoint) = std::env::var("AZURE_BLOB_ENDPOINT") {
            let var = |k: &str| {
                std::env::var(k)
                    .with_context(|| format!("AZURE_BLOB_ENDPOINT is set, so {k} must be too"))
            };
            return Ok(Azurite {
                endpoint: endpoint.trim_end_matches('/').to_string(),
                account: var("AZURE_STORAGE_ACCOUNT")?,
                key: var("AZURE_STORAGE_KEY")?,
                server: None,
                _dir: None,
            });
        }
        let bin = find_binary("azurite-blob", &["/usr/local/bin"]).context(
            "azurite-blob is missing: run `scripts/setup.sh` (it installs azurite@3 with npm)",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("obsrv-azurite-")
            .tempdir()?;
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            // Required: without them Azurite writes to disk and phones home.
            .args(["--inMemoryPersistence", "--disableTelemetry"])
            // object_store may speak a newer API version than this Azurite knows.
            .args(["--skipApiVersionCheck", "--silent"])
            // In memory, it still writes its debug log and config in the working directory.
            .current_dir(dir.path())
            .env(
                "AZURITE_ACCOUNTS",
                format!("{AZURITE_ACCOUNT}:{AZURITE_KEY}"),
            );
        let mut server = Server::spawn("azurite-blob", cmd, None, dir.path().join("azurite.log"))?;
        server
            .wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(60))
            .await?;
        Ok(Azurite {
            endpoint: format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
            account: AZURITE_ACCOUNT.into(),
            key: AZURITE_KEY.into(),
            server: Some(server),
            _dir: Some(dir),
        })
    }

    /// The blob service URL including the account (`http://127.0.0.1:port/obsrvtest`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
    pub fn account(&self) -> &str {
        &self.account
    }
    /// The account's shared key (base64).
    pub fn key(&self) -> &str {
        &self.key
    }
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Server::pid)
    }

    /// A connection string with the shared key and the endpoint, as the portal shows one.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={};AccountKey={};BlobEndpoint={};",
            self.account, self.key, self.endpoint
        )
    }

    /// An account SAS for the blob service with `permissions` (e.g. `rl`: read and list), valid
    /// for a day.
    pub fn sas_token(&self, permissions: &str) -> Result<String> {
        let expiry = (chrono::Utc::now() + chrono::Duration::days(1))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let version = "2021-06-08";
        // Account SAS, version 2020-12-06 and later (signed encryption scope included).
        let to_sign = format!(
            "{}\n{permissions}\nb\nsco\n\n{expiry}\n\nhttps,http\n{version}\n\n",
            self.account
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(&self.key)
            .context("the account key is not base64")?;
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            to_sign.as_bytes(),
        );
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.as_ref());
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        Ok(format!(
            "sv={version}&ss=b&srt=sco&sp={permissions}&se={}&spr=https,http&sig={}",
            enc(&expiry),
            enc(&sig)
        ))
    }

    async fn put(&self, path_and_query: &str, body: reqwest::Body, blob: bool) -> Result<()> {
        let sas = self.sas_token("rwdlac")?;
        let sep = if path_and_query.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!("{}/{path_and_query}{sep}{sas}", self.endpoint);
        let mut req = reqwest::Client::new()
            .put(&url)
            .header("x-ms-version", "2021-06-08")
            .body(body);
        if blob {
            req = req.header("x-ms-blob-type", "BlockBlob");
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("PUT {path_and_query}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!(
                "PUT {path_and_query}: {status}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Creates a container.
    pub async fn create_container(&self, name: &str) -> Result<()> {
        self.put(
            &format!("{name}?restype=container"),
            Vec::new().into(),
            false,
        )
        .await
    }

    /// Uploads one block blob.
    pub async fn put_blob(
        &self,
        container: &str,
        name: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<()> {
        self.put(&format!("{container}/{name}"), body.into(), true)
            .await
    }
}
