//! Loading what a connector runs: the operator's rendered [`RuntimeConfig`] or, for local runs, a
//! `Connector` manifest; resolving the sink over the operator's defaults; reading Secret values from
//! env vars or a `--secrets-dir`.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use obsrv_crds::{
    Compression, Delivery, KafkaSinkSpec, Sasl, SaslMechanism, Tls, TlsMode,
    runtime::{RuntimeConfig, SecretEnv, secret_env},
};

use crate::manifest::FileSecrets;

use crate::error::{Error, Result};

/// Parses a config file: a Connector manifest (with or without its Secrets) or the operator's
/// rendered `RuntimeConfig`. See [`crate::manifest`].
pub fn parse_config(text: &str) -> Result<RuntimeConfig> {
    crate::manifest::parse(text, None).map(|m| m.config)
}

/// Parses a Go-style duration (`30s`, `1m30s`, `500ms`, `1.5h`) the way the operator validates it.
pub fn parse_duration(s: &str) -> Result<Duration> {
    obsrv_crds::duration::parse_duration(s).map_err(|e| Error::Config(e.to_string()))
}

/// The operator's sink defaults, as flags/env of the runtime (same names and defaults as the
/// operator's `--sink-*` flags) so a bare Connector manifest runs locally.
pub fn default_sink(
    bootstrap: Option<String>,
    topic: String,
    failed: String,
    state: String,
    max: i32,
    compression: Compression,
) -> KafkaSinkSpec {
    KafkaSinkSpec {
        bootstrap_servers: bootstrap,
        topic: Some(topic),
        failed_topic: Some(failed),
        state_topic: Some(state),
        max_message_bytes: Some(max),
        compression: Some(compression),
        ..KafkaSinkSpec::default()
    }
}

/// The sink with every field decided.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkSettings {
    pub bootstrap_servers: String,
    pub topic: String,
    pub failed_topic: String,
    pub state_topic: String,
    pub max_message_bytes: usize,
    pub compression: Compression,
    pub linger_ms: i32,
    pub batch_bytes: Option<i32>,
    pub tls: Option<Tls>,
    pub sasl: Option<Sasl>,
    pub delivery: Delivery,
}

impl SinkSettings {
    /// The Connector's sink over `defaults`; fails when no bootstrap server is known.
    pub fn resolve(
        spec: &obsrv_crds::ConnectorSpec,
        defaults: &KafkaSinkSpec,
    ) -> Result<SinkSettings> {
        let own = spec
            .sink
            .as_ref()
            .and_then(|s| s.kafka.clone())
            .unwrap_or_default();
        let k = own.merged_over(defaults);
        let bootstrap_servers = k.bootstrap_servers.filter(|b| !b.is_empty()).ok_or_else(|| {
            Error::Config("no sink bootstrap servers: set spec.sink.kafka.bootstrapServers or --sink-bootstrap-servers".into())
        })?;
        let max = k.max_message_bytes.unwrap_or(1_048_576);
        if max < 1024 {
            return Err(Error::Config(
                "maxMessageBytes must be at least 1024".into(),
            ));
        }
        Ok(SinkSettings {
            bootstrap_servers,
            topic: k.topic.unwrap_or_else(|| "ingest".into()),
            failed_topic: k.failed_topic.unwrap_or_else(|| "connectors.failed".into()),
            state_topic: k.state_topic.unwrap_or_else(|| "connectors.state".into()),
            max_message_bytes: max as usize,
            compression: k.compression.unwrap_or_default(),
            linger_ms: k.linger_ms.unwrap_or(20),
            batch_bytes: k.batch_bytes,
            tls: k.tls,
            sasl: k.sasl,
            delivery: spec.delivery,
        })
    }
}

/// librdkafka security settings for a TLS/SASL section. `ca` is the PEM bundle, `creds` the
/// SASL username and password (already read from their Secret).
pub fn kafka_security(
    tls: Option<&Tls>,
    sasl: Option<&Sasl>,
    ca: Option<&str>,
    creds: Option<(&str, &str)>,
) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    let tls_on = tls.is_some_and(|t| t.mode != TlsMode::Disable);
    let protocol = match (tls_on, sasl.is_some()) {
        (false, false) => "plaintext",
        (true, false) => "ssl",
        (false, true) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    out.insert("security.protocol", protocol.to_string());
    if let Some(t) = tls.filter(|_| tls_on) {
        let verify = t.mode == TlsMode::VerifyFull;
        out.insert("enable.ssl.certificate.verification", verify.to_string());
        out.insert(
            "ssl.endpoint.identification.algorithm",
            if verify { "https" } else { "none" }.to_string(),
        );
        if let Some(ca) = ca {
            out.insert("ssl.ca.pem", ca.to_string());
        }
    }
    if let Some(s) = sasl {
        let mech = match s.mechanism {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        };
        out.insert("sasl.mechanism", mech.to_string());
        if let Some((u, p)) = creds {
            out.insert("sasl.username", u.to_string());
            out.insert("sasl.password", p.to_string());
        }
    }
    out
}

/// Secret values by env var name, read at start; the Secrets of the config file and the directory
/// of Secret files (`<dir>/<secretName>/<key>`: in a pod, the Secrets the operator mounts), for
/// Secrets read by name (custom sources). Files read are remembered, so a rotation is noticed
/// ([`Secrets::rotated`]).
#[derive(Clone, Default)]
pub struct Secrets {
    values: BTreeMap<&'static str, String>,
    in_file: FileSecrets,
    dir: Option<PathBuf>,
    read: std::sync::Arc<std::sync::Mutex<BTreeMap<PathBuf, String>>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: a value must never reach a log line.
        f.debug_list().entries(self.values.keys()).finish()
    }
}

/// Reads a Secret file, without the trailing newline editors add.
fn read_secret_file(path: &std::path::Path) -> std::io::Result<String> {
    let v = std::fs::read_to_string(path)?;
    Ok(v.strip_suffix('\n').map(str::to_string).unwrap_or(v))
}

impl Secrets {
    /// Reads every Secret value the spec needs: the env var first, then a Secret of the config
    /// file, then `<dir>/<secret>/<key>`.
    pub fn load(
        spec: &obsrv_crds::ConnectorSpec,
        dir: Option<&PathBuf>,
        in_file: FileSecrets,
    ) -> Result<Secrets> {
        Self::load_with(&secret_env(spec), dir, in_file, |k| std::env::var(k).ok())
    }

    fn load_with(
        wanted: &[SecretEnv],
        dir: Option<&PathBuf>,
        in_file: FileSecrets,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Secrets> {
        let secrets = Secrets {
            values: BTreeMap::new(),
            in_file,
            dir: dir.cloned(),
            read: Default::default(),
        };
        let mut values = BTreeMap::new();
        for s in wanted {
            let from_file = secrets.in_file.get(&(s.secret_name.clone(), s.key.clone()));
            let value = match env(s.env).or_else(|| from_file.cloned()) {
                Some(v) => v,
                None if secrets.dir.is_some() => secrets.file(&s.secret_name, &s.key)?,
                None => {
                    return Err(Error::Config(format!(
                        "Secret {} key {} is needed ({}): put the Secret in the config file, set {}, or pass --secrets-dir",
                        s.secret_name, s.key, s.env, s.env
                    )));
                }
            };
            values.insert(s.env, value);
        }
        Ok(Secrets { values, ..secrets })
    }

    /// A Secret value by name: from the config file, else `<dir>/<secret>/<key>` of the Secrets
    /// directory (a custom source's mounted Secrets).
    pub fn file(&self, secret: &str, key: &str) -> Result<String> {
        if let Some(v) = self.in_file.get(&(secret.to_string(), key.to_string())) {
            return Ok(v.clone());
        }
        let dir = self.dir.as_ref().ok_or_else(|| {
            Error::Config(format!(
                "Secret {secret} key {key} asked for, but no Secrets directory is set (--secrets-dir or {})",
                obsrv_crds::runtime::SECRETS_DIR_ENV
            ))
        })?;
        let path = dir.join(secret).join(key);
        let v = read_secret_file(&path).map_err(|e| {
            // In a pod the Secret's volume is optional: until the Secret (or the key) exists the
            // file is missing, and the retry picks it up once it does.
            Error::NotFound(format!(
                "Secret {secret} key {key}: {e} ({}): create the Secret with that key in the Connector's namespace",
                path.display()
            ))
        })?;
        self.read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path, v.clone());
        Ok(v)
    }

    /// Whether a Secret file read so far changed since (a rotation): then the connector reconnects
    /// with the new values instead of waiting for a restart.
    pub fn rotated(&self) -> bool {
        let read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        read.iter()
            .any(|(path, old)| read_secret_file(path).ok().as_ref() != Some(old))
    }

    pub fn get(&self, env: &str) -> Option<&str> {
        self.values.get(env).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::manifest::tests::SECRET_AND_CONNECTOR as MANIFEST;

    #[test]
    fn sink_fields_fall_back_to_the_operator_defaults() {
        let mut rc = parse_config(MANIFEST).unwrap();
        let defaults = default_sink(
            Some("k:9092".into()),
            "ingest".into(),
            "failed".into(),
            "state".into(),
            2048,
            Compression::Lz4,
        );
        let s = SinkSettings::resolve(&rc.spec, &defaults).unwrap();
        assert_eq!(
            (
                s.bootstrap_servers.as_str(),
                s.topic.as_str(),
                s.max_message_bytes
            ),
            ("k:9092", "ingest", 2048)
        );
        rc.spec.sink = Some(obsrv_crds::SinkSpec {
            kafka: Some(KafkaSinkSpec {
                topic: Some("mine".into()),
                ..Default::default()
            }),
        });
        let s = SinkSettings::resolve(&rc.spec, &defaults).unwrap();
        assert_eq!(
            (s.topic.as_str(), s.failed_topic.as_str(), s.compression),
            ("mine", "failed", Compression::Lz4)
        );
        let none = default_sink(
            None,
            "i".into(),
            "f".into(),
            "s".into(),
            2048,
            Compression::Zstd,
        );
        assert!(matches!(
            SinkSettings::resolve(&rc.spec, &none),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn secrets_come_from_env_then_the_secrets_dir_and_never_print() {
        let rc = parse_config(MANIFEST).unwrap();
        let wanted = secret_env(&rc.spec);
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pg-creds")).unwrap();
        std::fs::write(dir.path().join("pg-creds/password"), "s3cret\n").unwrap();
        let d = dir.path().to_path_buf();
        let s = Secrets::load_with(&wanted, Some(&d), FileSecrets::new(), |k| {
            (k == "OBSRV_SOURCE_USERNAME").then(|| "app".to_string())
        })
        .unwrap();
        assert_eq!(s.get("OBSRV_SOURCE_USERNAME"), Some("app"));
        assert_eq!(s.get("OBSRV_SOURCE_PASSWORD"), Some("s3cret"));
        assert!(!format!("{s:?}").contains("s3cret"));
        let in_file = FileSecrets::from([
            (("pg-creds".into(), "username".into()), "app".into()),
            (("pg-creds".into(), "password".into()), "from-file".into()),
        ]);
        let s = Secrets::load_with(&wanted, None, in_file, |_| None).unwrap();
        assert_eq!(s.get("OBSRV_SOURCE_PASSWORD"), Some("from-file"));
        let e = Secrets::load_with(&wanted, None, FileSecrets::new(), |_| None).unwrap_err();
        assert!(
            e.to_string().contains("OBSRV_SOURCE_USERNAME") && e.to_string().contains("pg-creds"),
            "{e}"
        );
    }

    #[test]
    fn kafka_security_maps_tls_and_sasl() {
        let plain = kafka_security(None, None, None, None);
        assert_eq!(plain["security.protocol"], "plaintext");
        let tls = Tls {
            mode: TlsMode::VerifyFull,
            ca: None,
        };
        let sasl = Sasl {
            mechanism: SaslMechanism::ScramSha512,
            credentials: obsrv_crds::CredentialsRef {
                secret_name: "x".into(),
                username_key: "u".into(),
                password_key: "p".into(),
            },
        };
        let s = kafka_security(Some(&tls), Some(&sasl), Some("PEM"), Some(("u", "p")));
        assert_eq!(s["security.protocol"], "sasl_ssl");
        assert_eq!(s["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(s["enable.ssl.certificate.verification"], "true");
        assert_eq!(s["ssl.ca.pem"], "PEM");
    }
}
