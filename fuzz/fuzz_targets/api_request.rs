//! API requests as any client of the socket may send them: a series of method, path and body,
//! routed and parsed by Skiff's `api::route` (the serde bodies of every endpoint) and carried
//! out by a `Controller` that has not started a VM (the conversion to `VmConfig`).
//!
//! Checked besides "no panic": no answer is a server error, and what `GET /vm/config` shows
//! can always be loaded back as a config file describing the same VM (the document a user
//! saves is one Skiff accepts).
//!
//! Input: requests separated by 0xff bytes (never part of JSON); each is a method byte
//! (GET, PUT, PATCH, or DELETE), the path up to the first space, then the body. Requests that
//! would touch the host (logger and metrics files, booting) are parsed but not carried out.

#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff::api::model::{ActionType, FullVmConfig};
use skiff::api::{route, ApiRequest, MAX_PAYLOAD};
use skiff::config::VmConfig;
use skiff::controller::Controller;

const METHODS: &[&str] = &["GET", "PUT", "PATCH", "DELETE"];

fuzz_target!(|data: &[u8]| {
    let mut controller = Controller::new("fuzz".into(), VmConfig::new(""));
    for request in data.split(|&b| b == 0xff).take(16) {
        let Some((&m, rest)) = request.split_first() else {
            continue;
        };
        let method = METHODS[usize::from(m) % METHODS.len()];
        let (path, body) = match rest.iter().position(|&b| b == b' ') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        // hyper hands over the path as ASCII, and bodies up to the limit.
        let (Ok(path), true) = (std::str::from_utf8(path), body.len() <= MAX_PAYLOAD) else {
            continue;
        };
        if !path.is_ascii() {
            continue;
        }
        let request = match route(method, path, body) {
            Ok(r) => r,
            Err(answer) => {
                assert!(answer.status < 500, "{answer:?}");
                continue;
            }
        };
        let touches_host = matches!(
            request,
            ApiRequest::PutLogger(_)
                | ApiRequest::PutMetrics(_)
                | ApiRequest::Action(ActionType::InstanceStart | ActionType::FlushMetrics)
        );
        if touches_host {
            continue;
        }
        let answer = controller.handle(request);
        assert!(answer.status < 500, "{answer:?}");
    }

    // The configuration as the API shows it is a config file that gives the same document.
    let shown = controller.handle(ApiRequest::GetVmConfig);
    let body = shown.body.expect("GET /vm/config has a body");
    let doc: FullVmConfig = serde_json::from_value(body.clone()).expect("the document parses");
    // Firecracker's shape shows boot-source with an empty kernel path before one is given.
    if doc
        .boot_source
        .as_ref()
        .is_none_or(|b| b.kernel_image_path.is_empty())
    {
        return; // not a complete config file yet
    }
    let config = doc
        .to_vm_config()
        .unwrap_or_else(|e| panic!("GET /vm/config gave a document Skiff refuses: {e}\n{body}"));
    let again = FullVmConfig::of(&config, None, None).to_firecracker_json();
    assert_eq!(
        again, body,
        "the document changed on the way through a config file"
    );
});
