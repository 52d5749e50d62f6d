//! Content negotiation and request preferences: `Accept`/`_format`, `_pretty`, `Content-Type`,
//! `Prefer: return=…`, and reading a JSON body within the size limit.

use super::ApiError;
use crate::fhir::{Issue, IssueType};
use actix_web::http::header;
use actix_web::{web, HttpRequest};
use futures_util::StreamExt;
use serde_json::{Map, Value};

/// How the response body is written.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    pub pretty: bool,
    /// `application/json` when the client asked for exactly that, else `application/fhir+json`.
    pub plain_json: bool,
}

fn json_media(m: &str) -> Option<bool> {
    // Some(plain_json) when acceptable.
    let essence = m.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/fhir+json" | "json" | "application/json+fhir" => Some(false),
        "application/json" => Some(true),
        "*/*" | "application/*" | "" => Some(false),
        _ => None,
    }
}

/// Query parameters as decoded pairs.
/// Reads an `application/x-www-form-urlencoded` body (`POST [type]/_search`) as pairs.
pub async fn read_form_body(
    req: &HttpRequest,
    mut payload: actix_web::web::Payload,
    limit: usize,
) -> Result<Vec<(String, String)>, ApiError> {
    use futures_util::StreamExt;
    let ct = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(ApiError::UnsupportedMediaType);
    }
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::bad_request(crate::fhir::IssueType::Invalid, "the body could not be read"))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(form_urlencoded::parse(&body).into_owned().collect())
}

pub fn query_pairs(req: &HttpRequest) -> Vec<(String, String)> {
    url_decode_pairs(req.query_string())
}

/// `application/x-www-form-urlencoded` pairs (`+` is a space, `%XX` escapes; invalid escapes
/// are kept as written, invalid UTF-8 is replaced), in order, empty pairs skipped.
pub fn url_decode_pairs(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

impl Format {
    /// `_format` wins over `Accept`; anything that is not JSON is a 406.
    pub fn negotiate(req: &HttpRequest) -> Result<Format, ApiError> {
        let params = query_pairs(req);
        let mut pretty = false;
        let mut plain_json = None;
        for (k, v) in &params {
            match k.as_str() {
                "_format" => plain_json = Some(json_media(v).ok_or(ApiError::NotAcceptable)?),
                "_pretty" => pretty = v == "true",
                _ => {}
            }
        }
        let plain_json = match plain_json {
            Some(p) => p,
            None => match req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
                None => false,
                Some(accept) => {
                    // Acceptable if any listed type is JSON (q=0 means "not this one").
                    let mut found = None;
                    for part in accept.split(',') {
                        let q_zero = part.split(';').skip(1).any(|p| {
                            let p = p.trim();
                            p == "q=0" || p == "q=0.0" || p == "q=0.00" || p == "q=0.000"
                        });
                        if q_zero {
                            continue;
                        }
                        if let Some(p) = json_media(part) {
                            found = Some(found.unwrap_or(true) && p);
                        }
                    }
                    found.ok_or(ApiError::NotAcceptable)?
                }
            },
        };
        Ok(Format { pretty, plain_json })
    }

    pub fn content_type(&self) -> &'static str {
        if self.plain_json {
            "application/json; charset=utf-8"
        } else {
            super::FHIR_JSON
        }
    }

    /// Writes `value`; pretty when `_pretty=true`.
    pub fn render(&self, value: &impl serde::Serialize) -> Vec<u8> {
        if self.pretty {
            serde_json::to_vec_pretty(value)
        } else {
            serde_json::to_vec(value)
        }
        .expect("JSON values serialize")
    }

    /// Writes stored JSON bytes, re-indenting only when `_pretty=true`.
    pub fn render_stored(&self, bytes: Vec<u8>) -> Vec<u8> {
        if !self.pretty {
            return bytes;
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => self.render(&v),
            Err(_) => bytes,
        }
    }
}

/// `Prefer: return=…` (RFC 7240, FHIR 3.1.0.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefer {
    Minimal,
    Representation,
    OperationOutcome,
}

/// `Prefer: handling=strict`: unknown or malformed search parameters are errors rather than
/// ignored (lenient, the default) and reported.
pub fn strict_handling(req: &HttpRequest) -> bool {
    prefers(req, "handling=strict")
}

/// `Prefer: handling=lenient` on a write: elements the R4 definitions do not know are dropped
/// with a warning each, rather than refusing the resource (strict, the default for writes).
pub fn lenient_handling(req: &HttpRequest) -> bool {
    prefers(req, "handling=lenient")
}

/// Whether a `Prefer` header of the request holds `preference` (RFC 7240: comma or semicolon
/// separated, case-insensitive).
pub fn prefers(req: &HttpRequest, preference: &str) -> bool {
    req.headers().get_all("prefer").any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .flat_map(|p| p.split(';'))
                .any(|p| p.trim().eq_ignore_ascii_case(preference))
        })
    })
}

impl Prefer {
    pub fn from_request(req: &HttpRequest) -> Prefer {
        for v in req.headers().get_all("prefer") {
            let Ok(s) = v.to_str() else { continue };
            for part in s.split(',').flat_map(|p| p.split(';')) {
                match part.trim().to_ascii_lowercase().as_str() {
                    "return=minimal" => return Prefer::Minimal,
                    "return=representation" => return Prefer::Representation,
                    "return=operationoutcome" => return Prefer::OperationOutcome,
                    _ => {}
                }
            }
        }
        Prefer::Representation
    }
}

/// Reads a FHIR JSON resource body: content type checked (415), size bounded (413), JSON parsed
/// (400, with position only: parse errors never quote the input), and an object required.
pub async fn read_resource_body(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<Map<String, Value>, ApiError> {
    match read_json_body(req, payload, limit, false).await? {
        (_, Value::Object(m)) => Ok(m),
        _ => Err(ApiError::bad_request(
            IssueType::Structure,
            "the body must be a JSON object (a FHIR resource)",
        )),
    }
}

use crate::fhir::patch::JSON_PATCH;

/// Reads a JSON body (FHIR JSON, or also a JSON Patch document when `json_patch`): returns the
/// media type's essence and the parsed value. Same checks as [`read_resource_body`].
pub async fn read_json_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    json_patch: bool,
) -> Result<(String, Value), ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let fhir = matches!(
        essence.as_str(),
        "application/fhir+json" | "application/json" | "application/json+fhir"
    );
    let patch_doc = json_patch && essence == JSON_PATCH;
    if !fhir && !patch_doc {
        return Err(ApiError::UnsupportedMediaType);
    }
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::bad_request(IssueType::Structure, "the request body could not be read"))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    if body.is_empty() {
        return Err(ApiError::bad_request(
            IssueType::Required,
            "a resource body is required",
        ));
    }
    match crate::fhir::json::parse_strict(&body) {
        Ok(v) => Ok((essence, v)),
        Err(e) => Err(ApiError::BadRequest(vec![Issue::error(
            IssueType::Structure,
            if e.duplicate_key {
                format!("duplicate JSON property at line {} column {}", e.line, e.column)
            } else {
                format!("malformed JSON at line {} column {}", e.line, e.column)
            },
        )])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        let decode = |v: &str| url_decode_pairs(&format!("k={v}"))[0].1.clone();
        assert_eq!(decode("a%7Cb+c"), "a|b c");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("%4"), "%4");
    }
}
