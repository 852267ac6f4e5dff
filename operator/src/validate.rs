//! Pure validation of a Connector before the operator runs anything: the spec checks shared with
//! the runtime (`obsrv_crds::validate`), plus what only the operator knows (its sink defaults).
//! An invalid spec is reported as `ConfigValid=False` and waits for the next change.

use obsrv_crds::Connector;

pub use obsrv_crds::duration::{DurationError, parse_duration};
pub use obsrv_crds::validate::{SpecError, Validated};

/// Checks a Connector against what the operator can run. `sink_has_bootstrap` tells whether the
/// operator has a default bootstrap server list.
pub fn validate(c: &Connector, sink_has_bootstrap: bool) -> Result<Validated, SpecError> {
    let valid = obsrv_crds::validate::validate_spec(&c.spec)?;
    if !sink_has_bootstrap && !obsrv_crds::validate::has_sink_bootstrap(&c.spec) {
        return Err(SpecError::NoSinkBootstrap);
    }
    Ok(valid)
}
