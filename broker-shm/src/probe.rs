//! Stage probes for `spright-bench broker`: where an event's time goes between the ingress and
//! the last step of a chain. Nothing is recorded unless a bench installs a probe; then every
//! stage calls it with the stage name and the event (one atomic load per stage otherwise).

use crate::event::CloudEvent;
use std::sync::OnceLock;

/// Called at each stage with the stage's name and the event passing it.
pub type Probe = fn(&'static str, &CloudEvent);

static PROBE: OnceLock<Probe> = OnceLock::new();

/// Installs the process-wide probe; `false` when one is installed already.
pub fn install(probe: Probe) -> bool {
    PROBE.set(probe).is_ok()
}

/// Marks that `ev` reached `stage`.
#[inline]
pub(crate) fn mark(stage: &'static str, ev: &CloudEvent) {
    if let Some(p) = PROBE.get() {
        p(stage, ev);
    }
}
