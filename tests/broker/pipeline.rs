//! The whole pipeline on a real broker: orders in, exactly one reservation per order out.

use std::time::Duration;

use crate::support::*;

async fn orders_flow_exactly_once(guarantee: &str) {
    let mut pipeline = Pipeline::new();
    pipeline
        .start_all(&[("PROCESSING_GUARANTEE", guarantee)])
        .await;
    let accepted = post_many(pipeline.order_port, "o", 500, 32).await;
    assert_eq!(accepted.len(), 500, "every order is accepted");

    let reserved = consume(
        &pipeline.reserved,
        500,
        Duration::from_secs(120),
        Duration::from_secs(2),
    );
    let counts = count_by_order(&reserved);
    assert_eq!(
        reserved.len(),
        500,
        "exactly 500 reservations (read_committed)"
    );
    for id in &accepted {
        assert_eq!(counts.get(id), Some(&1), "order {id} reserved once");
    }
    // The key is the order id all the way, and the trace travels with it.
    for m in &reserved {
        assert_eq!(key(m), json(m)["orderId"].as_str().unwrap());
        assert!(header(m, "traceparent").is_some());
    }

    // One trace per order, from the API to the last topic.
    let created = consume(
        &pipeline.orders,
        500,
        Duration::from_secs(30),
        Duration::ZERO,
    );
    let trace_of = |m: &rdkafka::message::OwnedMessage| {
        header(m, "traceparent").and_then(|t| kop::trace::trace_id(&t).map(str::to_string))
    };
    let traces: std::collections::HashMap<String, String> = created
        .iter()
        .map(|m| (key(m), trace_of(m).expect("a valid traceparent")))
        .collect();
    for m in &reserved {
        assert_eq!(
            trace_of(m).as_ref(),
            traces.get(&key(m)),
            "trace of {}",
            key(m)
        );
    }

    // Notified: the last stage handled all 500 and committed them.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = pipeline.daemon("notification").metrics().await;
        let consumed = metric(
            &text,
            "kafka_messages_consumed_total",
            &[("topic", &pipeline.reserved)],
        );
        let errors = metric(&text, "handler_errors_total", &[]);
        if consumed >= 500.0 {
            assert_eq!(
                consumed, 500.0,
                "notification consumed each reservation once"
            );
            assert_eq!(errors, 0.0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "notified only {consumed} of 500"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let order_metrics = pipeline.daemon("order").metrics().await;
    assert_eq!(
        metric(&order_metrics, "http_requests_total", &[("status", "202")]),
        500.0
    );
    assert_eq!(
        metric(
            &order_metrics,
            "kafka_messages_produced_total",
            &[("topic", &pipeline.orders)]
        ),
        500.0
    );
    let payment_metrics = pipeline.daemon("payment").metrics().await;
    assert_eq!(
        metric(
            &payment_metrics,
            "kafka_messages_produced_total",
            &[("topic", &pipeline.payments)]
        ),
        500.0
    );
    assert!(
        metric(
            &payment_metrics,
            "kop_transactions_total",
            &[("outcome", "commit")]
        ) >= 1.0
    );
    assert!(payment_metrics.contains("kop_end_to_end_latency_seconds_count"));
    assert!(payment_metrics.contains("process_resident_memory_bytes"));
    // Consumer lag from librdkafka's statistics (every 5 s), per consumed partition.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = pipeline.daemon("inventory").metrics().await;
        let topic_label = format!("topic=\"{}\"", pipeline.payments);
        if text
            .lines()
            .any(|l| l.starts_with("kafka_consumer_lag{") && l.contains(&topic_label))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no consumer lag gauge:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_orders_exactly_once() {
    orders_flow_exactly_once("exactly-once").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_orders_at_least_once() {
    orders_flow_exactly_once("at-least-once").await;
}
