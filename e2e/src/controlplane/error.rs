//! API errors, answered as Kubernetes `Status` objects.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One reason an object was rejected (`Status.details.causes[]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, `FieldValueTypeInvalid`, ...
    pub reason: String,
    /// Dotted path of the field, e.g. `spec.source`.
    pub field: String,
    pub message: String,
}

impl From<obsrv_crds::schema::Cause> for Cause {
    fn from(c: obsrv_crds::schema::Cause) -> Cause {
        Cause {
            reason: c.reason,
            field: c.field,
            message: c.message,
        }
    }
}

/// An API error. Each variant maps to the HTTP code and `Status.reason` a real API server answers with,
/// so clients (kubectl, kube-rs) react to it the same way.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    NotFound {
        message: String,
        kind: String,
        name: String,
    },
    #[error("{message}")]
    AlreadyExists {
        message: String,
        kind: String,
        name: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{message}")]
    Invalid {
        message: String,
        kind: String,
        name: String,
        group: String,
        causes: Vec<Cause>,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn not_found(resource: &str, name: &str) -> Self {
        ApiError::NotFound {
            message: format!("{resource} \"{name}\" not found"),
            kind: resource.to_string(),
            name: name.to_string(),
        }
    }

    pub fn already_exists(resource: &str, name: &str) -> Self {
        ApiError::AlreadyExists {
            message: format!("{resource} \"{name}\" already exists"),
            kind: resource.to_string(),
            name: name.to_string(),
        }
    }

    /// The object is invalid: `<Kind>.<group> "<name>" is invalid: <field>: <message>, ...` like a real
    /// API server, so the message alone tells the user what to fix.
    pub fn invalid(kind: &str, group: &str, name: &str, causes: Vec<Cause>) -> Self {
        let qualified = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let details: Vec<String> = causes
            .iter()
            .map(|c| {
                if c.field.is_empty() {
                    c.message.clone()
                } else {
                    format!("{}: {}", c.field, c.message)
                }
            })
            .collect();
        let message = if details.len() == 1 {
            format!("{qualified} \"{name}\" is invalid: {}", details[0])
        } else {
            format!(
                "{qualified} \"{name}\" is invalid: [{}]",
                details.join(", ")
            )
        };
        ApiError::Invalid {
            message,
            kind: kind.to_string(),
            name: name.to_string(),
            group: group.to_string(),
            causes,
        }
    }

    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } => 404,
            ApiError::AlreadyExists { .. } | ApiError::Conflict(_) => 409,
            ApiError::Invalid { .. } => 422,
            ApiError::BadRequest(_) => 400,
            ApiError::Gone(_) => 410,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::Internal(_) => 500,
        }
    }

    /// `Status.reason`: the stable CamelCase reason clients switch on.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict(_) => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Gone(_) => "Expired",
            ApiError::MethodNotAllowed(_) => "MethodNotAllowed",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::Internal(_) => "InternalError",
        }
    }

    /// The `Status` object (apiVersion v1) for this error.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        match self {
            ApiError::NotFound { kind, name, .. } | ApiError::AlreadyExists { kind, name, .. } => {
                status["details"] = json!({"name": name, "kind": kind});
            }
            ApiError::Invalid {
                kind,
                name,
                group,
                causes,
                ..
            } => {
                let causes: Vec<Value> = causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect();
                status["details"] =
                    json!({"name": name, "group": group, "kind": kind, "causes": causes});
            }
            _ => {}
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            code,
            [("content-type", "application/json")],
            self.status().to_string(),
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
