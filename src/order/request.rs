//! Reading an order request and writing the answers: the JSON body checked field by field,
//! and every refusal as `{error, field?}` with a status that tells the client what to do.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use crate::event::Order;

pub(super) type HttpResponse = Response<Full<Bytes>>;

pub(super) fn json_response(status: StatusCode, body: &Value) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(super) fn error_response(status: StatusCode, error: &str, field: Option<&str>) -> HttpResponse {
    let body = match field {
        Some(field) => json!({ "error": error, "field": field }),
        None => json!({ "error": error }),
    };
    json_response(status, &body)
}

pub(super) fn unavailable(error: &str) -> HttpResponse {
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, error, None);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// A request the API refuses, with the status and field to report.
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) error: String,
    pub(super) field: Option<String>,
}

impl Refusal {
    pub(super) fn unavailable(error: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: error.into(),
            field: None,
        }
    }

    pub(super) fn bad(error: impl Into<String>, field: Option<String>) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            error: error.into(),
            field,
        }
    }
}

pub(super) const ORDER_FIELDS: [&str; 5] = ["orderId", "amount", "currency", "customerId", "items"];
pub(super) const ITEM_FIELDS: [&str; 2] = ["sku", "qty"];

/// Parses and validates an order body; the error names the offending field.
pub fn parse_order(body: &[u8]) -> Result<Order, (String, Option<String>)> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| (format!("body is not valid JSON: {e}"), None))?;
    let Value::Object(object) = &value else {
        return Err(("body must be a JSON object".into(), None));
    };
    if let Some(unknown) = object.keys().find(|k| !ORDER_FIELDS.contains(&k.as_str())) {
        return Err((format!("unknown field `{unknown}`"), Some(unknown.clone())));
    }
    // An optional field is left out, not null (the contract's types have no null).
    if let Some((name, _)) = object.iter().find(|(_, v)| v.is_null()) {
        return Err((
            format!("`{name}` must not be null; leave it out instead"),
            Some(name.clone()),
        ));
    }
    if let Some(Value::Array(items)) = object.get("items") {
        for (i, item) in items.iter().enumerate() {
            if let Value::Object(item) = item
                && let Some(unknown) = item.keys().find(|k| !ITEM_FIELDS.contains(&k.as_str()))
            {
                return Err((
                    format!("unknown field `{unknown}`"),
                    Some(format!("items[{i}].{unknown}")),
                ));
            }
        }
    }
    let order: Order = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // serde reports a missing field at the parent's path; the field itself is in the message.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(|name| {
                if path == "." {
                    name.to_string()
                } else {
                    format!("{path}.{name}")
                }
            });
        let field = missing.or((path != ".").then_some(path));
        (message, field)
    })?;
    order.validate().map_err(|v| (v.message, Some(v.field)))?;
    Ok(order)
}

pub(super) fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(Ok(value)) = content_type.map(HeaderValue::to_str) else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn parse_names_the_field() {
        assert!(parse_order(br#"{"orderId":"o1","amount":42}"#).is_ok());
        let field = |body: &[u8]| parse_order(body).unwrap_err().1;
        assert_eq!(
            field(br#"{"orderId":"o1","amount":"42"}"#).as_deref(),
            Some("amount")
        );
        assert_eq!(field(br#"{"orderId":"o1"}"#).as_deref(), Some("amount"));
        assert_eq!(
            field(br#"{"orderId":"o 1","amount":1}"#).as_deref(),
            Some("orderId")
        );
        assert_eq!(
            field(br#"{"orderId":"o1","amount":1,"x":1}"#).as_deref(),
            Some("x")
        );
        assert_eq!(
            field(br#"{"orderId":"o1","amount":1,"items":[{"sku":"a","qty":0}]}"#).as_deref(),
            Some("items[0].qty")
        );
        assert_eq!(
            field(br#"{"orderId":"o1","amount":1,"items":[{"sku":"a","qty":-1}]}"#).as_deref(),
            Some("items[0].qty")
        );
        assert_eq!(
            field(br#"{"orderId":"o1","amount":1,"items":null}"#).as_deref(),
            Some("items")
        );
        assert_eq!(field(b"[1]"), None);
        assert_eq!(field(b"{"), None);
    }

    #[test]
    pub(super) fn json_content_types() {
        let v = |s: &'static str| Some(HeaderValue::from_static(s));
        assert!(is_json(v("application/json").as_ref()));
        assert!(is_json(v("Application/JSON; charset=utf-8").as_ref()));
        assert!(is_json(v("application/vnd.kop+json").as_ref()));
        assert!(!is_json(v("text/plain").as_ref()));
        assert!(!is_json(None));
    }
}
