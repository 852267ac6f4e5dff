//! TLS for the replication connection. pgwire-replication's own TLS feature pulls rustls's
//! default crypto provider (aws-lc-rs, a long C build the workspace keeps out), so the client
//! runs without it and connects to a Unix socket in a private directory (mode 0700) of this
//! process; each connection there is carried to the server over TCP after Postgres's
//! `SSLRequest` and a rustls (ring) handshake with the spec's TLS mode: `prefer` falls back to
//! plain text when the server has no TLS, `require` encrypts without verifying, `verify-full`
//! verifies the chain (the Secret's CA, else the system's or Mozilla's roots) and the host name —
//! the same meaning, and the same rustls configuration (`source::tls::config_for`), as the broker
//! sources. Authentication (SCRAM) still runs end to end.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use obsrv_crds::TlsMode;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UnixListener},
};

use crate::error::{Error, Result};

/// A running bridge; dropping it stops accepting and removes its directory.
pub struct TlsBridge {
    dir: tempfile::TempDir,
    port: u16,
    task: tokio::task::JoinHandle<()>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl Drop for TlsBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsBridge {
    /// Listens in a fresh private directory; connections go to `host:port` with `mode`.
    pub fn start(host: &str, port: u16, mode: TlsMode, ca: Option<&[u8]>) -> Result<TlsBridge> {
        let config = Arc::new(crate::source::tls::config_for(mode, ca)?);
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            Error::Config(format!("host {host:?} is not a valid TLS server name: {e}"))
        })?;
        let dir = tempfile::Builder::new()
            .prefix("obsrv-pg-tls-")
            .tempdir()
            .map_err(|e| Error::Config(format!("temporary directory for the TLS bridge: {e}")))?;
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| Error::Config(format!("TLS bridge directory: {e}")))?;
        let path = dir.path().join(format!(".s.PGSQL.{port}"));
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::Config(format!("TLS bridge socket {}: {e}", path.display())))?;
        let last_error = Arc::new(Mutex::new(None));
        let errors = last_error.clone();
        let target = format!("{host}:{port}");
        let task = tokio::spawn(async move {
            while let Ok((mut local, _)) = listener.accept().await {
                let (config, name, target, errors) =
                    (config.clone(), name.clone(), target.clone(), errors.clone());
                tokio::spawn(async move {
                    if let Err(e) = carry(&mut local, &target, mode, config, name).await {
                        tracing::debug!(error = %e, "replication TLS bridge");
                        *errors.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                    // Closed only now, so the client's failure never overtakes the reason.
                    drop(local);
                });
            }
        });
        Ok(TlsBridge {
            dir,
            port,
            task,
            last_error,
        })
    }

    /// The directory to give the client as its host (libpq's Unix-socket convention).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Why the last connection failed on the TCP/TLS side, if it did (the client only sees a
    /// closed socket).
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    #[cfg(test)]
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join(format!(".s.PGSQL.{}", self.port))
    }
}

/// Postgres's `SSLRequest`: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

async fn carry(
    local: &mut tokio::net::UnixStream,
    target: &str,
    mode: TlsMode,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> std::result::Result<(), String> {
    let mut tcp = TcpStream::connect(target)
        .await
        .map_err(|e| format!("{target}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    tcp.write_all(&SSL_REQUEST)
        .await
        .map_err(|e| format!("{target}: {e}"))?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| format!("{target}: {e}"))?;
    match answer[0] {
        b'S' => {
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {target}: {e}"))?;
            let _ = tokio::io::copy_bidirectional(local, &mut tls).await;
        }
        b'N' if mode == TlsMode::Prefer => {
            let _ = tokio::io::copy_bidirectional(local, &mut tcp).await;
        }
        b'N' => return Err(format!("{target} does not offer TLS (tls.mode {mode:?})")),
        other => return Err(format!("{target} answered SSLRequest with {other:#x}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_private_and_a_refused_connection_says_why() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = dead.local_addr().unwrap().port();
        drop(dead);
        let b = TlsBridge::start("127.0.0.1", port, TlsMode::Require, None).unwrap();
        let mode = std::fs::metadata(b.socket_dir()).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o700
        );
        let mut s = tokio::net::UnixStream::connect(b.path()).await.unwrap();
        let mut buf = [0u8; 1];
        // The bridge closes the client's side once the server cannot be reached.
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        let err = b.last_error().expect("the failure is kept");
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    }
}
