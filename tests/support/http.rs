//! HTTP from the client's side: plain requests, and orders posted to the order API.

use std::collections::HashMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The status and the body (as text) of an HTTP answer.
pub async fn read_answer(
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<(u16, String), String> {
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let uri = format!("http://127.0.0.1:{port}{path}");
    let response = client()
        .get(uri.parse().map_err(|e| format!("{e}"))?)
        .await
        .map_err(|e| e.to_string())?;
    read_answer(response).await
}

/// Sends a request and returns status, headers and body.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, HashMap<String, String>, String) {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client()
        .request(request.body(Full::new(Bytes::from(body))).expect("request"))
        .await
        .expect("response");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

pub async fn post_order(port: u16, order_id: &str, amount: f64) -> (u16, String) {
    let body = serde_json::json!({ "orderId": order_id, "amount": amount }).to_string();
    let (status, _, body) = http_request(
        port,
        "POST",
        "/order",
        &[("content-type", "application/json")],
        body.into_bytes(),
    )
    .await;
    (status, body)
}

/// `POST /order` with a minimal valid order.
pub fn order_request(
    port: u16,
    order_id: &str,
    amount: f64,
) -> Result<hyper::Request<Full<Bytes>>, String> {
    let body = serde_json::json!({ "orderId": order_id, "amount": amount }).to_string();
    hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}/order"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())
}

/// Like [`post_order`], but a request that gets no HTTP answer (refused, reset) is an error
/// instead of a panic: for load that goes on while the daemon behind the port is restarted.
pub async fn try_post_order(
    port: u16,
    order_id: &str,
    amount: f64,
) -> Result<(u16, String), String> {
    let response = client()
        .request(order_request(port, order_id, amount)?)
        .await
        .map_err(|e| e.to_string())?;
    read_answer(response).await
}

/// Posts `count` orders with ids `<prefix>-<n>`, `concurrency` at a time; returns the ids
/// that were accepted (202).
pub async fn post_many(port: u16, prefix: &str, count: usize, concurrency: usize) -> Vec<String> {
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..count {
        let permit = semaphore.clone().acquire_owned().await.expect("semaphore");
        let id = format!("{prefix}-{n}");
        tasks.spawn(async move {
            let (status, body) = post_order(port, &id, 10.0 + n as f64).await;
            drop(permit);
            (id, status, body)
        });
    }
    let mut accepted = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (id, status, body) = result.expect("task");
        if status == 202 {
            accepted.push(id);
        } else {
            eprintln!("order {id}: {status} {body}");
        }
    }
    accepted
}
