//! The HTTP API: routes, request and response bodies, and the one place where errors become
//! status codes.
//!
//! Bodies are parsed here rather than by axum's `Json` extractor, so that every malformed
//! request (bad JSON, wrong types, unknown fields, a missing content type) gets the same JSON
//! error shape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tracing::{Instrument, info_span};

use crate::sandbox::{CreateParams, SandboxError, Sandboxes};

/// Largest request body accepted (commands are the only big field).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Limits on create parameters.
const VCPUS_MAX: u8 = 32;
const MEM_MIB_MIN: u32 = 128;
const MEM_MIB_MAX: u32 = 32 * 1024;
const BOOT_TIMEOUT_S_MAX: u64 = 600;
/// Exec timeout when the caller gives none, and the longest allowed.
const EXEC_TIMEOUT_DEFAULT_S: f64 = 60.0;
const EXEC_TIMEOUT_MAX_S: f64 = 3600.0;

/// A JSON error: `{"error": {"code", "message"}}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        let (status, code) = match &e {
            SandboxError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            SandboxError::WrongState { .. } => (StatusCode::CONFLICT, "wrong_state"),
            SandboxError::AtCapacity { .. } => (StatusCode::SERVICE_UNAVAILABLE, "at_capacity"),
            SandboxError::PoolExhausted => (StatusCode::SERVICE_UNAVAILABLE, "pool_exhausted"),
            SandboxError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            SandboxError::CreateFailed { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "create_failed")
            }
            SandboxError::BootTimeout { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "boot_timeout"),
            SandboxError::ExecFailed { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "exec_failed"),
            SandboxError::DestroyedDuringExec(_) => (StatusCode::CONFLICT, "destroyed_during_exec"),
            SandboxError::TeardownIncomplete { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "teardown_incomplete")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    vcpus: Option<u8>,
    mem_mib: Option<u32>,
    boot_timeout_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    sandbox_id: String,
    cmd: String,
    timeout_s: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestroyBody {
    sandbox_id: String,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub sandboxes: Arc<Sandboxes>,
    pub api_token: Option<Arc<String>>,
}

/// The API router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/create", post(create))
        .route("/exec", post(exec))
        .route("/destroy", post(destroy))
        .route("/sandboxes", get(list))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let parsed: CreateBody = if body.iter().all(u8::is_ascii_whitespace) {
        CreateBody::default()
    } else {
        parse(&body)?
    };
    let params = create_params(&parsed)?;
    // Create and destroy run as tasks of their own: a client that hangs up must not cancel
    // them half-way, which would strand a sandbox in "creating" or "destroying".
    let sandboxes = Arc::clone(&state.sandboxes);
    let created = detached(async move { sandboxes.create(params).await }).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

fn create_params(body: &CreateBody) -> Result<CreateParams, ApiError> {
    let vcpus = body.vcpus.unwrap_or(1);
    if !(1..=VCPUS_MAX).contains(&vcpus) {
        return Err(ApiError::invalid(format!(
            "vcpus must be between 1 and {VCPUS_MAX}, got {vcpus}"
        )));
    }
    let mem_mib = body.mem_mib.unwrap_or(256);
    if !(MEM_MIB_MIN..=MEM_MIB_MAX).contains(&mem_mib) {
        return Err(ApiError::invalid(format!(
            "mem_mib must be between {MEM_MIB_MIN} and {MEM_MIB_MAX}, got {mem_mib}"
        )));
    }
    let boot_timeout_s = body.boot_timeout_s.unwrap_or(60);
    if !(1..=BOOT_TIMEOUT_S_MAX).contains(&boot_timeout_s) {
        return Err(ApiError::invalid(format!(
            "boot_timeout_s must be between 1 and {BOOT_TIMEOUT_S_MAX}, got {boot_timeout_s}"
        )));
    }
    Ok(CreateParams {
        vcpus,
        mem_mib,
        boot_timeout: Duration::from_secs(boot_timeout_s),
    })
}

async fn exec(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: ExecBody = parse(&body.map_err(body_error)?)?;
    if body.cmd.trim().is_empty() {
        return Err(ApiError::invalid("cmd must not be empty"));
    }
    if body.cmd.contains('\0') {
        return Err(ApiError::invalid("cmd must not contain NUL bytes"));
    }
    let timeout_s = body.timeout_s.unwrap_or(EXEC_TIMEOUT_DEFAULT_S);
    if !(timeout_s > 0.0 && timeout_s <= EXEC_TIMEOUT_MAX_S) {
        return Err(ApiError::invalid(format!(
            "timeout_s must be more than 0 and at most {EXEC_TIMEOUT_MAX_S}, got {timeout_s}"
        )));
    }

    let started = Instant::now();
    let span = info_span!("exec", sandbox_id = %body.sandbox_id);
    // Detached too: a command whose client hung up still ends by its timeout, and its
    // processes are killed then, rather than being left running with nobody waiting.
    let sandboxes = Arc::clone(&state.sandboxes);
    let (id, cmd) = (body.sandbox_id.clone(), body.cmd);
    let timeout = Duration::from_secs_f64(timeout_s);
    let work = async move { sandboxes.exec(&id, &cmd, timeout).await };
    let out = detached(work.instrument(span.clone()))
        .await
        .inspect_err(|e| span.in_scope(|| tracing::warn!(error = ?e, "exec failed")))?;
    let duration_ms = crate::sandbox::ms_since(started);
    span.in_scope(|| tracing::info!(duration_ms, exit_code = ?out.exit_code, timed_out = out.timed_out, "exec done"));

    let mut response = json!({
        "exit_code": out.exit_code,
        "duration_ms": duration_ms,
        "timed_out": out.timed_out,
        "truncated": out.truncated,
    });
    put_stream(&mut response, "stdout", &out.stdout);
    put_stream(&mut response, "stderr", &out.stderr);
    if let Some(signal) = &out.signal {
        response["signal"] = json!(signal);
    }
    Ok(Json(response).into_response())
}

/// Runs `work` on its own task and waits for it; the work goes on if the caller is dropped.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, SandboxError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(work).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the request's task failed: {e}"),
        )),
    }
}

/// Adds `name` as text; when the bytes are not valid UTF-8, the text is a lossy rendering and
/// `<name>_b64` carries the exact bytes.
fn put_stream(response: &mut Value, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => response[name] = json!(text),
        Err(_) => {
            response[name] = json!(String::from_utf8_lossy(bytes));
            response[format!("{name}_b64")] =
                json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
}

async fn destroy(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: DestroyBody = parse(&body.map_err(body_error)?)?;
    let sandboxes = Arc::clone(&state.sandboxes);
    let id = body.sandbox_id.clone();
    let duration_ms = detached(async move { sandboxes.destroy(&id).await }).await?;
    Ok(Json(
        json!({ "sandbox_id": body.sandbox_id, "destroyed": true, "duration_ms": duration_ms }),
    )
    .into_response())
}

async fn list(State(state): State<AppState>) -> Response {
    Json(json!({ "sandboxes": state.sandboxes.list() })).into_response()
}

async fn healthz(State(state): State<AppState>) -> Response {
    let sandboxes = &state.sandboxes;
    Json(json!({
        "status": "ok",
        "vmm": sandboxes.backend().name(),
        "live_sandboxes": sandboxes.live_count(),
        "max_sandboxes": sandboxes.config().max_sandboxes,
    }))
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        "no such endpoint; see POST /create, /exec, /destroy and GET /sandboxes, /healthz",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "wrong HTTP method for this endpoint",
    )
}

/// Requires `Authorization: Bearer <MANTA_API_TOKEN>` when a token is configured
/// (`/healthz` stays open so probes need no secret).
async fn authorize(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.api_token else {
        return next.run(request).await;
    };
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        return next.run(request).await;
    }
    let message = if presented.is_empty() {
        "missing bearer token: send Authorization: Bearer <MANTA_API_TOKEN>"
    } else {
        "wrong bearer token"
    };
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

fn body_error(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            status,
            "body_too_large",
            format!("request body is larger than {MAX_BODY_BYTES} bytes"),
        );
    }
    ApiError::new(StatusCode::BAD_REQUEST, "bad_body", rejection.body_text())
}

/// Parses a JSON body: syntax errors are 400 `malformed_json`, shape errors (missing fields,
/// wrong types, unknown fields) are 422 `invalid_request`.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde would also read a struct from a JSON array by position; only objects are API.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'[')) {
        return Err(ApiError::invalid(
            "request body must be a JSON object, not an array",
        ));
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::invalid(format!("invalid request body: {e}"))
        }
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("request body is not valid JSON: {e}"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_parsing_table() {
        type Case = (&'static str, Result<(), (u16, &'static str)>);
        let exec_cases: &[Case] = &[
            (r#"{"sandbox_id":"sb-1","cmd":"echo hi"}"#, Ok(())),
            (r#"{"sandbox_id":"sb-1","cmd":"x","timeout_s":2.5}"#, Ok(())),
            (r#"{"sandbox_id":"sb-1""#, Err((400, "malformed_json"))),
            ("not json", Err((400, "malformed_json"))),
            ("", Err((400, "malformed_json"))),
            (r#"{"sandbox_id":"sb-1"}"#, Err((422, "invalid_request"))),
            (r#"{"cmd":"x"}"#, Err((422, "invalid_request"))),
            (
                r#"{"sandbox_id":5,"cmd":"x"}"#,
                Err((422, "invalid_request")),
            ),
            (
                r#"{"sandbox_id":"sb-1","cmd":["x"]}"#,
                Err((422, "invalid_request")),
            ),
            (
                r#"{"sandbox_id":"sb-1","cmd":"x","extra":1}"#,
                Err((422, "invalid_request")),
            ),
            (r#"[1,2]"#, Err((422, "invalid_request"))),
        ];
        for (body, want) in exec_cases {
            let got = parse::<ExecBody>(body.as_bytes())
                .map(|_| ())
                .map_err(|e| (e.status.as_u16(), e.code));
            assert_eq!(&got, want, "body {body}");
        }
    }

    #[test]
    fn create_limits() {
        let ok = create_params(&CreateBody::default()).unwrap();
        assert_eq!(
            (ok.vcpus, ok.mem_mib, ok.boot_timeout.as_secs()),
            (1, 256, 60)
        );
        for bad in [
            CreateBody {
                vcpus: Some(0),
                ..Default::default()
            },
            CreateBody {
                vcpus: Some(33),
                ..Default::default()
            },
            CreateBody {
                mem_mib: Some(64),
                ..Default::default()
            },
            CreateBody {
                boot_timeout_s: Some(0),
                ..Default::default()
            },
            CreateBody {
                boot_timeout_s: Some(601),
                ..Default::default()
            },
        ] {
            let err = create_params(&bad).unwrap_err();
            assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
        }
    }

    #[test]
    fn invalid_utf8_comes_back_intact() {
        let mut response = json!({});
        put_stream(&mut response, "stdout", &[0x66, 0xff, 0x00, 0x67]);
        assert_eq!(response["stdout_b64"], "Zv8AZw==");
        put_stream(&mut response, "stderr", b"plain");
        assert_eq!(response["stderr"], "plain");
        assert!(response.get("stderr_b64").is_none());
    }
}
