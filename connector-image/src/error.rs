//! The runtime's error type. Every variant maps to a stable CamelCase reason shown in `/status`
//! (`lastError.reason`), in logs and as a metric label.

use obsrv_crds::status::reason;

/// Errors of the connector runtime. Messages never carry a secret value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file or a flag is wrong; retrying does not help.
    #[error("configuration: {0}")]
    Config(String),
    /// The source cannot be reached (network, TLS, timeouts).
    #[error("source unreachable: {0}")]
    SourceUnreachable(String),
    /// The source refused our credentials.
    #[error("source authentication failed: {0}")]
    AuthFailed(String),
    /// The source does not have the shape the spec expects (missing table or column, bad type).
    #[error("schema: {0}")]
    Schema(String),
    /// The sink cluster cannot be reached or refused a write.
    #[error("sink unreachable: {0}")]
    SinkUnreachable(String),
    /// Saved state could not be read or written.
    #[error("state: {0}")]
    State(String),
    /// What the spec names does not exist at the source (a bucket, a database).
    #[error("not found: {0}")]
    NotFound(String),
    /// TLS cannot be set up as configured (a CA that is not PEM, a certificate the server refuses).
    #[error("TLS: {0}")]
    TlsConfig(String),
}

impl Error {
    /// The stable reason for `lastError.reason` and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Config(_) => reason::CONFIG_ERROR,
            Error::SourceUnreachable(_) => reason::SOURCE_UNREACHABLE,
            Error::AuthFailed(_) => reason::AUTH_FAILED,
            Error::Schema(_) => reason::SCHEMA_ERROR,
            Error::SinkUnreachable(_) => reason::SINK_UNREACHABLE,
            Error::State(_) => reason::STATE_ERROR,
            Error::NotFound(_) => reason::NOT_FOUND,
            Error::TlsConfig(_) => reason::TLS_CONFIG,
        }
    }

    /// Whether waiting and retrying can fix it. Configuration errors need a new spec; everything
    /// else (networks, credentials being rotated, a table being created) may heal on its own.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Error::Config(_) | Error::TlsConfig(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed connection to `what` (`Postgres`, `MySQL`, ...) at `host:port`, said in one line with
/// the likely cause: refused, unresolvable, silent, or refused by TLS or the credentials.
pub fn connect_error(what: &str, host: &str, port: u16, e: sqlx::Error) -> Error {
    let at = format!("{host}:{port}");
    if let sqlx::Error::Io(io) = &e {
        use std::io::ErrorKind::*;
        return Error::SourceUnreachable(match io.kind() {
            ConnectionRefused => format!("connection refused at {at}: is {what} listening there?"),
            TimedOut => format!("no answer from {at}: check the host, port and firewall"),
            _ if io.to_string().contains("failed to lookup address")
                || io.to_string().contains("Name or service not known") =>
            {
                format!("cannot resolve {host}: check the host name")
            }
            _ => format!("connecting to {at}: {io}"),
        });
    }
    if let sqlx::Error::Tls(t) = &e {
        return Error::TlsConfig(format!(
            "TLS with {at} failed: {t} (check tls.mode and the CA of the Secret)"
        ));
    }
    match from_sqlx(e) {
        Error::SourceUnreachable(m) => Error::SourceUnreachable(format!("{at}: {m}")),
        other => other,
    }
}

/// Checks that a CA bundle is PEM before a client is built with it (`name`: where it comes from,
/// e.g. `Secret pg-ca key ca.crt`).
pub fn check_ca_pem(name: &str, pem: &str) -> Result<()> {
    if pem.contains("-----BEGIN CERTIFICATE-----") && pem.contains("-----END CERTIFICATE-----") {
        return Ok(());
    }
    Err(Error::TlsConfig(format!(
        "{name} is not a PEM certificate (it must hold -----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----)"
    )))
}

/// Classifies a sqlx error into the runtime's reasons.
pub fn from_sqlx(e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                // Postgres: invalid_authorization_specification, invalid_password;
                // MySQL/MariaDB: access denied (1045 -> SQLSTATE 28000), 1044 (42000 with access).
                "28000" | "28P01" => Error::AuthFailed(db.message().to_string()),
                // Postgres undefined_table / undefined_column / datatype mismatch; MySQL 42S02/42S22.
                "42P01" | "42703" | "42804" | "42883" | "3F000" | "42S02" | "42S22" | "42000" => {
                    if db.message().contains("denied") {
                        Error::AuthFailed(db.message().to_string())
                    } else {
                        Error::Schema(db.message().to_string())
                    }
                }
                // Postgres invalid_catalog_name, MySQL unknown database (1049 -> 42000 above).
                "3D000" => Error::NotFound(db.message().to_string()),
                _ => Error::SourceUnreachable(db.message().to_string()),
            }
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::Decode(_) => Error::Schema(e.to_string()),
        _ => Error::SourceUnreachable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_the_shared_camel_case_ones() {
        assert_eq!(Error::AuthFailed("x".into()).reason(), "AuthFailed");
        assert_eq!(
            Error::SourceUnreachable("x".into()).reason(),
            "SourceUnreachable"
        );
        assert_eq!(
            Error::SinkUnreachable("x".into()).reason(),
            "SinkUnreachable"
        );
        assert_eq!(Error::Schema("x".into()).reason(), "SchemaError");
        assert!(!Error::Config("x".into()).is_retryable());
        assert!(Error::SinkUnreachable("x".into()).is_retryable());
    }
}
