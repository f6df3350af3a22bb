//! Poison records in every consumed topic go to that stage's DLQ with the headers that
//! explain them, and the pipeline keeps flowing.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;

/// kind (part of the key), payload, headers, what `x-error` must mention.
type Poison<'a> = (&'a str, Vec<u8>, Vec<(&'a str, &'a [u8])>, &'a str);

/// A payload each stage would accept, so that only the header makes it poison.
fn valid_payload(stage_input: usize, id: &str) -> Vec<u8> {
    let value = match stage_input {
        0 => serde_json::json!({"orderId": id, "amount": 5, "acceptedAt": 1}),
        1 => {
            serde_json::json!({"orderId": id, "amount": 5, "acceptedAt": 1, "paymentId": "pay", "paidAt": 2})
        }
        _ => serde_json::json!({"orderId": id, "amount": 5, "acceptedAt": 1, "paymentId": "pay",
                                "reservationId": "res", "reservedAt": 3}),
    };
    value.to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_in_every_consumed_topic_lands_in_its_dlq() {
    let mut pipeline = Pipeline::new();
    pipeline.start_all(&[]).await;
    let inputs = [
        pipeline.orders.clone(),
        pipeline.payments.clone(),
        pipeline.reserved.clone(),
    ];

    let mut expected: HashMap<String, Vec<(String, String, String)>> = HashMap::new();
    for (stage, input) in inputs.iter().enumerate() {
        for topic in [input.clone(), Pipeline::retry(input)] {
            let kinds: [Poison; 4] = [
                (
                    "not-json",
                    b"\x00\xffnot json".to_vec(),
                    vec![],
                    "undecodable",
                ),
                (
                    "wrong-shape",
                    br#"{"hello":"world"}"#.to_vec(),
                    vec![],
                    "undecodable",
                ),
                (
                    "bad-attempt",
                    valid_payload(stage, "x"),
                    vec![("x-attempt", b"many")],
                    "x-attempt",
                ),
                (
                    "bad-retry-at",
                    valid_payload(stage, "y"),
                    vec![("x-retry-at", b"soon")],
                    "x-retry-at",
                ),
            ];
            for (kind, payload, headers, reason) in kinds {
                let key = format!("{kind}@{topic}");
                produce_raw(&topic, Some(&key), Some(&payload), &headers).await;
                expected.entry(Pipeline::dlq(input)).or_default().push((
                    key,
                    topic.clone(),
                    reason.to_string(),
                ));
            }
        }
    }

    // The pipeline keeps flowing past the poison.
    let accepted = post_many(pipeline.order_port, "after-poison", 20, 4).await;
    assert_eq!(accepted.len(), 20);
    // The topic also holds the four poison records written into it above.
    let reserved = consume(
        &pipeline.reserved,
        24,
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    let counts = count_by_order(&reserved);
    for id in &accepted {
        assert_eq!(counts.get(id), Some(&1), "{id} went through");
    }

    for (dlq, records) in &expected {
        let letters = consume(
            dlq,
            records.len(),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        assert_eq!(letters.len(), records.len(), "{dlq}");
        for (key_text, origin_topic, reason) in records {
            let letter = letters
                .iter()
                .find(|m| key(m) == *key_text)
                .unwrap_or_else(|| panic!("{key_text} in {dlq}"));
            let error = header(letter, "x-error").expect("x-error");
            assert!(
                error.contains(reason.as_str()),
                "{key_text}: x-error = {error}"
            );
            assert_eq!(
                header(letter, "x-attempt").as_deref(),
                Some("1"),
                "{key_text}"
            );
            assert_eq!(
                header(letter, "x-origin-topic").as_deref(),
                Some(origin_topic.as_str())
            );
            assert!(
                header(letter, "x-origin-partition")
                    .unwrap()
                    .parse::<i32>()
                    .is_ok()
            );
            assert!(
                header(letter, "x-origin-offset")
                    .unwrap()
                    .parse::<i64>()
                    .is_ok()
            );
            assert!(header(letter, "x-service").is_some());
            assert_eq!(
                header(letter, "x-retry-at"),
                None,
                "a dead letter is not due anywhere"
            );
        }
    }
    // Poison with a payload the stage accepts is kept byte for byte.
    let letters = consume(
        &Pipeline::dlq(&inputs[0]),
        8,
        Duration::from_secs(10),
        Duration::ZERO,
    );
    let not_json = letters
        .iter()
        .find(|m| key(m) == format!("not-json@{}", inputs[0]))
        .unwrap();
    use rdkafka::Message;
    assert_eq!(not_json.payload(), Some(&b"\x00\xffnot json"[..]));

    let metrics = pipeline.daemon("payment").metrics().await;
    assert_eq!(metric(&metrics, "kop_dlq_total", &[]), 8.0);
    assert_eq!(
        metric(&metrics, "handler_errors_total", &[("stage", "payment")]),
        8.0
    );
}
