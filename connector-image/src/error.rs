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
        }
    }

    /// Whether waiting and retrying can fix it. Configuration errors need a new spec; everything
    /// else (networks, credentials being rotated, a table being created) may heal on its own.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Error::Config(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
                // Postgres invalid_catalog_name (database does not exist).
                "3D000" => Error::Schema(db.message().to_string()),
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
