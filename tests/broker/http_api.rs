//! The order API against a real broker: every refusal has its status and a JSON body, and
//! nothing of a refused request reaches Kafka.

use std::time::Duration;

use crate::support::*;

const JSON: (&str, &str) = ("content-type", "application/json");

/// method, path, request headers, body, expected status, expected `field`.
type Case<'a> = (
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Vec<u8>,
    u16,
    Option<&'a str>,
);

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_json_with_the_right_status_and_reach_no_topic() {
    let mut pipeline = Pipeline::new();
    pipeline.start("order", &[]).await;
    let port = pipeline.order_port;

    let cases: Vec<Case> = vec![
        (
            "POST",
            "/order",
            vec![JSON],
            b"{not json".to_vec(),
            400,
            None,
        ),
        ("POST", "/order", vec![JSON], b"[1,2]".to_vec(), 400, None),
        (
            "POST",
            "/order",
            vec![JSON],
            br#"{"orderId":"bad-1","amount":"42"}"#.to_vec(),
            400,
            Some("amount"),
        ),
        (
            "POST",
            "/order",
            vec![JSON],
            br#"{"orderId":"bad-2","amount":0}"#.to_vec(),
            400,
            Some("amount"),
        ),
        (
            "POST",
            "/order",
            vec![JSON],
            br#"{"orderId":"bad-3"}"#.to_vec(),
            400,
            Some("amount"),
        ),
        (
            "POST",
            "/order",
            vec![JSON],
            br#"{"orderId":"bad id","amount":1}"#.to_vec(),
            400,
            Some("orderId"),
        ),
        (
            "POST",
            "/order",
            vec![JSON],
            br#"{"orderId":"bad-4","amount":1,"currency":"EURO"}"#.to_vec(),
            400,
            Some("currency"),
        ),
        (
            "POST",
            "/order",
            vec![JSON],
            br#"{"orderId":"bad-5","amount":1,"items":[{"sku":"a","qty":0}]}"#.to_vec(),
            400,
            Some("items[0].qty"),
        ),
        (
            "POST",
            "/order",
            vec![JSON],
            br#"{"orderId":"bad-6","amount":1,"surprise":true}"#.to_vec(),
            400,
            Some("surprise"),
        ),
        (
            "POST",
            "/order",
            vec![("content-type", "text/plain")],
            br#"{"orderId":"bad-7","amount":1}"#.to_vec(),
            415,
            None,
        ),
        (
            "POST",
            "/order",
            vec![],
            br#"{"orderId":"bad-8","amount":1}"#.to_vec(),
            415,
            None,
        ),
        (
            "POST",
            "/order",
            vec![JSON],
            {
                let mut big = br#"{"orderId":"bad-9","amount":1,"customerId":""#.to_vec();
                big.extend(std::iter::repeat_n(b'x', 70 * 1024));
                big.extend(br#""}"#);
                big
            },
            413,
            None,
        ),
        ("GET", "/order", vec![], Vec::new(), 405, None),
        ("DELETE", "/order", vec![], Vec::new(), 405, None),
        (
            "POST",
            "/orders",
            vec![JSON],
            br#"{"orderId":"bad-10","amount":1}"#.to_vec(),
            404,
            None,
        ),
        ("GET", "/", vec![], Vec::new(), 404, None),
    ];
    for (method, path, headers, body, status, field) in cases {
        let (got, response_headers, text) = http_request(port, method, path, &headers, body).await;
        assert_eq!(got, status, "{method} {path}: {text}");
        assert_eq!(
            response_headers.get("content-type").map(String::as_str),
            Some("application/json"),
            "{method} {path}"
        );
        let body: serde_json::Value = serde_json::from_str(&text).expect("JSON error body");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{text}"
        );
        assert_eq!(body["field"].as_str(), field, "{method} {path}: {text}");
        if status == 405 {
            assert_eq!(
                response_headers.get("allow").map(String::as_str),
                Some("POST")
            );
        }
    }

    // One good order after all the bad ones: it is the only record in the topic.
    let (status, text) = post_order(port, "good-1", 42.0).await;
    assert_eq!(status, 202, "{text}");
    let accepted: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(accepted["orderId"], "good-1");
    assert_eq!(accepted["status"], "accepted");
    assert!(accepted["partition"].is_i64() && accepted["offset"].is_i64());

    let records = consume(
        &pipeline.orders,
        1,
        Duration::from_secs(20),
        Duration::from_secs(2),
    );
    assert_eq!(records.len(), 1, "only the accepted order is in the topic");
    assert_eq!(key(&records[0]), "good-1");
    let event = json(&records[0]);
    assert_eq!(event["amount"], 42.0);
    assert!(event["acceptedAt"].as_u64().is_some());
    assert!(header(&records[0], "traceparent").is_some());

    let metrics = pipeline.daemon("order").metrics().await;
    assert_eq!(
        metric(&metrics, "http_requests_total", &[("status", "202")]),
        1.0
    );
    assert_eq!(
        metric(&metrics, "http_requests_total", &[("status", "400")]),
        9.0
    );
    assert_eq!(
        metric(&metrics, "http_requests_total", &[("status", "415")]),
        2.0
    );
}

/// Fires `count` orders at once and returns their statuses and Retry-After headers.
async fn burst(port: u16, prefix: &str, count: usize) -> Vec<(u16, Option<String>, String)> {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..count {
        let body =
            serde_json::json!({ "orderId": format!("{prefix}-{n}"), "amount": 1 }).to_string();
        tasks.spawn(async move {
            let (status, headers, text) =
                http_request(port, "POST", "/order", &[JSON], body.into_bytes()).await;
            (status, headers.get("retry-after").cloned(), text)
        });
    }
    let mut out = Vec::new();
    while let Some(result) = tasks.join_next().await {
        out.push(result.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_producer_queue_answers_503_at_once() {
    let mut pipeline = Pipeline::new();
    // One record may wait in the producer, and it waits 3 s for its batch: every other
    // request meanwhile finds the queue full.
    let config = "[kafka]\n\"linger.ms\" = 3000\n[http]\nmax_pending = 1\n";
    pipeline.start_with_config("order", &[], config).await;
    let results = burst(pipeline.order_port, "q", 20).await;
    let accepted = results.iter().filter(|(s, _, _)| *s == 202).count();
    let refused: Vec<_> = results.iter().filter(|(s, _, _)| *s == 503).collect();
    assert_eq!(accepted + refused.len(), 20, "{results:?}");
    assert!(accepted >= 1, "{results:?}");
    assert!(!refused.is_empty(), "a full queue must refuse: {results:?}");
    for (_, retry_after, text) in &refused {
        assert_eq!(retry_after.as_deref(), Some("1"));
        let body: serde_json::Value = serde_json::from_str(text).unwrap();
        assert!(body["error"].as_str().is_some());
    }
    let records = consume(
        &pipeline.orders,
        accepted,
        Duration::from_secs(20),
        Duration::from_secs(2),
    );
    assert_eq!(
        records.len(),
        accepted,
        "exactly the accepted orders reached Kafka"
    );
}
