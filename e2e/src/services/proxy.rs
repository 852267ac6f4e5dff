//! A TCP proxy on a fixed loopback port that can be cut and restored: an outage of whatever sits
//! behind it (a database, a broker) as its clients see one — connections dropped, then refused —
//! while the server itself keeps its data, and back on the same address.

use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::free_port;

pub struct Proxy {
    port: u16,
    target: String,
    /// The accept loop and every forwarding task; aborted on `cut`.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<a free port> to `target` (`host:port`).
    pub async fn start(target: &str) -> Result<Proxy> {
        Self::start_on(free_port()?, target).await
    }

    /// Forwards 127.0.0.1:`port` to `target` (which need not listen yet).
    pub async fn start_on(port: u16, target: &str) -> Result<Proxy> {
        let p = Proxy {
            port,
            target: target.to_string(),
            tasks: Arc::default(),
        };
        p.restore().await?;
        Ok(p)
    }

    /// `127.0.0.1:<port>`: what clients connect to.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The outage: every open connection is dropped and new ones are refused.
    pub fn cut(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    /// Back on the same port.
    pub async fn restore(&self) -> Result<()> {
        // The port is free again once the aborted listener is dropped; retry briefly.
        let mut attempt = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) if attempt < 50 => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("proxy port {} taken", self.port));
                }
            }
        };
        let (target, tasks) = (self.target.clone(), self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let forward = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(forward);
            }
        });
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(accept);
        Ok(())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}
