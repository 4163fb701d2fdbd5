//! HTTP/1.1 on a Unix socket with hyper, on the API thread's own single-threaded tokio runtime.
//! Each connection is its own task, so a slow or stalled client only holds itself: headers
//! and bodies have a time limit, bodies a size limit, and at most [`MAX_CONNECTIONS`] are
//! served at once. Requests go to the controller over a channel and an eventfd; the answer
//! comes back on a oneshot channel.

use std::convert::Infallible;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

#[cfg(doc)]
use super::MAX_PAYLOAD;
use super::{route, ApiResponse};
use crate::controller::ApiCall;
use crate::metrics::{inc, ApiMetrics};
use crate::seccomp::{Filters, ThreadKind};

/// Bodies up to this size are read and discarded when too large, so the client can read the
/// answer; beyond it the connection is simply closed after the answer.
const DISCARD_LIMIT: usize = 1 << 20;

/// How long a client may take to send its headers, and then its body.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once, as Firecracker's API server allows; one more is answered 503
/// and closed. Without a cap a client could take every file descriptor Skiff has.
pub const MAX_CONNECTIONS: usize = 10;

/// The whole answer to a connection past the cap, written without hyper or a task.
const SERVER_FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: application/json\r\n\
Content-Length: 45\r\n\
Connection: close\r\n\r\n\
{\"fault_message\":\"Too many open connections\"}";

/// Accept failures are logged at most once per this period: at the fd limit accept fails for
/// as long as a connection waits in the backlog.
const ACCEPT_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Pause after accept fails for want of descriptors or memory: the waiting connection keeps
/// the listener readable, so retrying at once would spin until something is closed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Pause after any other accept failure.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// Errors while starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket cannot be bound.
    #[error("Failed to open the API socket at: {}. Check that it is not already used", .0.display())]
    Bind(PathBuf, #[source] std::io::Error),
    /// The thread or its runtime cannot start.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

struct Shared {
    calls: Sender<ApiCall>,
    wake: EventFd,
    metrics: Arc<ApiMetrics>,
    /// The largest body taken ([`MAX_PAYLOAD`] unless `--http-api-max-payload-size` says).
    max_payload: usize,
}

/// Binds `path` (which must not exist; see [`bind`]) and serves the API on a new thread named
/// `skiff-api`, taking bodies of at most `max_payload` bytes.
pub fn spawn(
    path: &Path,
    calls: Sender<ApiCall>,
    wake: &EventFd,
    metrics: Arc<ApiMetrics>,
    filters: Filters,
    max_payload: usize,
) -> Result<JoinHandle<()>, ApiServerError> {
    let shared = Arc::new(Shared {
        calls,
        wake: wake.try_clone().map_err(ApiServerError::Thread)?,
        metrics,
        max_payload,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ApiServerError::Thread)?;
    // Everything that can fail without the socket is done; from here a failure must not
    // leave the socket behind, as the caller only takes charge of it on success.
    let listener = bind(path).map_err(|e| ApiServerError::Bind(path.to_owned(), e))?;
    std::thread::Builder::new()
        .name("skiff-api".into())
        .spawn(move || {
            // The socket is bound: from here on the thread only serves what clients send.
            if let Err(e) = filters.apply(ThreadKind::Api) {
                log::error!("API server: {e}; serving no requests");
                return;
            }
            runtime.block_on(serve(listener, shared));
        })
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            ApiServerError::Thread(e)
        })
}

/// Binds and listens on a socket at `path`, which must not exist, with mode 0600.
///
/// The socket is bound in a fresh directory only this user can enter, made private, then
/// renamed to `path`: a client that waits for the file to appear can connect at once (binding
/// in place leaves a moment where the file exists and connections are refused), nobody else
/// can reach it while its mode still follows the umask, and the rename refuses to replace
/// anything created at `path` in the meantime.
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
    })?;
    // Checked first only for a clear error before anything is created; the rename below is
    // what guarantees that nothing is replaced.
    if path.symlink_metadata().is_ok() {
        return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
    }
    let dir = private_dir(path, &name.to_string_lossy())?;
    let tmp = dir.join("s");
    let bound = UnixListener::bind(&tmp).and_then(|listener| {
        listener.set_nonblocking(true)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        rename_no_replace(&tmp, path)?;
        Ok(listener)
    });
    // After a successful rename only the empty directory is left.
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    bound
}

/// Creates a new mode-0700 directory beside `path`, named `.NAME.PID.SALT`. An existing entry
/// (a leftover of a killed Skiff, or something planted) is never reused: another salt is
/// tried.
fn private_dir(path: &Path, name: &str) -> std::io::Result<PathBuf> {
    let salt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for attempt in 0..16 {
        let dir = path.with_file_name(format!(
            ".{name}.{}.{:04x}",
            std::process::id(),
            salt.wrapping_add(attempt) & 0xffff
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EEXIST)))
}

/// Renames `from` to `to`, failing with EEXIST if `to` exists.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c_from = CString::new(from.as_os_str().as_bytes())?;
    let c_to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both pointers are NUL-terminated strings that live across the call, which only
    // reads them; AT_FDCWD makes relative paths resolve as std's own calls do.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // A file system (or kernel) without RENAME_NOREPLACE: link(2) never replaces either.
        Some(libc::EINVAL | libc::ENOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(err),
    }
}

async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("API server: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut failures = AcceptFailures::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                inc(&shared.metrics.server.accept_failures);
                failures.record(&e);
                let out_of_resources = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                let pause = if out_of_resources {
                    ACCEPT_BACKOFF
                } else {
                    ACCEPT_RETRY
                };
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            inc(&shared.metrics.server.connections_refused);
            refuse(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| answer(req, shared.clone()));
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(CLIENT_TIMEOUT)
                // Header names as Firecracker writes them (`Content-Type`, `Deprecation`).
                .title_case_headers(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = result {
                debug!("API connection ended: {e}");
            }
        });
    }
}

/// Answers a connection past the cap with 503 and closes it, at once and without a task, so
/// refusing costs nothing that a client opening connections in a loop could pile up.
fn refuse(stream: tokio::net::UnixStream) {
    // Plain non-blocking calls on the descriptor: tokio's try_read and try_write answer
    // WouldBlock until its event loop has seen the new socket ready.
    let Ok(stream) = stream.into_std() else {
        return;
    };
    // Read what the client already sent: closing a Unix socket with unread data makes the
    // client's next read fail with ECONNRESET instead of returning the answer.
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        if !matches!((&stream).read(&mut buf), Ok(1..)) {
            break;
        }
    }
    // The send buffer of a new socket is empty: the short answer goes out whole or not at all.
    if let Err(e) = (&stream).write(SERVER_FULL) {
        debug!("API server: cannot answer a refused connection: {e}");
    }
}

/// Logs accept failures at most once per [`ACCEPT_LOG_PERIOD`], with the number left unlogged
/// since the last line, so a full file table cannot flood the log.
#[derive(Debug, Default)]
struct AcceptFailures {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    fn record(&mut self, e: &std::io::Error) {
        if self
            .last_logged
            .is_some_and(|t| t.elapsed() < ACCEPT_LOG_PERIOD)
        {
            self.unlogged += 1;
            return;
        }
        if self.unlogged == 0 {
            warn!("API server: accept failed: {e}");
        } else {
            warn!(
                "API server: accept failed: {e} ({} more failures since the last report)",
                self.unlogged
            );
        }
        self.last_logged = Some(Instant::now());
        self.unlogged = 0;
    }
}

async fn answer(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut deprecated = None;
    let response = respond(req, &shared, &mut deprecated).await;
    inc(&shared.metrics.server.requests);
    if response.status >= 400 {
        inc(&shared.metrics.server.errors);
    }
    let mut http = to_http(&response);
    if let Some(message) = deprecated {
        // Firecracker's header, counter and warning for a deprecated field in a request.
        http.headers_mut().insert(
            hyper::header::HeaderName::from_static("deprecation"),
            HeaderValue::from_static("true"),
        );
        inc(&shared.metrics.deprecated.deprecated_http_api_calls);
        log::warn!("{message}");
    }
    Ok(http)
}

/// The deprecation warning for a request that uses a deprecated field, as Firecracker words
/// it: `cpu_template` (set, not null) in `PUT` or `PATCH /machine-config`.
fn deprecation(method: &str, path: &str, body: &[u8]) -> Option<&'static str> {
    if path.trim_end_matches('/') != "/machine-config" {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    if doc
        .get("cpu_template")
        .is_none_or(serde_json::Value::is_null)
    {
        return None;
    }
    match method {
        "PUT" => Some("PUT /machine-config: cpu_template field is deprecated."),
        "PATCH" => Some("PATCH /machine-config: cpu_template field is deprecated."),
        _ => None,
    }
}

async fn respond(
    req: Request<Incoming>,
    shared: &Shared,
    deprecated: &mut Option<&'static str>,
) -> ApiResponse {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let max = shared.max_payload;
    let too_large = |size: String| {
        let message = format!(
            "Request payload with size {size} is larger than the limit of {max} allowed by server."
        );
        // Firecracker's clients read `error`; the API's other faults are `fault_message`.
        ApiResponse {
            status: 400,
            body: Some(serde_json::json!({ "error": message, "fault_message": message })),
        }
    };
    let discard_limit = DISCARD_LIMIT.max(max);
    // Refused without waiting for a body that may never come (a declared length the client
    // does not send held the answer for the read timeout): what arrives within a moment is
    // read and dropped, so that a client still sending is not reset before it reads the
    // answer.
    if let Some(len) = declared.filter(|&l| l > max as u64) {
        let body = Limited::new(req.into_body(), discard_limit);
        let _ = tokio::time::timeout(Duration::from_millis(200), body.collect()).await;
        return too_large(len.to_string());
    }
    // Read (up to the discard limit) even a body that is too large, so the client is not
    // reset while still sending and gets to read the answer.
    let body = Limited::new(req.into_body(), discard_limit);
    let bytes = match tokio::time::timeout(CLIENT_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large(format!("over {discard_limit}"));
        }
        Ok(Err(e)) => return ApiResponse::fault(400, format!("cannot read the request body: {e}")),
        Err(_) => return ApiResponse::fault(400, "timed out reading the request body"),
    };
    if bytes.len() > max {
        return too_large(bytes.len().to_string());
    }
    let request = match route(&method, &path, &bytes) {
        Ok(r) => r,
        Err(response) => {
            shared.metrics.count_request(&method, &path, true);
            return response;
        }
    };
    shared.metrics.count_request(&method, &path, false);
    *deprecated = deprecation(&method, &path, &bytes);
    let (reply, answer) = tokio::sync::oneshot::channel();
    if shared.calls.send((request, reply)).is_err() || shared.wake.write(1).is_err() {
        return ApiResponse::fault(500, "the VMM is shutting down");
    }
    answer
        .await
        .unwrap_or_else(|_| ApiResponse::fault(500, "the VMM is shutting down"))
}

fn to_http(response: &ApiResponse) -> Response<Full<Bytes>> {
    let body = response
        .body
        .as_ref()
        .map(|b| Bytes::from(b.to_string()))
        .unwrap_or_default();
    let mut http = Response::new(Full::new(body));
    *http.status_mut() =
        StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if response.body.is_some() {
        http.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    http
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_full_answer_is_well_formed() {
        let text = std::str::from_utf8(SERVER_FULL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["fault_message"], "Too many open connections");
    }

    #[test]
    fn accept_failures_are_logged_once_per_period() {
        let mut f = AcceptFailures::default();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        f.record(&e);
        let first = f.last_logged;
        for _ in 0..1000 {
            f.record(&e);
        }
        assert_eq!(f.last_logged, first, "logged again within the period");
        assert_eq!(f.unlogged, 1000);
        f.last_logged = Instant::now().checked_sub(ACCEPT_LOG_PERIOD);
        f.record(&e);
        assert_eq!(f.unlogged, 0);
    }

    #[test]
    fn rename_never_replaces() {
        let dir = std::env::temp_dir().join(format!("skiff-rename-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (from, to) = (dir.join("from"), dir.join("to"));
        std::fs::write(&from, "new").unwrap();
        std::fs::write(&to, "old").unwrap();
        let err = rename_no_replace(&from, &to).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "old");
        std::fs::remove_file(&to).unwrap();
        rename_no_replace(&from, &to).unwrap();
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "new");
        assert!(!from.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bound_socket_is_private_and_nothing_is_left_beside_it() {
        let dir = std::env::temp_dir().join(format!("skiff-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["api.sock"]);
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(listener);
        assert!(bind(&path).is_err(), "an existing path must be refused");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
