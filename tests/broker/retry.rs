//! Non-blocking retries: a failed record waits in `<topic>.retry` until its due time, while
//! the main topic keeps flowing; out of attempts, it goes to `<topic>.dlq`.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use rdkafka::Message;

fn now_ms() -> u64 {
    kop::event::now_ms()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_retry_does_not_block_the_main_topic_and_waits_for_its_due_time() {
    let mut pipeline = Pipeline::new();
    // A wait is capped at the longest configured delay: 10 s here, beyond the 6 s below.
    pipeline
        .start_all(&[("RETRY_DELAYS_MS", "1000,10000")])
        .await;

    // A retried order due in 6 s, as kop-payment itself would have written it.
    let due = now_ms() + 6_000;
    let payload =
        serde_json::json!({"orderId": "held-1", "amount": 3, "acceptedAt": now_ms()}).to_string();
    produce_raw(
        &Pipeline::retry(&pipeline.orders),
        Some("held-1"),
        Some(payload.as_bytes()),
        &[
            ("x-attempt", b"1"),
            ("x-error", b"gateway timeout"),
            ("x-retry-at", due.to_string().as_bytes()),
        ],
    )
    .await;

    // Fresh orders go through while the retry waits.
    let accepted = post_many(pipeline.order_port, "fresh", 30, 8).await;
    let reserved = consume(
        &pipeline.reserved,
        30,
        Duration::from_secs(60),
        Duration::ZERO,
    );
    let counts = count_by_order(&reserved);
    for id in &accepted {
        assert_eq!(counts.get(id), Some(&1), "{id} went through");
    }
    assert!(
        !counts.contains_key("held-1"),
        "the retried order was handled before its due time"
    );

    // Then the retried one, not before its due time.
    let payments = consume(
        &pipeline.payments,
        31,
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    let held: Vec<_> = payments.iter().filter(|m| key(m) == "held-1").collect();
    assert_eq!(held.len(), 1, "the retried order is handled once");
    let paid_at = json(held[0])["paidAt"].as_u64().unwrap();
    assert!(paid_at >= due, "handled at {paid_at}, due at {due}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_retried_then_dead_lettered_and_nothing_is_lost() {
    let mut pipeline = Pipeline::new();
    pipeline.start("order", &[]).await;
    pipeline.start("inventory", &[]).await;
    pipeline
        .start(
            "payment",
            &[
                ("SIMULATE_FAILURE_RATE", "0.5"),
                ("MAX_PROCESSING_ATTEMPTS", "3"),
                ("RETRY_DELAYS_MS", "300,700"),
            ],
        )
        .await;
    let accepted = post_many(pipeline.order_port, "flaky", 200, 16).await;
    assert_eq!(accepted.len(), 200);

    // Each order ends in exactly one place: paid (and reserved), or dead-lettered.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let (paid, dead) = loop {
        let paid = consume(
            &pipeline.payments,
            usize::MAX,
            Duration::from_millis(1500),
            Duration::ZERO,
        );
        let dead = consume(
            &Pipeline::dlq(&pipeline.orders),
            usize::MAX,
            Duration::from_millis(1500),
            Duration::ZERO,
        );
        if paid.len() + dead.len() >= 200 || std::time::Instant::now() > deadline {
            break (paid, dead);
        }
    };
    let mut outcome: HashMap<String, usize> = HashMap::new();
    for m in paid.iter().chain(dead.iter()) {
        *outcome.entry(key(m)).or_default() += 1;
    }
    for id in &accepted {
        assert_eq!(outcome.get(id), Some(&1), "{id}: exactly one outcome");
    }
    assert_eq!(outcome.len(), 200);
    // With a 50% failure rate over 3 attempts, both outcomes occur (p of no DLQ: 0.875^200).
    assert!(!dead.is_empty() && !paid.is_empty());

    // Dead letters used every attempt and kept the order.
    for letter in &dead {
        assert_eq!(header(letter, "x-attempt").as_deref(), Some("3"));
        assert_eq!(
            header(letter, "x-error").as_deref(),
            Some("simulated failure")
        );
        assert_eq!(
            header(letter, "x-origin-topic").as_deref(),
            Some(pipeline.orders.as_str())
        );
        assert_eq!(json(letter)["orderId"].as_str(), Some(key(letter).as_str()));
    }

    // Every retry waited for its due time: each retry record's successor (the next retry,
    // the dead letter or the payment) was written at or after its x-retry-at.
    let retries = consume(
        &Pipeline::retry(&pipeline.orders),
        usize::MAX,
        Duration::from_secs(3),
        Duration::ZERO,
    );
    assert!(!retries.is_empty());
    let written_at = |m: &rdkafka::message::OwnedMessage| m.timestamp().to_millis().unwrap() as u64;
    let mut by_order: HashMap<String, Vec<(u32, u64)>> = HashMap::new();
    for r in &retries {
        let attempt: u32 = header(r, "x-attempt").unwrap().parse().unwrap();
        let due: u64 = header(r, "x-retry-at").unwrap().parse().unwrap();
        assert!(
            attempt == 1 || attempt == 2,
            "attempt {attempt} in the retry topic"
        );
        by_order.entry(key(r)).or_default().push((attempt, due));
    }
    for (id, mut hops) in by_order {
        hops.sort();
        let last_due = hops.last().unwrap().1;
        let outcome_time = paid
            .iter()
            .chain(dead.iter())
            .find(|m| key(m) == id)
            .map(|m| match json(m)["paidAt"].as_u64() {
                Some(paid_at) => paid_at,
                None => written_at(m),
            })
            .unwrap();
        assert!(
            outcome_time >= last_due,
            "{id}: handled at {outcome_time}, due at {last_due}"
        );
        if hops.len() == 2 {
            let second_written = retries
                .iter()
                .find(|r| key(r) == id && header(r, "x-attempt").as_deref() == Some("2"))
                .map(written_at)
                .unwrap();
            assert!(
                second_written >= hops[0].1,
                "{id}: second attempt before its due time"
            );
        }
    }

    let metrics = pipeline.daemon("payment").metrics().await;
    assert_eq!(metric(&metrics, "kop_dlq_total", &[]), dead.len() as f64);
    assert_eq!(
        metric(&metrics, "kop_retries_total", &[]),
        retries.len() as f64
    );
    let reserved = consume(
        &pipeline.reserved,
        paid.len(),
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    assert_eq!(
        reserved.len(),
        paid.len(),
        "every paid order is reserved once"
    );
}
