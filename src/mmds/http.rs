//! The service's HTTP/1.1: one request parsed from the bytes up to its blank line, answered
//! from the data store, exactly as Firecracker's MMDS answers (its micro-http parser's rules
//! and texts, its status codes and bodies, its response layout).
//!
//! - `GET PATH`: the value at PATH (a JSON pointer, `//` collapsed) as IMDS text, or as JSON
//!   with `Accept: application/json`; V2 needs `X-metadata-token` (or
//!   `X-aws-ec2-metadata-token`) holding a valid token, else 401.
//! - `PUT /latest/api/token` with `X-metadata-token-ttl-seconds` (or the `X-aws-ec2-` form),
//!   1 to 21600: a new token, as text. Refused with `X-Forwarded-For`.
//! - `PATCH`, `DELETE`: 405 with `Allow: GET, PUT`; other methods 501.
//!
//! A request carrying a body is refused as micro-http refuses it ("Invalid request."). Where
//! Firecracker's answer differs from its own documentation, with `imds_compat` the answer's
//! Content-Type is `text/plain` as documented (Firecracker 1.16 sends the Accept header's type
//! over an IMDS text body).

use super::{Mmds, MmdsError, MmdsVersion, OutputFormat};
use crate::metrics::inc;

/// The token path.
pub const PATH_TO_TOKEN: &str = "/latest/api/token";

const X_FORWARDED_FOR: &str = "x-forwarded-for";
const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];

/// HTTP versions micro-http speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1 (also the version of answers to requests that did not parse).
    Http11,
}

impl Version {
    fn text(self) -> &'static str {
        match self {
            Self::Http10 => "HTTP/1.0",
            Self::Http11 => "HTTP/1.1",
        }
    }
}

/// The methods micro-http knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Put,
    Patch,
    Delete,
}

/// The media types micro-http knows; text unless JSON is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaType {
    /// `text/plain`.
    PlainText,
    /// `application/json`.
    ApplicationJson,
}

impl MediaType {
    fn parse(value: &str) -> Option<Self> {
        match value.trim() {
            "text/plain" => Some(Self::PlainText),
            "application/json" => Some(Self::ApplicationJson),
            _ => None,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Self::PlainText => "text/plain",
            Self::ApplicationJson => "application/json",
        }
    }
}

/// Why a request did not parse: status and body, as micro-http and Firecracker's MMDS give them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParseError(u16, String);

impl ParseError {
    fn invalid() -> Self {
        Self(400, "Invalid request.".into())
    }
}

/// A parsed request: what the answer depends on.
#[derive(Debug)]
struct Request<'a> {
    method: Method,
    uri: &'a str,
    version: Version,
    accept: MediaType,
    /// Headers micro-http does not know, as given (names and values trimmed), in order.
    custom: Vec<(&'a str, &'a str)>,
}

impl Request<'_> {
    /// The value of the last header named (case aside) one of `names`, with the name as given.
    fn header(&self, names: &[&str]) -> Option<(&str, &str)> {
        (self.custom.iter().rev())
            .find(|(k, _)| names.iter().any(|n| k.eq_ignore_ascii_case(n)))
            .copied()
    }

    /// The absolute path of the URI: after `http://host` in the absolute form, the URI itself
    /// when it starts with `/`, else empty.
    fn path(&self) -> &str {
        match self.uri.strip_prefix("http://") {
            Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
            None if self.uri.starts_with('/') => self.uri,
            None => "",
        }
    }
}

/// Parses `bytes` (a request up to and including its blank line) as micro-http does.
fn parse(bytes: &[u8]) -> Result<Request<'_>, ParseError> {
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let line_end = find(bytes, b"\r\n").ok_or_else(ParseError::invalid)?;
    let line = &bytes[..line_end];
    // "GET" SP uri SP "HTTP/1.x": the shortest line that can be a request.
    if line.len() < 14 {
        return Err(ParseError::invalid());
    }
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(method), Some(uri), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::invalid());
    };
    let method = match method {
        b"GET" => Method::Get,
        b"PUT" => Method::Put,
        b"PATCH" => Method::Patch,
        b"DELETE" => Method::Delete,
        _ => return Err(ParseError(501, "Unsupported HTTP method.".into())),
    };
    if uri.is_empty() {
        return Err(ParseError(400, "Empty URI not allowed.".into()));
    }
    let uri = std::str::from_utf8(uri)
        .map_err(|_| ParseError(400, "Cannot parse URI as UTF-8.".into()))?;
    let version = match version {
        b"HTTP/1.0" => Version::Http10,
        b"HTTP/1.1" => Version::Http11,
        _ => return Err(ParseError(501, "Unsupported HTTP version.".into())),
    };
    let mut request = Request {
        method,
        uri,
        version,
        accept: MediaType::PlainText,
        custom: Vec::new(),
    };
    let rest = &bytes[line_end..];
    let headers_end = find(rest, b"\r\n\r\n").ok_or_else(ParseError::invalid)?;
    if headers_end == 0 {
        return Ok(request);
    }
    let text = std::str::from_utf8(&rest[2..headers_end]).map_err(|_| ParseError::invalid())?;
    let mut content_length = 0u32;
    for line in text.split("\r\n") {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ParseError(
                400,
                format!("Header is incorrectly formatted. Key: {line}"),
            ));
        };
        let invalid_value = |name: &str, value: &str| {
            ParseError(400, format!("Invalid value. Key:{name}; Value:{value}"))
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length = value
                    .trim()
                    .parse()
                    .map_err(|_| invalid_value(name, value))?;
            }
            "accept" => {
                // A type micro-http does not know is ignored, as are these others'.
                if let Some(t) = MediaType::parse(value) {
                    request.accept = t;
                }
            }
            "content-type" | "transfer-encoding" | "expect" | "server" => {}
            "accept-encoding" => {
                let value = value.trim();
                if value.is_empty() {
                    return Err(ParseError::invalid());
                }
                for encoding in value.split(',') {
                    let e = encoding.trim();
                    if e == "identity;q=0" || (e == "*;q=0" && !value.contains("identity")) {
                        return Err(invalid_value("Accept-Encoding", encoding));
                    }
                }
            }
            _ => request.custom.push((name.trim(), value.trim())),
        }
    }
    // The request ends at its blank line, so a body it announces is never there.
    if content_length > 0 {
        return Err(ParseError::invalid());
    }
    Ok(request)
}

/// An answer, written out as micro-http writes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The request's version (HTTP/1.1 when it did not parse).
    pub version: Version,
    /// Status code.
    pub status: u16,
    /// Content-Type.
    pub content_type: MediaType,
    /// `Allow: GET, PUT` (with 405).
    pub allow: bool,
    /// One more header (the token's time to live, with the name as the request gave it).
    pub extra: Option<(String, String)>,
    /// The body.
    pub body: String,
}

impl Response {
    fn new(version: Version, status: u16, content_type: MediaType, body: String) -> Self {
        Self {
            version,
            status,
            content_type,
            allow: false,
            extra: None,
            body,
        }
    }

    fn text(version: Version, status: u16, body: impl Into<String>) -> Self {
        Self::new(version, status, MediaType::PlainText, body.into())
    }

    /// The bytes on the wire. micro-http writes no reason phrase and names the server
    /// "Firecracker API"; Skiff answers byte for byte the same, for guests written against it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n",
            self.version.text(),
            self.status
        );
        if self.allow {
            head.push_str("Allow: GET, PUT\r\n");
        }
        if let Some((name, value)) = &self.extra {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!(
            "Content-Type: {}\r\nContent-Length: {}\r\n\r\n",
            self.content_type.text(),
            self.body.len()
        ));
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

/// Collapses every run of `/` into one, as Firecracker makes a path a JSON pointer.
fn sanitize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// The answer to the request in `bytes` (up to and including its blank line).
pub fn answer(mmds: &mut Mmds, bytes: &[u8]) -> Response {
    let request = match parse(bytes) {
        Ok(r) => r,
        Err(ParseError(status, body)) => return Response::text(Version::Http11, status, body),
    };
    let version = request.version;
    let path = request.path();
    if path.is_empty() {
        return Response::text(version, 400, "Invalid URI.");
    }
    match request.method {
        Method::Get => {
            let token = request.header(&TOKEN_HEADERS).map(|(_, t)| t);
            let valid = token.map(|t| mmds.is_valid_token(t));
            match valid {
                None => inc(&mmds.metrics().rx_no_token),
                Some(false) => inc(&mmds.metrics().rx_invalid_token),
                Some(true) => {}
            }
            if mmds.version() == MmdsVersion::V2 {
                match valid {
                    None => return Response::text(
                        version,
                        401,
                        "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header to specify the session token.",
                    ),
                    Some(false) => return Response::text(version, 401, "MMDS token not valid."),
                    Some(true) => {}
                }
            }
            get(mmds, &request, path)
        }
        Method::Put => put(mmds, &request, path),
        Method::Patch | Method::Delete => {
            let mut r = Response::text(version, 405, "Not allowed HTTP method.");
            r.allow = true;
            r
        }
    }
}

fn get(mmds: &Mmds, request: &Request<'_>, path: &str) -> Response {
    let version = request.version;
    let format = match request.accept {
        MediaType::ApplicationJson => OutputFormat::Json,
        MediaType::PlainText => OutputFormat::Imds,
    };
    let content_type = if mmds.imds_compat() {
        MediaType::PlainText
    } else {
        request.accept
    };
    match mmds.get_value(&sanitize(path), format) {
        Ok(body) => Response::new(version, 200, content_type, body),
        Err(MmdsError::NotFound) => {
            Response::text(version, 404, format!("Resource not found: {path}."))
        }
        Err(e @ MmdsError::UnsupportedValueType) => Response::text(version, 501, e.to_string()),
        Err(e) => Response::text(version, 413, e.to_string()),
    }
}

fn put(mmds: &mut Mmds, request: &Request<'_>, path: &str) -> Response {
    let version = request.version;
    if let Some((name, _)) = request.header(&[X_FORWARDED_FOR]) {
        return Response::text(
            version,
            400,
            format!("Invalid header. Reason: Unsupported header name. Key: {name}"),
        );
    }
    if sanitize(path) != PATH_TO_TOKEN {
        return Response::text(version, 404, format!("Resource not found: {path}."));
    }
    let Some((name, value)) = request.header(&TTL_HEADERS) else {
        return Response::text(
            version,
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Response::text(
            version,
            400,
            format!("Invalid header. Reason: Invalid value. Key:{name}; Value:{value}"),
        );
    };
    match mmds.generate_token(ttl) {
        Ok(token) => {
            let mut r = Response::text(version, 200, token);
            r.extra = Some((name.to_owned(), ttl.to_string()));
            r
        }
        Err(MmdsError::TokenAuthority(e)) => Response::text(version, 400, e.to_string()),
        Err(e) => Response::text(version, 400, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmds::MmdsStore;
    use serde_json::json;

    fn store(version: MmdsVersion) -> MmdsStore {
        let s = MmdsStore::default();
        s.put(json!({
            "name": {"first": "John", "second": "Doe"},
            "age": 43,
            "phones": {"home": {"RO": "+401234567", "UK": "+441234567"}, "mobile": "+442345678"}
        }))
        .unwrap();
        s.configure(version, false);
        s
    }

    fn ask(s: &MmdsStore, raw: &str) -> Response {
        answer(&mut s.lock(), raw.as_bytes())
    }

    fn token(s: &MmdsStore) -> String {
        let r = ask(
            s,
            "PUT http://169.254.169.254/latest/api/token HTTP/1.0\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.extra,
            Some(("X-metadata-token-ttl-seconds".into(), "60".into()))
        );
        r.body
    }

    #[test]
    fn answers_are_written_as_micro_http_writes_them() {
        let s = store(MmdsVersion::V1);
        let r = ask(&s, "GET /name HTTP/1.1\r\n\r\n");
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "HTTP/1.1 200 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
             Content-Type: text/plain\r\nContent-Length: 12\r\n\r\nfirst\nsecond"
        );
        let r = ask(&s, "PATCH http://169.254.169.255/ HTTP/1.0\r\n\r\n");
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "HTTP/1.0 405 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
             Allow: GET, PUT\r\nContent-Type: text/plain\r\nContent-Length: 24\r\n\r\n\
             Not allowed HTTP method."
        );
    }

    #[test]
    fn accept_header_picks_json_or_imds() {
        let s = store(MmdsVersion::V1);
        for (accept, json) in [
            ("", false),
            ("Accept:\r\n", false),
            ("Accept: */*\r\n", false),
            ("Accept: text/plain\r\n", false),
            ("Accept: application/json\r\n", true),
        ] {
            let r = ask(
                &s,
                &format!("GET http://169.254.169.254/ HTTP/1.0\r\n{accept}\r\n"),
            );
            assert_eq!(r.status, 200);
            if json {
                assert_eq!(r.content_type, MediaType::ApplicationJson);
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                assert_eq!(v, s.data());
            } else {
                assert_eq!(r.content_type, MediaType::PlainText, "{accept}");
                assert_eq!(r.body, "age\nname/\nphones/");
            }
        }
        s.configure(MmdsVersion::V1, true);
        let r = ask(
            &s,
            "GET /name/first HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!(
            (r.content_type, r.body.as_str()),
            (MediaType::PlainText, "John")
        );
    }

    #[test]
    fn v2_needs_a_valid_token_and_v1_counts_what_it_lacks() {
        let s = store(MmdsVersion::V2);
        let r = ask(&s, "GET http://169.254.169.254/ HTTP/1.0\r\n\r\n");
        assert_eq!(r.status, 401);
        assert!(r
            .body
            .starts_with("No MMDS token provided. Use `X-metadata-token`"));
        let r = ask(
            &s,
            "GET / HTTP/1.0\r\nX-metadata-token: INVALID_TOKEN\r\n\r\n",
        );
        assert_eq!((r.status, r.body.as_str()), (401, "MMDS token not valid."));
        let t = token(&s);
        for name in ["X-metadata-token", "x-AWS-ec2-metadata-token"] {
            let r = ask(
                &s,
                &format!("GET /name/first HTTP/1.1\r\n{name}: {t}\r\n\r\n"),
            );
            assert_eq!((r.status, r.body.as_str()), (200, "John"), "{name}");
        }
        let m = s.metrics();
        assert_eq!(m.rx_no_token.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(
            m.rx_invalid_token
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );

        let v1 = store(MmdsVersion::V1);
        for raw in [
            "GET /name/first HTTP/1.1\r\n\r\n",
            "GET /name/first HTTP/1.1\r\nX-metadata-token: bad\r\n\r\n",
        ] {
            assert_eq!(ask(&v1, raw).body, "John");
        }
        let m = v1.metrics();
        assert_eq!(m.rx_no_token.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(
            m.rx_invalid_token
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn token_requests_get_firecrackers_answers() {
        let s = store(MmdsVersion::V2);
        let cases = [
            (
                "PUT /latest/api/token HTTP/1.0\r\nX-Forwarded-For: 203.0.113.195\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
                400,
                "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For",
            ),
            (
                "PUT /token HTTP/1.0\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
                404,
                "Resource not found: /token.",
            ),
            (
                "PUT /latest/api/token HTTP/1.0\r\nX-metadata-token-ttl-seconds: application/json\r\n\r\n",
                400,
                "Invalid header. Reason: Invalid value. Key:X-metadata-token-ttl-seconds; Value:application/json",
            ),
            (
                "PUT /latest/api/token HTTP/1.0\r\nX-metadata-token-ttl-seconds: 21601\r\n\r\n",
                400,
                "Invalid time to live value provided for token: 21601. Please provide a value between 1 and 21600.",
            ),
            (
                "PUT /latest/api/token HTTP/1.0\r\n\r\n",
                400,
                "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
            ),
        ];
        for (raw, status, body) in cases {
            let r = ask(&s, raw);
            assert_eq!((r.status, r.body.as_str()), (status, body), "{raw:?}");
        }
        // Doubled slashes are collapsed before the path is compared.
        let r = ask(
            &s,
            "PUT //latest//api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 5\r\n\r\n",
        );
        assert_eq!(r.status, 200);
        assert!(s.lock().is_valid_token(&r.body));
    }

    #[test]
    fn get_errors_and_paths() {
        let s = store(MmdsVersion::V1);
        let cases = [
            (
                "GET http://169.254.169.254/invalid HTTP/1.0\r\n\r\n",
                404,
                "Resource not found: /invalid.",
            ),
            (
                "GET /age HTTP/1.1\r\n\r\n",
                501,
                "Cannot retrieve value. The value has an unsupported type.",
            ),
            ("GET http:// HTTP/1.0\r\n\r\n", 400, "Invalid URI."),
            ("GET nopath HTTP/1.0\r\n\r\n", 400, "Invalid URI."),
            ("GET ///phones//home/ HTTP/1.1\r\n\r\n", 200, "RO\nUK"),
            ("DELETE / HTTP/1.1\r\n\r\n", 405, "Not allowed HTTP method."),
        ];
        for (raw, status, body) in cases {
            let r = ask(&s, raw);
            assert_eq!((r.status, r.body.as_str()), (status, body), "{raw:?}");
        }
    }

    /// What micro-http refuses, with its texts, answered as HTTP/1.1.
    #[test]
    fn malformed_requests_get_micro_http_errors() {
        let s = store(MmdsVersion::V1);
        let cases: [(&[u8], u16, &str); 12] = [
            (b"GET / HTTP/1.1\n\n", 400, "Invalid request."),
            (b"GET / H\r\n\r\n", 400, "Invalid request."),
            (b"GETT/HTTP/1.1xx\r\n\r\n", 400, "Invalid request."),
            (b"POST / HTTP/1.1\r\n\r\n", 501, "Unsupported HTTP method."),
            (b"GET  HTTP/1.1xxxx\r\n\r\n", 400, "Empty URI not allowed."),
            (
                b"GET /\xff HTTP/1.1\r\n\r\n",
                400,
                "Cannot parse URI as UTF-8.",
            ),
            (b"GET / HTTP/2.0\r\n\r\n", 501, "Unsupported HTTP version."),
            (
                b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
                400,
                "Header is incorrectly formatted. Key: no colon",
            ),
            (
                b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                400,
                "Invalid value. Key:Content-Length; Value: x",
            ),
            (
                b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
                400,
                "Invalid request.",
            ),
            (
                b"GET / HTTP/1.1\r\nA: \xff\r\n\r\n",
                400,
                "Invalid request.",
            ),
            (
                b"GET / HTTP/1.1\r\nAccept-Encoding: identity;q=0\r\n\r\n",
                400,
                "Invalid value. Key:Accept-Encoding; Value:identity;q=0",
            ),
        ];
        for (raw, status, body) in cases {
            let r = answer(&mut s.lock(), raw);
            assert_eq!((r.status, r.body.as_str()), (status, body), "{raw:?}");
            assert_eq!(r.version, Version::Http11);
        }
    }
}
