//! The microVM metadata service (Firecracker's MMDS): a JSON data store the host fills through
//! the API (`PUT`/`PATCH /mmds`) and the guest reads over plain HTTP at a link-local address.
//!
//! The guest reaches it through the network interfaces `PUT /mmds/config` names: the device's
//! transmit path hands frames for the service's address (ARP requests for it, IPv4 to it) to
//! that interface's [`MmdsStack`] instead of the TAP, and the receive path gives the guest the
//! stack's answers ahead of the TAP's frames. The stack speaks ARP and a minimal TCP
//! ([`tcp`]: one request at a time per connection, a bounded number of connections) carrying
//! HTTP/1.1 ([`http`]: `GET` of any path, `PUT /latest/api/token`), with Firecracker's status
//! codes and texts.
//!
//! Everything here reads guest bytes: every length is checked, every table is bounded, and a
//! frame costs at most one request's answer.

pub mod http;
pub mod stack;
pub mod tcp;
mod token;

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::config::{MmdsConfig, MmdsVersion};
use crate::metrics::MmdsMetrics;
pub use stack::MmdsStack;
pub use token::TokenError;

/// Largest data store, in bytes of compact JSON, when not set otherwise: Firecracker's default
/// (its API's largest request body).
pub const DEFAULT_MMDS_SIZE_LIMIT: usize = 51_200;

/// Errors of the data store, with Firecracker's texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmdsError {
    /// A `PUT` or `PATCH` would make the store larger than its limit.
    #[error("The MMDS patch request doesn't fit.")]
    DataStoreLimitExceeded,
    /// A path names nothing in the store.
    #[error("The MMDS resource does not exist.")]
    NotFound,
    /// A `PATCH` before any `PUT`.
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    /// A token could not be made.
    #[error("Token Authority error: {0}")]
    TokenAuthority(#[from] TokenError),
    /// IMDS text exists for objects and strings only.
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
}

/// How a value is written out: JSON, or IMDS text (an object's keys one per line, `/` after
/// those holding objects; a string as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Compact JSON.
    Json,
    /// IMDS text.
    Imds,
}

/// The data store and what the guest-facing side needs with it: version, IMDS compatibility,
/// the session tokens and the counters.
#[derive(Debug)]
pub struct Mmds {
    data: Value,
    initialized: bool,
    limit: usize,
    version: MmdsVersion,
    imds_compat: bool,
    tokens: token::TokenAuthority,
    metrics: Arc<MmdsMetrics>,
}

/// RFC 7396 JSON merge patch of `target` by `patch`: objects merge key by key, `null` removes a
/// key, anything else replaces. serde_json's nesting limit bounds the recursion.
pub fn json_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, value) in changes {
            if value.is_null() {
                doc.remove(key);
            } else {
                json_merge_patch(doc.entry(key.as_str()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Bytes of `value` as compact JSON, counted without building the text.
fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a Value (string keys only) to a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

impl Mmds {
    fn new(limit: usize) -> Self {
        Self {
            data: Value::Null,
            initialized: false,
            limit,
            version: MmdsVersion::default(),
            imds_compat: false,
            tokens: token::TokenAuthority::default(),
            metrics: Arc::default(),
        }
    }

    /// V1 or V2.
    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    /// Whether answers are IMDS text whatever the Accept header.
    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    /// The counters.
    pub fn metrics(&self) -> &MmdsMetrics {
        &self.metrics
    }

    /// Whether `token` was issued here and has not expired.
    pub fn is_valid_token(&self, token: &str) -> bool {
        self.tokens.is_valid(token, std::time::Instant::now())
    }

    /// A new session token living `ttl_seconds` (1 to 21600).
    pub fn generate_token(&mut self, ttl_seconds: u32) -> Result<String, MmdsError> {
        Ok(self
            .tokens
            .generate(ttl_seconds, std::time::Instant::now())?)
    }

    /// The value at `path` (a JSON pointer; a trailing `/` is ignored) written as `format`
    /// asks (IMDS text whatever it asks when IMDS compatibility is on).
    pub fn get_value(&self, path: &str, format: OutputFormat) -> Result<String, MmdsError> {
        let pointer = path.strip_suffix('/').unwrap_or(path);
        let value = self.data.pointer(pointer).ok_or(MmdsError::NotFound)?;
        match (self.imds_compat, format) {
            (false, OutputFormat::Json) => Ok(value.to_string()),
            _ => imds_text(value),
        }
    }
}

/// `value` as IMDS text: an object's keys, one per line, those holding objects ending in `/`;
/// a string as it is; anything else has no IMDS form.
fn imds_text(value: &Value) -> Result<String, MmdsError> {
    match value {
        Value::Object(map) => {
            let keys: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/")
                    } else {
                        k.clone()
                    }
                })
                .collect();
            Ok(keys.join("\n"))
        }
        Value::String(s) => Ok(s.clone()),
        _ => Err(MmdsError::UnsupportedValueType),
    }
}

/// The data store as the VMM shares it: the API writes it on the controller's thread while the
/// guest reads it on the event thread. Clones are the same store.
#[derive(Debug, Clone)]
pub struct MmdsStore(Arc<Mutex<Mmds>>);

/// Two handles are equal when they are the same store.
impl PartialEq for MmdsStore {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for MmdsStore {}

impl Default for MmdsStore {
    fn default() -> Self {
        Self::new(DEFAULT_MMDS_SIZE_LIMIT)
    }
}

impl MmdsStore {
    /// An empty store holding at most `limit` bytes of compact JSON.
    pub fn new(limit: usize) -> Self {
        Self(Arc::new(Mutex::new(Mmds::new(limit))))
    }

    /// The store itself, for the guest-facing side.
    pub fn lock(&self) -> MutexGuard<'_, Mmds> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the whole store (`PUT /mmds`).
    pub fn put(&self, data: Value) -> Result<(), MmdsError> {
        let mut mmds = self.lock();
        if json_len(&data) > mmds.limit {
            return Err(MmdsError::DataStoreLimitExceeded);
        }
        mmds.data = data;
        mmds.initialized = true;
        Ok(())
    }

    /// Merges `patch` into the store (`PATCH /mmds`, RFC 7396); refused before any `PUT`, as
    /// in Firecracker, and when the result would be over the limit (the store is then unchanged).
    pub fn patch(&self, patch: &Value) -> Result<(), MmdsError> {
        let mut mmds = self.lock();
        if !mmds.initialized {
            return Err(MmdsError::NotInitialized);
        }
        let mut data = mmds.data.clone();
        json_merge_patch(&mut data, patch);
        if json_len(&data) > mmds.limit {
            return Err(MmdsError::DataStoreLimitExceeded);
        }
        mmds.data = data;
        Ok(())
    }

    /// The whole store (`GET /mmds`); `null` until something was put.
    pub fn data(&self) -> Value {
        self.lock().data.clone()
    }

    /// Sets what `PUT /mmds/config` decides besides the network: the version and IMDS
    /// compatibility.
    pub fn configure(&self, version: MmdsVersion, imds_compat: bool) {
        let mut mmds = self.lock();
        mmds.version = version;
        mmds.imds_compat = imds_compat;
    }

    /// The store's counters, shared with the metrics dump.
    pub fn metrics(&self) -> Arc<MmdsMetrics> {
        self.lock().metrics.clone()
    }
}

/// The service as a snapshot holds it, as Firecracker keeps it: version, IMDS compatibility,
/// address and interfaces. The data store is not kept (a clone's metadata is the host's to
/// seed again, and may differ from its parent's), nor are the session tokens: a restored guest
/// asks for a new one. Connections in progress are dropped, as a network may drop them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmdsState {
    /// V1 or V2.
    pub version: MmdsVersion,
    /// The service's IPv4 address.
    pub ipv4_address: [u8; 4],
    /// The interfaces that answer for it.
    pub network_interfaces: Vec<String>,
    /// IMDS text whatever the Accept header.
    pub imds_compat: bool,
}

impl MmdsState {
    /// The state of the service `config` describes.
    pub fn save(config: &MmdsConfig) -> Self {
        Self {
            version: config.version,
            ipv4_address: config.ipv4().octets(),
            network_interfaces: config.network_interfaces.clone(),
            imds_compat: config.imds_compat,
        }
    }

    /// The configuration this state describes.
    pub fn config(&self) -> MmdsConfig {
        MmdsConfig {
            version: self.version,
            network_interfaces: self.network_interfaces.clone(),
            ipv4_address: Some(self.ipv4_address.into()),
            imds_compat: self.imds_compat,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> MmdsStore {
        let s = MmdsStore::default();
        s.put(json!({
            "latest": {"meta-data": {"ami-id": "ami-1", "net": {"a": "b"}, "n": 3}},
            "user-data": "hello"
        }))
        .unwrap();
        s
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // The examples of RFC 7396, appendix A.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut target, patch, want) in cases {
            json_merge_patch(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn values_as_json_and_imds_text() {
        let s = store();
        let m = s.lock();
        assert_eq!(
            m.get_value("/latest", OutputFormat::Imds).unwrap(),
            "meta-data/"
        );
        assert_eq!(
            m.get_value("/latest/meta-data/", OutputFormat::Imds)
                .unwrap(),
            "ami-id\nn\nnet/"
        );
        assert_eq!(
            m.get_value("/latest/meta-data/ami-id", OutputFormat::Imds)
                .unwrap(),
            "ami-1"
        );
        assert_eq!(
            m.get_value("/latest/meta-data/ami-id", OutputFormat::Json)
                .unwrap(),
            "\"ami-1\""
        );
        assert_eq!(
            m.get_value("/latest/meta-data/net", OutputFormat::Json)
                .unwrap(),
            r#"{"a":"b"}"#
        );
        assert_eq!(
            m.get_value("/latest/meta-data/n", OutputFormat::Imds),
            Err(MmdsError::UnsupportedValueType)
        );
        assert_eq!(
            m.get_value("/latest/nothing", OutputFormat::Json),
            Err(MmdsError::NotFound)
        );
        assert_eq!(
            m.get_value("/", OutputFormat::Imds).unwrap(),
            "latest/\nuser-data"
        );
    }

    #[test]
    fn imds_compat_answers_text_whatever_is_asked() {
        let s = store();
        s.configure(MmdsVersion::V2, true);
        let m = s.lock();
        assert_eq!(m.version(), MmdsVersion::V2);
        assert_eq!(
            m.get_value("/latest/meta-data/ami-id", OutputFormat::Json)
                .unwrap(),
            "ami-1"
        );
    }

    #[test]
    fn the_size_limit_holds_for_put_and_patch() {
        let s = MmdsStore::new(20);
        assert_eq!(s.patch(&json!({"a": 1})), Err(MmdsError::NotInitialized));
        s.put(json!({"key": "0123456"})).unwrap(); // 17 bytes
        assert_eq!(
            s.put(json!({"key": "01234567890"})),
            Err(MmdsError::DataStoreLimitExceeded)
        );
        assert_eq!(
            s.patch(&json!({"k2": "x"})),
            Err(MmdsError::DataStoreLimitExceeded)
        );
        assert_eq!(s.data(), json!({"key": "0123456"}), "unchanged");
        s.patch(&json!({"key": null, "b": 1})).unwrap();
        assert_eq!(s.data(), json!({"b": 1}));
        assert_eq!(json_len(&json!({"key": "0123456"})), 17);
    }

    #[test]
    fn handles_are_the_same_store() {
        let a = MmdsStore::default();
        let b = a.clone();
        b.put(json!({"x": 1})).unwrap();
        assert_eq!(a.data(), json!({"x": 1}));
        assert_eq!(a, b);
        assert_ne!(a, MmdsStore::default());
    }

    #[test]
    fn state_keeps_the_config_with_its_address() {
        let config = MmdsConfig {
            version: MmdsVersion::V2,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: None,
            imds_compat: true,
        };
        let state = MmdsState::save(&config);
        assert_eq!(state.ipv4_address, [169, 254, 169, 254]);
        let back = state.config();
        assert_eq!(back.ipv4(), config.ipv4());
        assert_eq!(back.network_interfaces, config.network_interfaces);
        assert_eq!((back.version, back.imds_compat), (MmdsVersion::V2, true));
    }
}
