//! A small HTTP/1.1 client for the Manta API.
//!
//! Each request opens its own TCP connection and sends `Connection: close`, so a response ends
//! where the stream ends and a request is never retried on a reused connection (retrying a
//! create the server may already have started would boot a second VM). On loopback the connect
//! costs well under a millisecond, and it is part of what a simple client pays, so it stays in
//! the measured time.

use std::io;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Errors of one request; each names the method and path or the URL.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The server URL cannot be used.
    #[error("URL {url:?} is not supported: {reason}")]
    BadUrl { url: String, reason: &'static str },
    /// The TCP connection could not be made.
    #[error("{method} {path}: cannot connect to {addr}: {source}")]
    Connect {
        method: &'static str,
        path: String,
        addr: String,
        #[source]
        source: io::Error,
    },
    /// Sending the request or reading the response failed.
    #[error("{method} {path}: {source}")]
    Io {
        method: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    /// No complete response arrived in time.
    #[error("{method} {path}: no complete response within {timeout_s} s")]
    Timeout {
        method: &'static str,
        path: String,
        timeout_s: u64,
    },
    /// The bytes that came back are not an HTTP response this client understands.
    #[error("{method} {path}: malformed response: {reason}")]
    Malformed {
        method: &'static str,
        path: String,
        reason: String,
    },
}

/// A status and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A one-line description of a failed response: status, and the API's error code and
    /// message when the body has them.
    pub fn describe_error(&self) -> String {
        if let Some(error) = self.json().as_ref().and_then(|v| v.get("error")) {
            let code = error.get("code").and_then(Value::as_str).unwrap_or("?");
            let message = error.get("message").and_then(Value::as_str).unwrap_or("");
            return format!("HTTP {} {code}: {message}", self.status);
        }
        let text = String::from_utf8_lossy(&self.body);
        let text: String = text.chars().take(300).collect();
        format!("HTTP {}: {}", self.status, text.trim())
    }
}

/// Where the API is, and how to authenticate.
#[derive(Debug, Clone)]
pub struct ApiClient {
    /// `host:port` to connect to.
    authority: String,
    /// Path prefix from the URL ("" for none).
    base_path: String,
    token: Option<String>,
    timeout: Duration,
}

impl ApiClient {
    /// A client for `url` (`http://host[:port][/prefix]`).
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> Result<Self, HttpError> {
        let bad = |reason| HttpError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            bad("only plain http:// URLs are supported (the server listens on loopback)")
        })?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains('@') {
            return Err(bad(
                "credentials in the URL; use --token or MANTA_API_TOKEN",
            ));
        }
        let has_port = match authority.rfind(']') {
            Some(bracket) => authority[bracket..].contains(':'),
            None => authority.contains(':'),
        };
        let authority = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(ApiClient {
            authority,
            base_path: path.trim_end_matches('/').to_string(),
            token,
            timeout,
        })
    }

    /// Sends one request and reads the whole response.
    pub async fn send(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<HttpResponse, HttpError> {
        let full_path = format!("{}{path}", self.base_path);
        let request = self.encode(method, &full_path, body);
        let exchange = async {
            let mut stream = TcpStream::connect(&self.authority)
                .await
                .map_err(|source| HttpError::Connect {
                    method,
                    path: full_path.clone(),
                    addr: self.authority.clone(),
                    source,
                })?;
            let io_err = |source| HttpError::Io {
                method,
                path: full_path.clone(),
                source,
            };
            // Requests are small: one write, and no Nagle delay on the way out.
            stream.set_nodelay(true).map_err(io_err)?;
            stream.write_all(&request).await.map_err(io_err)?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.map_err(io_err)?;
            parse_response(&raw).map_err(|reason| HttpError::Malformed {
                method,
                path: full_path.clone(),
                reason,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                method,
                path: full_path.clone(),
                timeout_s: self.timeout.as_secs(),
            })?
    }

    fn encode(&self, method: &str, path: &str, body: Option<&Value>) -> Vec<u8> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.authority
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        if method != "GET" {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

/// Parses a complete HTTP/1.1 response (the connection was closed after it).
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {} bytes", raw.len()))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }

    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = content_length {
        rest.get(..len)
            .ok_or_else(|| format!("body ended after {} of {len} bytes", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, body })
}

/// Decodes a chunked body; the stream must hold the final zero-size chunk.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line not terminated")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        if size == 0 {
            return Ok(body);
        }
        let start = line_end + 2;
        let chunk = rest
            .get(start..start + size)
            .ok_or("body ended inside a chunk")?;
        body.extend_from_slice(chunk);
        rest = rest.get(start + size + 2..).ok_or("chunk not terminated")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_table() {
        let t = Duration::from_secs(1);
        let ok = [
            ("http://127.0.0.1:8080", "127.0.0.1:8080", ""),
            ("http://127.0.0.1:8080/", "127.0.0.1:8080", ""),
            ("http://localhost/api/", "localhost:80", "/api"),
            ("http://[::1]:9000", "[::1]:9000", ""),
            ("http://[::1]", "[::1]:80", ""),
        ];
        for (url, authority, base) in ok {
            let c = ApiClient::new(url, None, t).unwrap();
            assert_eq!(
                (c.authority.as_str(), c.base_path.as_str()),
                (authority, base)
            );
        }
        for bad in ["https://x", "127.0.0.1:8080", "http://", "http://u:p@host"] {
            assert!(
                ApiClient::new(bad, None, t).is_err(),
                "{bad} must be refused"
            );
        }
    }

    #[test]
    fn request_carries_token_and_length() {
        let c =
            ApiClient::new("http://h:1", Some("s3cret".into()), Duration::from_secs(1)).unwrap();
        let body = serde_json::json!({"a": 1});
        let text = String::from_utf8(c.encode("POST", "/create", Some(&body))).unwrap();
        assert!(
            text.starts_with("POST /create HTTP/1.1\r\nHost: h:1\r\n"),
            "{text}"
        );
        assert!(text.contains("Authorization: Bearer s3cret\r\n"), "{text}");
        assert!(
            text.ends_with("Content-Length: 7\r\n\r\n{\"a\":1}"),
            "{text}"
        );
        let get = String::from_utf8(c.encode("GET", "/healthz", None)).unwrap();
        assert!(!get.contains("Content-Length"), "{get}");
    }

    /// Raw response bytes, and the status and body they must parse to (or `Err` if they must not).
    type ResponseCase = (&'static [u8], Result<(u16, &'static [u8]), ()>);

    #[test]
    fn response_table() {
        let cases: &[ResponseCase] = &[
            (
                b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}",
                Ok((201, b"{}")),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
                Ok((200, b"abcde")),
            ),
            (b"HTTP/1.1 204 No Content\r\n\r\n", Ok((204, b""))),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", Err(())),
            (b"HTTP/1.1 200 OK\r\n", Err(())),
            (b"SSH-2.0-OpenSSH\r\n\r\n", Err(())),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", Err(())),
        ];
        for (raw, want) in cases {
            let got = parse_response(raw)
                .map(|r| (r.status, r.body))
                .map_err(|_| ());
            let want = want.map(|(s, b)| (s, b.to_vec()));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn error_descriptions() {
        let api = HttpResponse {
            status: 503,
            body: br#"{"error":{"code":"at_capacity","message":"capacity reached"}}"#.to_vec(),
        };
        assert_eq!(
            api.describe_error(),
            "HTTP 503 at_capacity: capacity reached"
        );
        let plain = HttpResponse {
            status: 502,
            body: b"bad gateway\n".to_vec(),
        };
        assert_eq!(plain.describe_error(), "HTTP 502: bad gateway");
    }
}
