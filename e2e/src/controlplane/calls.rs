//! A record of the API calls a server received, in the terms RBAC uses (verb, API group, resource
//! with its subresource), so a test can check every call a client made against the permissions it
//! declares.

use std::sync::Mutex;

use axum::http::Method;

/// One API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The RBAC verb: get, list, watch, create, update, patch, delete or deletecollection.
    pub verb: String,
    /// The API group (`""` for the core group).
    pub group: String,
    /// The plural resource, with `/status`, `/scale` or `/log` for a subresource.
    pub resource: String,
    /// The object's name, for calls on one object.
    pub name: Option<String>,
}

/// The calls received so far (off unless a server is given one: a long-running server would only
/// grow it).
#[derive(Debug, Default)]
pub struct CallLog {
    calls: Mutex<Vec<Call>>,
}

impl CallLog {
    pub fn record(&self, call: Call) {
        self.lock().push(call);
    }

    /// Every call since the start or the last [`CallLog::clear`], oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().clone()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Calls with this verb on this resource (`connectors/status` for a subresource).
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        self.lock()
            .iter()
            .filter(|c| c.verb == verb && c.resource == resource)
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Call>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The RBAC verb of a request: `name` is set for requests on one object, `watch` for `?watch=true`.
pub fn verb(method: &Method, name: bool, watch: bool) -> &'static str {
    match (method, name) {
        (&Method::GET, _) if watch => "watch",
        (&Method::GET, true) => "get",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_as_rbac_names_them() {
        assert_eq!(verb(&Method::GET, true, false), "get");
        assert_eq!(verb(&Method::GET, false, false), "list");
        assert_eq!(verb(&Method::GET, false, true), "watch");
        assert_eq!(verb(&Method::GET, true, true), "watch");
        assert_eq!(verb(&Method::PATCH, true, false), "patch");
        assert_eq!(verb(&Method::DELETE, false, false), "deletecollection");
    }

    #[test]
    fn counts_by_verb_and_resource() {
        let log = CallLog::default();
        let call = |verb: &str, resource: &str| Call {
            verb: verb.into(),
            group: "obsrv.io".into(),
            resource: resource.into(),
            name: Some("a".into()),
        };
        log.record(call("patch", "connectors/status"));
        log.record(call("patch", "connectors"));
        log.record(call("patch", "connectors/status"));
        assert_eq!(log.count("patch", "connectors/status"), 2);
        assert_eq!(log.calls().len(), 3);
        log.clear();
        assert!(log.calls().is_empty());
    }
}
