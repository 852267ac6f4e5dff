//! Leader election on a `coordination.k8s.io` Lease. Every replica watches and caches; only the
//! holder of the Lease writes (the reconciler checks the flag before any write).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// How long a Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and a candidate retries).
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// What to do with a Lease as it is now (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStep {
    Create,
    Renew,
    TakeOver,
    Follow,
}

pub fn lease_step(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> LeaseStep {
    let Some(spec) = lease else {
        return LeaseStep::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => LeaseStep::Renew,
        None | Some("") => LeaseStep::TakeOver,
        Some(_) => {
            let duration =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
            let renewed = spec.renew_time.as_ref().map(|t| t.0);
            match renewed {
                Some(r) if now.duration_since(r).unsigned_abs() < duration || r > now => {
                    LeaseStep::Follow
                }
                _ => LeaseStep::TakeOver,
            }
        }
    }
}

/// Keeps trying to hold the Lease until shutdown, then releases it so another replica takes over
/// at once.
pub async fn run(
    client: Client,
    ns: String,
    name: String,
    me: String,
    leader: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &ns);
    loop {
        let held = match try_hold(&api, &name, &me).await {
            Ok(held) => held,
            Err(e) => {
                warn!(error = %e, "lease renewal failed");
                false
            }
        };
        if leader.swap(held, Ordering::SeqCst) != held {
            info!(leader = held, lease = %name, "leadership changed");
        }
        tokio::select! {
            _ = tokio::time::sleep(RENEW_EVERY) => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
    }
    if leader.swap(false, Ordering::SeqCst)
        && let Ok(Some(mut lease)) = api.get_opt(&name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(me.as_str())
    {
        spec.holder_identity = None;
        if let Err(e) = api.replace(&name, &PostParams::default(), &lease).await {
            warn!(error = %e, "could not release the lease");
        }
    }
}

async fn try_hold(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let live = api.get_opt(name).await?;
    let step = lease_step(live.as_ref().and_then(|l| l.spec.as_ref()), me, now);
    let mine = |transitions: i32| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    match (step, live) {
        (LeaseStep::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(mine(0)),
            };
            api.create(&PostParams::default(), &lease).await?;
            Ok(true)
        }
        (LeaseStep::Follow, _) | (_, None) => Ok(false),
        (LeaseStep::Renew, Some(mut lease)) => {
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = Some(MicroTime(now));
            }
            // resourceVersion in the body makes this a compare-and-swap.
            api.replace(name, &PostParams::default(), &lease).await?;
            Ok(true)
        }
        (LeaseStep::TakeOver, Some(mut lease)) => {
            let transitions = lease
                .spec
                .as_ref()
                .and_then(|s| s.lease_transitions)
                .unwrap_or(0)
                + 1;
            lease.spec = Some(mine(transitions));
            api.replace(name, &PostParams::default(), &lease).await?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("valid")
    }

    #[test]
    fn lease_decisions() {
        let held = |who: &str, renewed: i64| LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            ..LeaseSpec::default()
        };
        assert_eq!(lease_step(None, "a", at(100)), LeaseStep::Create);
        assert_eq!(
            lease_step(Some(&held("a", 90)), "a", at(100)),
            LeaseStep::Renew
        );
        assert_eq!(
            lease_step(Some(&held("b", 90)), "a", at(100)),
            LeaseStep::Follow
        );
        assert_eq!(
            lease_step(Some(&held("b", 80)), "a", at(100)),
            LeaseStep::TakeOver
        );
        assert_eq!(
            lease_step(Some(&LeaseSpec::default()), "a", at(100)),
            LeaseStep::TakeOver
        );
    }
}
