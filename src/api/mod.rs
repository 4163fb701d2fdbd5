//! The Firecracker REST API: requests routed and parsed here (pure functions, unit-tested),
//! served over HTTP/1.1 on a Unix socket by [`server`], and carried out by the
//! [`crate::controller::Controller`] on the VMM's own thread.

pub mod model;
pub mod server;

use serde::de::DeserializeOwned;
use serde_json::Value;

use model::{
    ActionType, BalloonStartCmd, BootSource, Drive, InstanceActionInfo, Logger, MachineConfig,
    Metrics, NetworkInterface, PartialDrive, PartialNetworkInterface, SnapshotCreateParams,
    SnapshotLoadParams, VmStateName, VmStateRequest,
};

/// Largest request body the server reads, as Firecracker's default.
pub const MAX_PAYLOAD: usize = 51_200;

/// A parsed API request.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET /`
    DescribeInstance,
    /// `GET /version`
    GetVersion,
    /// `PUT /boot-source`
    PutBootSource(BootSource),
    /// `GET /machine-config`
    GetMachineConfig,
    /// `PUT /machine-config`
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`
    PatchMachineConfig(MachineConfig),
    /// `PUT /drives/{id}`
    PutDrive(Drive),
    /// `PATCH /drives/{id}`
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /actions`
    Action(ActionType),
    /// `PATCH /vm`
    SetVmState(VmStateName),
    /// `GET /vm/config`
    GetVmConfig,
    /// `PUT /logger`
    PutLogger(Logger),
    /// `PUT /metrics`
    PutMetrics(Metrics),
    /// `PUT /entropy`
    PutEntropy(crate::config::EntropyConfig),
    /// `PUT /vsock`
    PutVsock(crate::config::VsockConfig),
    /// `PUT /serial`
    PutSerial(model::SerialConfig),
    /// `PUT /cpu-config`
    PutCpuConfig(Box<crate::arch::x86_64::cpu_template::CustomCpuTemplate>),
    /// `PUT /balloon`
    PutBalloon(crate::config::BalloonConfig),
    /// `GET /balloon`
    GetBalloon,
    /// `PATCH /balloon`
    PatchBalloon(model::BalloonUpdate),
    /// `GET /balloon/statistics`
    GetBalloonStats,
    /// `PATCH /balloon/statistics`
    PatchBalloonStats(model::BalloonStatsUpdate),
    /// `PATCH /balloon/hinting/start`
    StartBalloonHinting(BalloonStartCmd),
    /// `GET /balloon/hinting/status`
    GetBalloonHintingStatus,
    /// `PATCH /balloon/hinting/stop`
    StopBalloonHinting,
    /// `PUT /pmem/{id}`
    PutPmem(crate::config::PmemConfig),
    /// `PATCH /pmem/{id}`
    PatchPmem(model::PartialPmem),
    /// `PUT /hotplug/memory`
    PutMemoryHotplug(crate::config::MemoryHotplugConfig),
    /// `PATCH /hotplug/memory`
    PatchMemoryHotplug(model::MemoryHotplugSizeUpdate),
    /// `GET /hotplug/memory`
    GetMemoryHotplug,
    /// `GET /mmds`
    GetMmds,
    /// `PUT /mmds`: the whole data store (any JSON).
    PutMmds(Value),
    /// `PATCH /mmds`: a JSON merge patch of the data store.
    PatchMmds(Value),
    /// `PUT /mmds/config`
    PutMmdsConfig(crate::config::MmdsConfig),
    /// `PUT /snapshot/create`
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`
    LoadSnapshot(Box<SnapshotLoadParams>),
}

impl ApiRequest {
    /// Requests that configure the VM before it starts, and are refused afterwards.
    pub fn is_pre_boot_only(&self) -> bool {
        matches!(
            self,
            Self::PutBootSource(_)
                | Self::PutMachineConfig(_)
                | Self::PatchMachineConfig(_)
                | Self::PutDrive(_)
                | Self::PutNetworkInterface(_)
                | Self::PutLogger(_)
                | Self::PutMetrics(_)
                | Self::LoadSnapshot(_)
                | Self::PutEntropy(_)
                | Self::PutVsock(_)
                | Self::PutSerial(_)
                | Self::PutCpuConfig(_)
                | Self::PutBalloon(_)
                | Self::PutPmem(_)
                | Self::PutMemoryHotplug(_)
                | Self::PutMmdsConfig(_)
        )
    }
}

/// An answer: the status and, for 200 and errors, a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<Value>,
}

impl ApiResponse {
    /// 204 No Content.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// 200 with a body.
    pub fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    /// An error with Firecracker's `{"fault_message": ...}` body.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(serde_json::json!({ "fault_message": message.into() })),
        }
    }
}

/// Endpoints of later work: answered with 400 and a clear message until they exist.
const NOT_YET: &[(&str, &str)] = &[];

fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiResponse> {
    if bytes.is_empty() {
        return Err(ApiResponse::fault(400, "Empty request body"));
    }
    // Firecracker's prefix, then serde's words.
    let parse_err = |e: serde_json::Error| {
        ApiResponse::fault(
            400,
            format!("An error occurred when deserializing the json body of a request: {e}."),
        )
    };
    let value: Value = serde_json::from_slice(bytes).map_err(parse_err)?;
    // serde would also take a struct as an array of its fields; the API takes objects only.
    if !value.is_object() {
        return Err(ApiResponse::fault(
            400,
            "The request body must be a JSON object",
        ));
    }
    // serde would take a nested struct (a rate limiter, a bucket) as an array of its fields
    // too; the API's document says object.
    if let Some(key) = array_for_object(&value) {
        return Err(ApiResponse::fault(
            400,
            format!("An error occurred when deserializing the json body of a request: invalid type: sequence, expected an object for `{key}`."),
        ));
    }
    serde_json::from_value(value).map_err(parse_err)
}

/// The first key, at any depth, whose value is an array where the API takes an object.
fn array_for_object(value: &Value) -> Option<&str> {
    const OBJECTS: &[&str] = &[
        "rate_limiter",
        "rx_rate_limiter",
        "tx_rate_limiter",
        "bandwidth",
        "ops",
        "mem_backend",
    ];
    let map = value.as_object()?;
    map.iter().find_map(|(k, v)| {
        if v.is_array() && OBJECTS.contains(&k.as_str()) {
            Some(k.as_str())
        } else {
            array_for_object(v)
        }
    })
}

/// Any JSON document (the MMDS store takes any), not only an object.
fn json_body(bytes: &[u8]) -> Result<Value, ApiResponse> {
    if bytes.is_empty() {
        return Err(ApiResponse::fault(400, "Empty request body"));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiResponse::fault(400, format!("{e}")))
}

/// `id` from the path must match the body's id, as in Firecracker.
fn same_id(path_id: &str, body_id: &str, kind: &str) -> Result<(), ApiResponse> {
    if path_id.is_empty() {
        return Err(ApiResponse::fault(
            400,
            format!("Missing {kind} id in the path"),
        ));
    }
    if path_id != body_id {
        return Err(ApiResponse::fault(
            400,
            format!(
                "The id from the path does not match the id from the body! (path: {path_id}, body: {body_id})"
            ),
        ));
    }
    Ok(())
}

/// Turns a method, path and body into a request, or the error answer.
pub fn route(method: &str, path: &str, bytes: &[u8]) -> Result<ApiRequest, ApiResponse> {
    let path = path.split('?').next().unwrap_or("");
    let trimmed = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let invalid = || {
        ApiResponse::fault(
            400,
            format!("Invalid request method and/or path: {method} {trimmed}."),
        )
    };
    if let Some((_, what)) = NOT_YET
        .iter()
        .find(|(prefix, _)| trimmed == *prefix || trimmed.starts_with(&format!("{prefix}/")))
    {
        return Err(ApiResponse::fault(
            400,
            format!(
                "{what} {} not supported by Skiff yet",
                if what.ends_with('s') { "are" } else { "is" }
            ),
        ));
    }
    let (first, rest) = match trimmed.trim_start_matches('/').split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (trimmed.trim_start_matches('/'), None),
    };
    let request = match (method, first, rest) {
        ("GET", "", None) => ApiRequest::DescribeInstance,
        ("GET", "version", None) => ApiRequest::GetVersion,
        ("PUT", "boot-source", None) => ApiRequest::PutBootSource(body(bytes)?),
        ("GET", "machine-config", None) => ApiRequest::GetMachineConfig,
        ("PUT", "machine-config", None) => ApiRequest::PutMachineConfig(body(bytes)?),
        ("PATCH", "machine-config", None) => ApiRequest::PatchMachineConfig(body(bytes)?),
        ("PUT", "drives", Some(id)) => {
            let d: Drive = body(bytes)?;
            same_id(id, &d.drive_id, "drive")?;
            ApiRequest::PutDrive(d)
        }
        ("PATCH", "drives", Some(id)) => {
            let d: PartialDrive = body(bytes)?;
            same_id(id, &d.drive_id, "drive")?;
            ApiRequest::PatchDrive(d)
        }
        ("PUT", "network-interfaces", Some(id)) => {
            let n: NetworkInterface = body(bytes)?;
            same_id(id, &n.iface_id, "network interface")?;
            ApiRequest::PutNetworkInterface(n)
        }
        ("PATCH", "network-interfaces", Some(id)) => {
            let n: PartialNetworkInterface = body(bytes)?;
            same_id(id, &n.iface_id, "network interface")?;
            ApiRequest::PatchNetworkInterface(n)
        }
        ("PUT", "actions", None) => {
            ApiRequest::Action(body::<InstanceActionInfo>(bytes)?.action_type)
        }
        ("PATCH", "vm", None) => ApiRequest::SetVmState(body::<VmStateRequest>(bytes)?.state),
        ("GET", "vm", Some("config")) => ApiRequest::GetVmConfig,
        ("PUT", "logger", None) => ApiRequest::PutLogger(body(bytes)?),
        ("PUT", "metrics", None) => ApiRequest::PutMetrics(body(bytes)?),
        ("PUT", "entropy", None) => ApiRequest::PutEntropy(body(bytes)?),
        ("PUT", "vsock", None) => ApiRequest::PutVsock(body(bytes)?),
        ("PUT", "serial", None) => ApiRequest::PutSerial(body(bytes)?),
        ("PUT", "cpu-config", None) => ApiRequest::PutCpuConfig(Box::new(body(bytes)?)),
        ("PUT", "balloon", None) => ApiRequest::PutBalloon(body(bytes)?),
        ("GET", "balloon", None) => ApiRequest::GetBalloon,
        ("PATCH", "balloon", None) => ApiRequest::PatchBalloon(body(bytes)?),
        ("GET", "balloon", Some("statistics")) => ApiRequest::GetBalloonStats,
        ("PATCH", "balloon", Some("statistics")) => ApiRequest::PatchBalloonStats(body(bytes)?),
        ("PATCH", "balloon", Some("hinting/start")) if bytes.is_empty() => {
            ApiRequest::StartBalloonHinting(BalloonStartCmd::default())
        }
        ("PATCH", "balloon", Some("hinting/start")) => {
            ApiRequest::StartBalloonHinting(body(bytes)?)
        }
        ("GET", "balloon", Some("hinting/status")) => ApiRequest::GetBalloonHintingStatus,
        ("PATCH", "balloon", Some("hinting/stop")) => ApiRequest::StopBalloonHinting,
        ("PUT", "pmem", Some(id)) => {
            let p: crate::config::PmemConfig = body(bytes)?;
            same_id(id, &p.id, "pmem")?;
            ApiRequest::PutPmem(p)
        }
        ("PUT", "hotplug", Some("memory")) => ApiRequest::PutMemoryHotplug(body(bytes)?),
        ("PATCH", "hotplug", Some("memory")) => ApiRequest::PatchMemoryHotplug(body(bytes)?),
        ("GET", "hotplug", Some("memory")) => ApiRequest::GetMemoryHotplug,
        ("PATCH", "pmem", Some(id)) => {
            let p: model::PartialPmem = body(bytes)?;
            same_id(id, &p.id, "pmem")?;
            ApiRequest::PatchPmem(p)
        }
        ("GET", "mmds", None) => ApiRequest::GetMmds,
        ("PUT", "mmds", None) => ApiRequest::PutMmds(json_body(bytes)?),
        ("PATCH", "mmds", None) => ApiRequest::PatchMmds(json_body(bytes)?),
        ("PUT", "mmds", Some("config")) => ApiRequest::PutMmdsConfig(body(bytes)?),
        ("PUT", "mmds", Some(other)) => {
            return Err(ApiResponse::fault(
                400,
                format!("Unrecognized PUT request path `{other}`."),
            ))
        }
        ("PUT", "snapshot", Some("create")) => ApiRequest::CreateSnapshot(body(bytes)?),
        ("PUT", "snapshot", Some("load")) => ApiRequest::LoadSnapshot(Box::new(body(bytes)?)),
        _ => return Err(invalid()),
    };
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(r: Result<ApiRequest, ApiResponse>) -> (u16, String) {
        let e = r.unwrap_err();
        let msg = e.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .to_owned();
        (e.status, msg)
    }

    #[test]
    fn routes_known_paths() {
        assert_eq!(route("GET", "/", b""), Ok(ApiRequest::DescribeInstance));
        assert_eq!(route("GET", "/version", b""), Ok(ApiRequest::GetVersion));
        assert_eq!(route("GET", "/vm/config", b""), Ok(ApiRequest::GetVmConfig));
        assert_eq!(
            route("PUT", "/actions", br#"{"action_type":"InstanceStart"}"#),
            Ok(ApiRequest::Action(ActionType::InstanceStart))
        );
        assert_eq!(
            route("PATCH", "/vm", br#"{"state":"Paused"}"#),
            Ok(ApiRequest::SetVmState(VmStateName::Paused))
        );
        assert!(matches!(
            route(
                "PUT",
                "/drives/rootfs",
                br#"{"drive_id":"rootfs","path_on_host":"/i","is_root_device":true}"#
            ),
            Ok(ApiRequest::PutDrive(_))
        ));
    }

    #[test]
    fn bad_requests_get_firecracker_faults() {
        assert_eq!(
            fault(route("DELETE", "/machine-config", b"")),
            (
                400,
                "Invalid request method and/or path: DELETE /machine-config.".to_owned()
            )
        );
        assert_eq!(fault(route("GET", "/nope", b"")).0, 400);
        assert_eq!(fault(route("PUT", "/actions", b"")).1, "Empty request body");
        assert!(
            fault(route("PUT", "/actions", br#"{"action_type":"Reboot"}"#))
                .1
                .contains("unknown variant `Reboot`")
        );
        assert!(fault(route("PUT", "/actions", b"{not json"))
            .1
            .contains("key must be a string"));
        assert!(fault(route(
            "PUT",
            "/drives/a",
            br#"{"drive_id":"b","path_on_host":"/i","is_root_device":true}"#
        ))
        .1
        .contains("does not match"));
        let (status, why) = fault(route(
            "PUT",
            "/entropy",
            br#"{"rate_limiter": [null, null]}"#,
        ));
        assert!(
            status == 400 && why.contains("expected an object for `rate_limiter`"),
            "{why}"
        );
        assert!(matches!(
            route("PUT", "/vsock", br#"{"guest_cid": 3, "uds_path": "/v.sock"}"#),
            Ok(ApiRequest::PutVsock(v)) if v.guest_cid == 3 && v.vsock_id.is_none()
        ));
        assert!(fault(route("PUT", "/vsock", br#"{"guest_cid": 3}"#))
            .1
            .contains("missing field `uds_path`"));
        assert_eq!(
            route("PATCH", "/balloon/hinting/start", b""),
            Ok(ApiRequest::StartBalloonHinting(BalloonStartCmd {
                acknowledge_on_stop: true
            }))
        );
        assert_eq!(
            route(
                "PATCH",
                "/balloon/hinting/start",
                br#"{"acknowledge_on_stop":false}"#
            ),
            Ok(ApiRequest::StartBalloonHinting(BalloonStartCmd {
                acknowledge_on_stop: false
            }))
        );
        assert!(fault(route("PUT", "/balloon", br#"{"amount_mib":1}"#))
            .1
            .contains("missing field `deflate_on_oom`"));
        assert!(fault(route("PATCH", "/balloon", br#"{"amount_mib":-1}"#))
            .1
            .contains("invalid value"));
        assert_eq!(
            fault(route("GET", "/balloon/nope", b"")).1,
            "Invalid request method and/or path: GET /balloon/nope."
        );
        assert_eq!(
            fault(route("PUT", "/snapshot/create", b"{}")).1,
            "An error occurred when deserializing the json body of a request: missing field `snapshot_path`."
        );
        assert!(matches!(
            route(
                "PUT",
                "/snapshot/load",
                br#"{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m"},"resume_vm":true}"#
            ),
            Ok(ApiRequest::LoadSnapshot(p)) if p.resume_vm && p.mem_backend().is_ok()
        ));
        assert!(matches!(
            route(
                "PUT",
                "/snapshot/load",
                br#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"h.sock"}}"#
            ),
            Ok(ApiRequest::LoadSnapshot(p))
                if p.mem_backend().ok() == Some(crate::snapshot::MemBackend::Uffd("h.sock".into()))
        ));
        let (_, why) = fault(route(
            "PUT",
            "/snapshot/load",
            br#"{"snapshot_path":"s","colour":1}"#,
        ));
        assert!(why.contains("unknown field `colour`"), "{why}");
    }

    #[test]
    fn mmds_routes() {
        assert_eq!(route("GET", "/mmds", b""), Ok(ApiRequest::GetMmds));
        assert_eq!(
            route("PUT", "/mmds", b"[1, \"two\"]"),
            Ok(ApiRequest::PutMmds(serde_json::json!([1, "two"]))),
            "any JSON"
        );
        assert_eq!(
            route("PATCH", "/mmds/", br#"{"a":null}"#),
            Ok(ApiRequest::PatchMmds(serde_json::json!({"a": null})))
        );
        assert!(matches!(
            route("PUT", "/mmds/config", br#"{"network_interfaces":["eth0"],"version":"V2"}"#),
            Ok(ApiRequest::PutMmdsConfig(c)) if c.version == crate::config::MmdsVersion::V2
        ));
        assert_eq!(fault(route("PUT", "/mmds", b"")).1, "Empty request body");
        assert_eq!(
            fault(route("PUT", "/mmds/other", b"{}")).1,
            "Unrecognized PUT request path `other`."
        );
        for bad_config in [
            &br#"{"network_interfaces":["eth0"],"version":"V3"}"#[..],
            br#"{"network_interfaces":["eth0"],"ipv4_address":"169.254.1"}"#,
            br#"{"version":"V2"}"#,
            br#"{"network_interfaces":["eth0"],"colour":1}"#,
        ] {
            assert_eq!(fault(route("PUT", "/mmds/config", bad_config)).0, 400);
        }
        assert!(route("PUT", "/mmds/config", b"{}").is_err());
    }
}
