//! Connectors the operator cannot even deserialize (e.g. stored before a schema change, or written
//! to an API server without the CRD's validation). They are reported, never crash the controller or
//! stall the others, and their deletion is never blocked by our finalizer.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, DeserializeGuard, error_boundary::InvalidObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use obsrv_crds::status::{Phase, condition};
use obsrv_crds::{Connector, labels};
use serde_json::{Value, json};
use tracing::warn;

use crate::error::Error;
use crate::reconcile::{self, Context, FIELD_MANAGER};

/// Reason on the conditions of a Connector that cannot be read.
pub const REASON: &str = "UnreadableSpec";

/// The status written for an unreadable Connector (a merge patch body).
pub fn status_patch(invalid: &InvalidObject, now: Timestamp) -> Value {
    let message = format!(
        "The Connector cannot be read by the operator: {}. Fix or re-apply the manifest; nothing is changed until then.",
        invalid.error
    );
    let cond = |type_: &str, status: &str| Condition {
        type_: type_.into(),
        status: status.into(),
        reason: REASON.into(),
        message: message.clone(),
        observed_generation: invalid.metadata.generation,
        last_transition_time: Time(now),
    };
    json!({
        "status": {
            "observedGeneration": invalid.metadata.generation,
            "phase": Phase::Failed,
            "conditions": [
                cond(condition::READY, "False"),
                cond(condition::RECONCILING, "False"),
                cond(condition::STALLED, "True"),
                cond(condition::CONFIG_VALID, "False"),
            ],
        }
    })
}

/// Reconciles a Connector that may not deserialize: valid ones go through the normal pipeline.
pub async fn reconcile(
    obj: Arc<DeserializeGuard<Connector>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    match &obj.0 {
        Ok(c) => reconcile::reconcile(Arc::new(c.clone()), ctx).await,
        Err(invalid) => report(invalid, &ctx).await,
    }
}

/// Error policy for the guarded controller.
pub fn error_policy(obj: Arc<DeserializeGuard<Connector>>, e: &Error, ctx: Arc<Context>) -> Action {
    match &obj.0 {
        Ok(c) => reconcile::error_policy(Arc::new(c.clone()), e, ctx),
        Err(_) => Action::requeue(e.backoff()),
    }
}

async fn report(invalid: &InvalidObject, ctx: &Context) -> Result<Action, Error> {
    if !ctx.leader.load(Ordering::Relaxed) {
        return Ok(Action::requeue(std::time::Duration::from_secs(5)));
    }
    let meta = &invalid.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
    warn!(connector = %format!("{ns}/{name}"), error = %invalid.error, "Connector cannot be read");
    ctx.metrics.failed(REASON);
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &ns,
        &ApiResource::erase::<Connector>(&()),
    );
    let ours = meta
        .finalizers
        .iter()
        .flatten()
        .position(|f| f == labels::FINALIZER);
    if meta.deletion_timestamp.is_some() {
        // Nothing could have run from an unreadable spec that needs cleaning up: let it go.
        if let Some(i) = ours {
            let path = format!("/metadata/finalizers/{i}");
            let patch: json_patch::Patch = serde_json::from_value(json!([
                {"op": "test", "path": path, "value": labels::FINALIZER},
                {"op": "remove", "path": path},
            ]))?;
            api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await?;
        }
        return Ok(Action::await_change());
    }
    let body = status_patch(invalid, (ctx.clock)());
    // Write once per generation and error: no loop, no repeated events.
    let current = api.get_status(&name).await?;
    let unchanged = current.data["status"]["observedGeneration"]
        == body["status"]["observedGeneration"]
        && current.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["type"] == condition::CONFIG_VALID
                    && c["message"] == body["status"]["conditions"][3]["message"]
            });
    if !unchanged {
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Merge(&body),
        )
        .await?;
        let reference = DeserializeGuard::<Connector>(Err(invalid.clone())).object_ref(&());
        let ev = KubeEvent {
            type_: EventType::Warning,
            reason: REASON.into(),
            note: Some(format!("The Connector cannot be read: {}", invalid.error)),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            warn!(error = %e, "could not publish event");
        }
    }
    Ok(Action::await_change())
}
