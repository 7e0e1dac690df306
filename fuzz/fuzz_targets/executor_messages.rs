//! What an agent (or anyone reaching port 9443) sends the executor, and
//! what the controller and buildd send an agent: decoding and the checks
//! after it never panic, and a Hello that passes validation has names fit
//! for API paths and selectors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tripod::executor::grpc::{claim_from, outcome_from};
use tripod::proto::buildd::v1 as bpb;
use tripod::proto::executor::v1 as pb;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = pb::AgentMessage::decode(data) {
        match m.message {
            Some(pb::agent_message::Message::Hello(h)) => {
                let claim = claim_from(h);
                if claim.validate().is_ok() {
                    for s in [&claim.namespace, &claim.image_build, &claim.pod] {
                        assert!(
                            !s.is_empty()
                                && s.bytes().all(|b| b.is_ascii_lowercase()
                                    || b.is_ascii_digit()
                                    || b == b'-'
                                    || b == b'.'),
                            "{s:?}"
                        );
                    }
                    assert!(!claim.build_id.contains([',', '=', '!', '/', '#', '?']));
                }
            }
            Some(pb::agent_message::Message::Outcome(o)) => {
                let _ = outcome_from(o);
            }
            _ => {}
        }
    }
    let _ = pb::ControllerMessage::decode(data);
    let _ = bpb::BuildEvent::decode(data);
});
