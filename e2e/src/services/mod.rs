//! Real services on demand for tests: Postgres, MariaDB, a Kafka-protocol broker and an S3 API here;
//! RabbitMQ, NATS (JetStream) and Mosquitto (MQTT) in their own modules.
//!
//! Each `start()` brings up a throwaway, isolated instance on free loopback ports (fresh data
//! directory in a temp dir) and tears it down when the handle is dropped: the process is stopped and
//! the directory removed. Processes are also tied to the test process with `PR_SET_PDEATHSIG`, so a
//! test killed mid-way leaves nothing running.
//!
//! Start several at once with `tokio::try_join!(Postgres::start(), Broker::start())`.
//!
//! Set `POSTGRES_URL`, `MYSQL_URL`, `KAFKA_BOOTSTRAP` or `S3_ENDPOINT` (with `S3_ACCESS_KEY_ID`,
//! `S3_SECRET_ACCESS_KEY`, `S3_REGION`) to run the same tests against external services (real Apache
//! Kafka, MySQL 8, MinIO...). Isolation then comes from a fresh database / unique topic and bucket
//! names per test.
//!
//! A missing binary is an error naming the command that installs it — never a skip.

pub mod azurite;
pub mod gcs;
pub mod proxy;

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod mqtt;
pub mod nats;
pub mod rabbitmq;

use anyhow::{Context as _, Result, anyhow, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tempfile::TempDir;

/// The command that installs every service binary the tests need.
pub const SETUP_HINT: &str = "run `scripts/setup.sh` (it installs PostgreSQL, MariaDB, RabbitMQ, \
     nats-server and Mosquitto from apt, nisshi@0.6.0 and s3s-fs@0.14.1 with cargo install, and the \
     chart-check venv)";

/// A name unique within this machine's running tests: `<prefix>_<pid>_<n>`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `port` on 127.0.0.1, when nothing listens there yet.
pub fn port_is_free(port: u16, what: &str) -> Result<u16> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(|_| port)
        .with_context(|| {
            format!("cannot start {what} on 127.0.0.1:{port}: the port is in use (pick another)")
        })
}

/// A free TCP port on 127.0.0.1 (the OS picks it; the listener is closed before returning).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Finds `name` on PATH, in `~/.cargo/bin` or in `extra_dirs`; the error says how to install it.
pub fn find_binary(name: &str, extra_dirs: &[&str]) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&cargo_home).join("bin"));
    }
    dirs.extend(extra_dirs.iter().map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("`{name}` was not found on PATH or in ~/.cargo/bin: {SETUP_HINT}"))
}

/// A marketplace program (`source-faker`, `tap-postgres`, `source-s3`) from the project's venvs.
pub fn marketplace_program(name: &str) -> Result<PathBuf> {
    // Airbyte's S3 source needs a newer airbyte-cdk than source-faker: a venv of its own.
    let venvs = [".venv-marketplace", ".venv-airbyte-s3"];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let paths: Vec<PathBuf> = venvs
        .iter()
        .map(|v| root.join(v).join("bin").join(name))
        .collect();
    if let Some(p) = paths.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    Err(anyhow!(
        "{} is missing: run `scripts/setup.sh` (it installs the marketplace programs into {})",
        name,
        venvs.join(" and ")
    ))
}

/// Postgres' binaries live in a versioned directory on Debian.
fn postgres_bin_dirs() -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| format!("{}/bin", e.path().display()))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse(); // newest major first
    dirs
}

/// uid/gid of a system user, for servers that refuse to run as root.
fn system_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs the command as `user` when we are root (Postgres and MariaDB refuse root), and ties the
/// child's life to ours: if the test process dies, the kernel sends the child SIGKILL.
fn prepare(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    // SAFETY: prctl is async-signal-safe; it runs in the forked child after the uid change
    // (which would otherwise clear the death signal) and before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn chown(path: &Path, user: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// Runs a set-up command to completion; on failure the error has the command and its output.
fn run_to_end(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {cmd:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A server process that is stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Server {
    fn spawn(
        name: &'static str,
        mut cmd: Command,
        user: Option<(u32, u32)>,
        log: PathBuf,
    ) -> Result<Self> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        prepare(&mut cmd, user);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Server { name, child, log })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until `addr` accepts TCP connections; fails early if the process exits.
    async fn wait_for_port(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {addr}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addr} within {timeout:?}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: pid is our own child, not yet reaped, so it cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connection details of a SQL database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlEndpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
}

impl SqlEndpoint {
    /// `scheme://user:password@host:port/database` (the port is required).
    pub fn parse(url: &str) -> Result<Self> {
        let u = url::Url::parse(url).with_context(|| format!("parsing database URL {url:?}"))?;
        Ok(SqlEndpoint {
            host: u.host_str().unwrap_or("127.0.0.1").to_string(),
            port: u
                .port()
                .ok_or_else(|| anyhow!("database URL {url:?} needs an explicit port"))?,
            user: u.username().to_string(),
            password: u.password().unwrap_or_default().to_string(),
            database: u.path().trim_start_matches('/').to_string(),
        })
    }

    /// `scheme://user:password@host:port/database`.
    pub fn url(&self, scheme: &str) -> String {
        format!(
            "{scheme}://{}:{}@{}:{}/{}",
            self.user, self.password, self.host, self.port, self.database
        )
    }
}

/// Connection details and the server's pid, the same for every SQL service.
macro_rules! sql_accessors {
    ($ty:ty, $scheme:literal) => {
        impl $ty {
            pub fn host(&self) -> &str {
                &self.endpoint.host
            }
            pub fn port(&self) -> u16 {
                self.endpoint.port
            }
            pub fn user(&self) -> &str {
                &self.endpoint.user
            }
            pub fn password(&self) -> &str {
                &self.endpoint.password
            }
            pub fn database(&self) -> &str {
                &self.endpoint.database
            }
            #[doc = concat!("`", $scheme, "://user:password@host:port/database`.")]
            pub fn url(&self) -> String {
                self.endpoint.url($scheme)
            }
            /// Process id of the local server (None for an external one), e.g. to stop it in a test.
            pub fn pid(&self) -> Option<u32> {
                self.server.as_ref().map(Server::pid)
            }
        }
    };
}

sql_accessors!(Postgres, "postgres");
sql_accessors!(MariaDb, "mysql");

/// A Postgres database: a fresh local server (`wal_level=logical`, `fsync=off`) or a fresh database
/// on the server at `POSTGRES_URL`.
pub struct Postgres {
    endpoint: SqlEndpoint,
    /// Set for an external server: the database to drop at the end, and the admin endpoint.
    external: Option<SqlEndpoint>,
    server: Option<Server>,
    psql: PathBuf,
    _dir: Option<TempDir>,
}

pub const TEST_USER: &str = "obsrv";
pub const TEST_PASSWORD: &str = "obsrv-test-password";

/// A throwaway certificate authority and the server certificate it signed (for 127.0.0.1 and
/// localhost), PEM.
pub struct TestCertificates {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl TestCertificates {
    pub fn generate() -> Result<TestCertificates> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "obsrv test CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let cert = server.signed_by(&key, &ca_cert, &ca_key)?;
        Ok(TestCertificates {
            ca_pem: ca_cert.pem(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        })
    }

    /// Writes the server's certificate and key into `dir` for a server running as `user`; the key
    /// readable by its owner only (Postgres refuses it otherwise). Returns their paths.
    fn write_server_files(
        &self,
        dir: &Path,
        user: Option<(u32, u32)>,
    ) -> Result<(PathBuf, PathBuf)> {
        let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&crt, &self.server_cert_pem)?;
        std::fs::write(&key, &self.server_key_pem)?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        chown(&crt, user)?;
        chown(&key, user)?;
        Ok((crt, key))
    }
}

impl Postgres {
    pub async fn start() -> Result<Self> {
        Self::start_with(None, None).await
    }

    /// A local server on 127.0.0.1:`port` (fails, naming the port, when something listens there).
    pub async fn start_on(port: u16) -> Result<Self> {
        Self::start_with(None, Some(port)).await
    }

    /// A local server that accepts TCP connections over TLS only (`hostssl` in pg_hba.conf), with
    /// a certificate for 127.0.0.1 signed by a throwaway CA; returns it with the CA's PEM. Always
    /// local, even with `POSTGRES_URL` set: the test needs to own the server's TLS set-up.
    pub async fn start_tls() -> Result<(Self, String)> {
        let certs = TestCertificates::generate()?;
        let pg = Self::start_with(Some(&certs), None).await?;
        Ok((pg, certs.ca_pem))
    }

    async fn start_with(tls: Option<&TestCertificates>, port: Option<u16>) -> Result<Self> {
        let dirs = postgres_bin_dirs();
        let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
        let psql = find_binary("psql", &dirs)?;
        let external = std::env::var("POSTGRES_URL").ok();
        if let Some(url) = external.filter(|_| tls.is_none() && port.is_none()) {
            let admin = SqlEndpoint::parse(&url)?;
            let endpoint = SqlEndpoint {
                database: unique_name("obsrv_test"),
                ..admin.clone()
            };
            let pg = Postgres {
                endpoint,
                external: Some(admin.clone()),
                server: None,
                psql,
                _dir: None,
            };
            pg.psql_as(&admin, &format!("CREATE DATABASE {}", pg.endpoint.database))
                .await?;
            return Ok(pg);
        }
        let initdb = find_binary("initdb", &dirs)?;
        let postgres = find_binary("postgres", &dirs)?;
        let user = if is_root() {
            system_user("postgres")
        } else {
            None
        };
        if is_root() && user.is_none() {
            bail!("Postgres refuses to run as root and there is no `postgres` user: {SETUP_HINT}");
        }
        let dir = tempfile::Builder::new().prefix("obsrv-pg-").tempdir()?;
        chown(dir.path(), user)?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::File::create(&pwfile)?.write_all(TEST_PASSWORD.as_bytes())?;
        chown(&pwfile, user)?;
        let mut init = Command::new(&initdb);
        init.args([
            "-U",
            TEST_USER,
            "-E",
            "UTF8",
            "--no-sync",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .arg("-D")
        .arg(&data);
        prepare(&mut init, user);
        run_to_end(&mut init, "initdb")?;

        let port = match port {
            Some(p) => port_is_free(p, "Postgres")?,
            None => free_port()?,
        };
        let mut cmd = Command::new(&postgres);
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                &format!("port={port}"),
            ])
            .args([
                "-c",
                &format!("unix_socket_directories={}", dir.path().display()),
            ])
            .args([
                "-c",
                "wal_level=logical",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
            ])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            // Change data capture: a slot and a WAL sender per connector under test.
            .args(["-c", "max_replication_slots=20", "-c", "max_wal_senders=20"]);
        if let Some(certs) = tls {
            let (crt, key) = certs.write_server_files(dir.path(), user)?;
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n\
                 hostssl replication all 127.0.0.1/32 scram-sha-256\n",
            )?;
            cmd.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", crt.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", key.display()));
        }
        let mut server = Server::spawn("postgres", cmd, user, dir.path().join("postgres.log"))?;
        server
            .wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(30))
            .await?;
        let endpoint = SqlEndpoint {
            host: "127.0.0.1".into(),
            port,
            user: TEST_USER.into(),
            password: TEST_PASSWORD.into(),
            database: "postgres".into(),
        };
        let mut pg = Postgres {
            endpoint,
            external: None,
            server: Some(server),
            psql,
            _dir: Some(dir),
        };
        // The server accepts TCP a moment before it accepts queries.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match pg.psql("SELECT 1").await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        pg.psql(&format!("CREATE DATABASE {TEST_USER}")).await?;
        pg.endpoint.database = TEST_USER.into();
        Ok(pg)
    }

    /// Runs SQL (one or more statements) with `psql` and returns its unaligned, tuples-only output.
    pub async fn psql(&self, sql: &str) -> Result<String> {
        self.psql_as(&self.endpoint, sql).await
    }

    async fn psql_as(&self, e: &SqlEndpoint, sql: &str) -> Result<String> {
        let out = tokio::process::Command::new(&self.psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                &e.host,
                "-p",
                &e.port.to_string(),
                "-U",
                &e.user,
                "-d",
                &e.database,
            ])
            .args(["-c", sql])
            .env("PGPASSWORD", &e.password)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .await
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql failed: {}\nSQL: {sql}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(admin) = &self.external {
            let _ = Command::new(&self.psql)
                .args([
                    "-X",
                    "-q",
                    "-h",
                    &admin.host,
                    "-p",
                    &admin.port.to_string(),
                    "-U",
                    &admin.user,
                ])
                .args(["-d", &admin.database, "-c"])
                .arg(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.endpoint.database
                ))
                .env("PGPASSWORD", &admin.password)
                .stdin(Stdio::null())
                .output();
        }
        // `server` then `_dir` drop in field order: stop first, then remove the data directory.
        self.server.take();
    }
}

/// A MySQL-protocol database: a fresh local MariaDB (binary log in ROW format) or a fresh database
/// on the server at `MYSQL_URL`.
pub struct MariaDb {
    endpoint: SqlEndpoint,
    external: Option<SqlEndpoint>,
    server: Option<Server>,
    client: PathBuf,
    /// The server requires TLS: the client connects with `--ssl`.
    tls: bool,
    _dir: Option<TempDir>,
}

impl MariaDb {
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// A local server that requires TLS (`require_secure_transport`), with a certificate for
    /// 127.0.0.1 signed by a throwaway CA; returns it with the CA's PEM. Always local, even with
    /// `MYSQL_URL` set: the test needs to own the server's TLS set-up.
    pub async fn start_tls() -> Result<(Self, String)> {
        let certs = TestCertificates::generate()?;
        let db = Self::start_with(Some(&certs)).await?;
        Ok((db, certs.ca_pem))
    }

    async fn start_with(tls: Option<&TestCertificates>) -> Result<Self> {
        let client = find_binary("mariadb", &[]).or_else(|_| find_binary("mysql", &[]))?;
        if let Some(url) = std::env::var("MYSQL_URL").ok().filter(|_| tls.is_none()) {
            let admin = SqlEndpoint::parse(&url)?;
            let endpoint = SqlEndpoint {
                database: unique_name("obsrv_test"),
                ..admin.clone()
            };
            let db = MariaDb {
                endpoint,
                external: Some(admin.clone()),
                server: None,
                client,
                tls: false,
                _dir: None,
            };
            db.sql_as(&admin, &format!("CREATE DATABASE {}", db.endpoint.database))
                .await?;
            return Ok(db);
        }
        let install_db = find_binary("mariadb-install-db", &["/usr/bin", "/usr/sbin"])?;
        let mariadbd = find_binary("mariadbd", &["/usr/sbin"])?;
        let user = if is_root() {
            system_user("mysql")
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("obsrv-mariadb-")
            .tempdir()?;
        chown(dir.path(), user)?;
        let data = dir.path().join("data");
        // Its own tmpdir, for the bootstrap and the server: both spill temporary tables there,
        // and a shared /tmp that another process cleans up fails them ("Error on delete of
        // '/tmp/#sql-...'"; at bootstrap, "Could not remove temporary table" and an abort).
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp)?;
        chown(&tmp, user)?;
        let mut install = Command::new(&install_db);
        install
            .args([
                "--no-defaults",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .arg(format!("--datadir={}", data.display()))
            // Passed on to the bootstrapping server.
            .arg(format!("--tmpdir={}", tmp.display()));
        prepare(&mut install, user);
        run_to_end(&mut install, "mariadb-install-db")?;

        let port = free_port()?;
        let socket = dir.path().join("mysqld.sock");
        let mut cmd = Command::new(&mariadbd);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("mysqld.pid").display()
            ))
            .arg(format!("--port={port}"))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--log-bin=binlog",
            ])
            .args([
                "--binlog-format=ROW",
                "--server-id=1",
                "--innodb-flush-log-at-trx-commit=0",
            ])
            .args(["--innodb-buffer-pool-size=64M", "--skip-log-error"]);
        if let Some(certs) = tls {
            let (crt, key) = certs.write_server_files(dir.path(), user)?;
            cmd.arg(format!("--ssl-cert={}", crt.display()))
                .arg(format!("--ssl-key={}", key.display()))
                .arg("--require-secure-transport=ON");
        }
        let mut server = Server::spawn("mariadbd", cmd, user, dir.path().join("mariadbd.log"))?;
        server
            .wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(60))
            .await?;
        // root@localhost (empty password) is only reachable through the socket.
        run_to_end(
            Command::new(&client)
                .args(["--no-defaults", "--protocol=SOCKET", "-u", "root"])
                .arg(format!("--socket={}", socket.display()))
                .arg("-e")
                .arg(format!(
                    "CREATE DATABASE {TEST_USER}; CREATE USER '{TEST_USER}'@'%' IDENTIFIED BY '{TEST_PASSWORD}'; \
                     GRANT ALL ON *.* TO '{TEST_USER}'@'%' WITH GRANT OPTION; FLUSH PRIVILEGES;"
                )),
            "creating the MariaDB test user",
        )?;
        let endpoint = SqlEndpoint {
            host: "127.0.0.1".into(),
            port,
            user: TEST_USER.into(),
            password: TEST_PASSWORD.into(),
            database: TEST_USER.into(),
        };
        Ok(MariaDb {
            endpoint,
            external: None,
            server: Some(server),
            client,
            tls: tls.is_some(),
            _dir: Some(dir),
        })
    }

    /// Runs SQL with the `mariadb` client (batch mode, no column names) and returns its output.
    pub async fn sql(&self, sql: &str) -> Result<String> {
        self.sql_as(&self.endpoint, sql).await
    }

    async fn sql_as(&self, e: &SqlEndpoint, sql: &str) -> Result<String> {
        let out = tokio::process::Command::new(&self.client)
            .args([
                "--no-defaults",
                "--protocol=TCP",
                "-B",
                "-N",
                "--connect-timeout=5",
            ])
            .args([
                "-h",
                &e.host,
                "-P",
                &e.port.to_string(),
                "-u",
                &e.user,
                &e.database,
            ])
            .args(self.tls.then_some("--ssl"))
            .args(["-e", sql])
            .env("MYSQL_PWD", &e.password)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running the mariadb client")?;
        if !out.status.success() {
            bail!(
                "mariadb client failed: {}\nSQL: {sql}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(admin) = &self.external {
            let _ = Command::new(&self.client)
                .args([
                    "--no-defaults",
                    "--protocol=TCP",
                    "-h",
                    &admin.host,
                    "-P",
                    &admin.port.to_string(),
                ])
                .args(["-u", &admin.user, "-e"])
                .arg(format!(
                    "DROP DATABASE IF EXISTS {}",
                    self.endpoint.database
                ))
                .env("MYSQL_PWD", &admin.password)
                .stdin(Stdio::null())
                .output();
        }
        self.server.take();
    }
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct ConsumedRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub partition: i32,
    pub offset: i64,
}

impl ConsumedRecord {
    /// The value parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(self.value.as_deref().unwrap_or_default())
            .context("record value is not JSON")
    }

    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// A Kafka-protocol broker: a local `nisshi` (memory storage) or the cluster at `KAFKA_BOOTSTRAP`.
pub struct Broker {
    bootstrap: String,
    server: Option<Server>,
    _dir: Option<TempDir>,
}

impl Broker {
    pub async fn start() -> Result<Self> {
        if let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP") {
            return Ok(Broker {
                bootstrap,
                server: None,
                _dir: None,
            });
        }
        Self::start_on(free_port()?).await
    }

    /// A local nisshi on 127.0.0.1:`port` (fails, naming the port, when something listens there).
    pub async fn start_on(port: u16) -> Result<Self> {
        Self::start_advertising(port, &format!("127.0.0.1:{port}")).await
    }

    /// A local nisshi on 127.0.0.1:`port` that tells clients to reach it at `advertised` (a
    /// [`proxy::Proxy`] in front of it, to cut the broker off and bring it back with its data).
    pub async fn start_advertising(port: u16, advertised: &str) -> Result<Self> {
        let port = port_is_free(port, "the broker")?;
        let nisshi = find_binary("nisshi", &[])?;
        let dir = tempfile::Builder::new().prefix("obsrv-broker-").tempdir()?;
        let listener = format!("tcp://127.0.0.1:{port}");
        let advertised_url = format!("tcp://{advertised}");
        let mut cmd = Command::new(nisshi);
        // Run in an empty directory: nisshi reads a `.env` from its working directory.
        cmd.current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &advertised_url,
            ])
            .args(["--storage-engine", "memory://nisshi/"])
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", "warn");
        let mut server = Server::spawn("nisshi", cmd, None, dir.path().join("nisshi.log"))?;
        server
            .wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(30))
            .await?;
        let broker = Broker {
            bootstrap: advertised.to_string(),
            server: Some(server),
            _dir: Some(dir),
        };
        broker.wait_ready().await?;
        Ok(broker)
    }

    /// Waits until the broker answers metadata requests.
    async fn wait_ready(&self) -> Result<()> {
        let admin = self.admin()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match admin.inner().fetch_metadata(None, Duration::from_secs(2)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("broker at {} is not answering: {e}", self.bootstrap)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `host:port` list for `bootstrap.servers`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Server::pid)
    }

    /// Client config with this broker's bootstrap servers.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
        self.client_config()
            .create()
            .context("creating a Kafka admin client")
    }

    /// Creates a topic (no error if it exists already).
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let admin = self.admin()?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let results = admin
            .create_topics(
                [&topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .with_context(|| format!("creating topic {name}"))?;
        for r in results {
            match r {
                Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => bail!("creating topic {t}: {code}"),
            }
        }
        Ok(())
    }

    /// Produces one record and waits for its acknowledgement. One record per request
    /// (`batch.num.messages=1`), so the broker's end offsets stay exact.
    pub async fn produce(&self, topic: &str, key: Option<&str>, value: &str) -> Result<()> {
        let producer: FutureProducer = self
            .client_config()
            .set("batch.num.messages", "1")
            .set("linger.ms", "0")
            .create()
            .context("creating a Kafka producer")?;
        let mut record = FutureRecord::<str, str>::to(topic).payload(value);
        if let Some(k) = key {
            record = record.key(k);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow!("producing to {topic}: {e}"))?;
        Ok(())
    }

    /// Reads `topic` from the beginning of every partition until `expected` records arrived or
    /// `timeout` passed, and returns what it read (compare the length with what you expect).
    pub async fn consume_all(
        &self,
        topic: &str,
        expected: usize,
        timeout: Duration,
    ) -> Result<Vec<ConsumedRecord>> {
        let topic = topic.to_string();
        let config = self.client_config();
        tokio::task::spawn_blocking(move || consume_blocking(config, &topic, expected, timeout))
            .await?
    }

    /// Reads `topic` from the beginning up to the end it has now (every partition read to its
    /// end), however slowly the broker serves it; fails after `timeout`. For tests that
    /// poll a topic until it holds what they expect.
    pub async fn consume_to_end(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Vec<ConsumedRecord>> {
        let topic = topic.to_string();
        let config = self.client_config();
        tokio::task::spawn_blocking(move || consume_to_end_blocking(config, &topic, timeout))
            .await?
    }

    /// Partitions of a topic, from the broker's metadata.
    pub fn partition_count(&self, topic: &str) -> Result<usize> {
        let consumer: BaseConsumer = self.client_config().create()?;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        Ok(md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0))
    }
}

fn consume_blocking(
    config: ClientConfig,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<ConsumedRecord>> {
    let deadline = Instant::now() + timeout;
    let Some((consumer, _)) = reader_from_beginning(config, topic, deadline)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(ConsumedRecord::of(&m)),
            Some(Err(e)) => tracing::debug!("consume error (retrying): {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// Every record of `topic`, from the beginning until every partition reports its end (librdkafka's
/// partition EOF: a fetch found nothing past the partition's high watermark), however slowly the
/// broker serves it. Fails after `timeout`.
fn consume_to_end_blocking(
    mut config: ClientConfig,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<ConsumedRecord>> {
    let deadline = Instant::now() + timeout;
    config.set("enable.partition.eof", "true");
    let Some((consumer, partitions)) = reader_from_beginning(config, topic, deadline)? else {
        return Ok(Vec::new());
    };
    let mut at_end = vec![false; partitions];
    let mut out = Vec::new();
    while at_end.iter().any(|e| !e) {
        if Instant::now() > deadline {
            bail!(
                "read {} records of {topic} in {timeout:?}, not yet to its end",
                out.len()
            );
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let r = ConsumedRecord::of(&m);
                if let Some(e) = at_end.get_mut(r.partition as usize) {
                    *e = false;
                }
                out.push(r);
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                if let Some(e) = at_end.get_mut(p as usize) {
                    *e = true;
                }
            }
            Some(Err(e)) => tracing::debug!("consume error (retrying): {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// A consumer of every partition of `topic` from the beginning, and the partition count; `None`
/// when the topic has no partitions by `deadline`.
fn reader_from_beginning(
    mut config: ClientConfig,
    topic: &str,
    deadline: Instant,
) -> Result<Option<(BaseConsumer, usize)>> {
    if config.get("enable.partition.eof").is_none() {
        config.set("enable.partition.eof", "false");
    }
    let consumer: BaseConsumer = config
        .set("group.id", unique_name("obsrv-test-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .context("creating a Kafka consumer")?;
    let partitions = loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let n = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if n > 0 {
            break n;
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(Some((consumer, partitions)))
}

impl ConsumedRecord {
    fn of(m: &rdkafka::message::BorrowedMessage<'_>) -> ConsumedRecord {
        ConsumedRecord {
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default(),
            partition: m.partition(),
            offset: m.offset(),
        }
    }
}

/// An S3 API: a local `s3s-fs` (temp dir, fixed keys, signatures verified) or `S3_ENDPOINT`.
pub struct S3 {
    endpoint: String,
    access_key: String,
    secret_key: String,
    region: String,
    server: Option<Server>,
    _dir: Option<TempDir>,
}

pub const S3_ACCESS_KEY: &str = "obsrv-test-access-key";
pub const S3_SECRET_KEY: &str = "obsrv-test-secret-key";

impl S3 {
    pub async fn start() -> Result<Self> {
        if let Ok(endpoint) = std::env::var("S3_ENDPOINT") {
            let var = |k: &str| {
                std::env::var(k).with_context(|| format!("S3_ENDPOINT is set, so {k} must be too"))
            };
            return Ok(S3 {
                endpoint,
                access_key: var("S3_ACCESS_KEY_ID")?,
                secret_key: var("S3_SECRET_ACCESS_KEY")?,
                region: std::env::var("S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
                server: None,
                _dir: None,
            });
        }
        let bin = find_binary("s3s-fs", &[])?;
        let dir = tempfile::Builder::new().prefix("obsrv-s3-").tempdir()?;
        let root = dir.path().join("root");
        std::fs::create_dir(&root)?;
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(&root)
            .env("RUST_LOG", "warn");
        let mut server = Server::spawn("s3s-fs", cmd, None, dir.path().join("s3s-fs.log"))?;
        server
            .wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(30))
            .await?;
        Ok(S3 {
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key: S3_ACCESS_KEY.into(),
            secret_key: S3_SECRET_KEY.into(),
            region: "us-east-1".into(),
            server: Some(server),
            _dir: Some(dir),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
    pub fn access_key(&self) -> &str {
        &self.access_key
    }
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }
    pub fn region(&self) -> &str {
        &self.region
    }
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Server::pid)
    }

    fn bucket(&self, name: &str) -> Result<rusty_s3::Bucket> {
        let url = self.endpoint.parse().context("parsing the S3 endpoint")?;
        rusty_s3::Bucket::new(
            url,
            rusty_s3::UrlStyle::Path,
            name.to_string(),
            self.region.clone(),
        )
        .context("building an S3 bucket URL")
    }

    fn credentials(&self) -> rusty_s3::Credentials {
        rusty_s3::Credentials::new(self.access_key.clone(), self.secret_key.clone())
    }

    /// Creates a bucket (signed request, so wrong keys fail).
    pub async fn create_bucket(&self, name: &str) -> Result<()> {
        use rusty_s3::S3Action as _;
        let bucket = self.bucket(name)?;
        let url = bucket
            .create_bucket(&self.credentials())
            .sign(Duration::from_secs(300));
        let resp = reqwest::Client::new()
            .put(url)
            .send()
            .await
            .context("CreateBucket")?;
        let status = resp.status();
        if !status.is_success() {
            bail!(
                "CreateBucket {name}: {status}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Uploads one object.
    pub async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<()> {
        use rusty_s3::S3Action as _;
        let b = self.bucket(bucket)?;
        let creds = self.credentials();
        let url = b
            .put_object(Some(&creds), key)
            .sign(Duration::from_secs(300));
        let resp = reqwest::Client::new()
            .put(url)
            .body(body)
            .send()
            .await
            .context("PutObject")?;
        let status = resp.status();
        if !status.is_success() {
            bail!(
                "PutObject {bucket}/{key}: {status}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }
}
