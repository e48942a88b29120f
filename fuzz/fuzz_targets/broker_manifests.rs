//! broker-shm manifests: Broker/Trigger YAML streams (with the webhook's validation of
//! filters and delivery), then every accepted trigger's filter compiled and evaluated
//! against an event. Format: `<yaml>\0<event as JSON>`; a first byte of `\x01` instead
//! makes the first part a JSON `spec.filters` list.
#![no_main]

use broker_shm::event::CloudEvent;
use broker_shm::filter::{Filter, SubscriptionsApiFilter, validate_filters};
use broker_shm::manifests::Snapshot;
use libfuzzer_sys::fuzz_target;
use spright_fuzz::{split_once, text};

fn event(raw: &[u8]) -> CloudEvent {
    CloudEvent::from_structured(raw).unwrap_or_else(|_| {
        let mut ev = CloudEvent::new("1", "/fuzz", "dev.fuzz.event");
        ev.set("subject", "fuzz");
        ev.set("datacontenttype", "application/json");
        ev
    })
}

fn check(filter: &Filter, ev: &CloudEvent) {
    let _ = filter.evaluate(ev);
    let _ = filter.passes(ev);
}

fuzz_target!(|data: &[u8]| {
    if let Some(json) = data.strip_prefix(b"\x01") {
        let (filters, raw_event) = split_once(json, 0);
        let Ok(list) = serde_json::from_slice::<Vec<SubscriptionsApiFilter>>(filters) else {
            return;
        };
        let errs = validate_filters(&list, "spec.filters");
        for e in &errs {
            let _ = e.to_string();
        }
        check(&Filter::for_trigger(None, &list), &event(raw_event));
        return;
    }
    let (yaml, raw_event) = split_once(data, 0);
    let mut snapshot = Snapshot::default();
    snapshot.add_yaml("fuzz.yaml", &text(yaml));
    let ev = event(raw_event);
    for b in &snapshot.brokers {
        if let Some(d) = &b.delivery
            && let Ok(d) = d.compile(&b.namespace, "spec.delivery")
        {
            for n in [0, 1, 7, 31, 32, u32::MAX] {
                let _ = d.backoff_for(n);
            }
        }
    }
    for t in &snapshot.triggers {
        let _ = t.key();
        let _ = t.subscriber.display();
        if let Some(d) = &t.delivery {
            let _ = d.compile(&t.namespace, "spec.delivery");
        }
        check(&Filter::for_trigger(t.spec.filter.as_ref(), &t.spec.filters), &ev);
    }
});
