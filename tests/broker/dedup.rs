//! Each orderId is paid once: a client that posts an order again (after a 503, a timeout
//! or a lost answer) and a retry copy left by a failure upstream are acknowledged by
//! kop-payment without a second payment, reservation or notification — across a restart
//! too, as kop-payment restores the orderIds it paid from its changelog.

use std::time::{Duration, Instant};

use crate::support::*;

/// Reads `topic` until `expected` records of the given orders are there and nothing more
/// arrives for a few seconds; the count of each order.
fn counts(topic: &str, expected: usize) -> std::collections::HashMap<String, usize> {
    count_by_order(&consume(
        topic,
        expected,
        Duration::from_secs(60),
        Duration::from_secs(3),
    ))
}

async fn repeats(pipeline: &mut Pipeline) -> f64 {
    metric(
        &pipeline.daemon("payment").metrics().await,
        "kop_repeats_total",
        &[],
    )
}

async fn post_accepted(port: u16, order_id: &str) {
    let (status, body) = post_order(port, order_id, 5.0).await;
    assert_eq!(status, 202, "{order_id}: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_posted_again_is_paid_once_across_a_restart() {
    let mut pipeline = Pipeline::new();
    pipeline.start_all(&[]).await;
    let port = pipeline.order_port;
    for _ in 0..3 {
        post_accepted(port, "twice-1").await;
    }
    post_accepted(port, "once-1").await;
    let paid = counts(&pipeline.payments, 2);
    assert_eq!(paid.get("twice-1"), Some(&1), "{paid:?}");
    assert_eq!(paid.get("once-1"), Some(&1), "{paid:?}");
    assert_eq!(repeats(&mut pipeline).await, 2.0);

    // A new process knows what the old one paid: it reads the changelog on assignment.
    pipeline.restart("payment").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let restored_some = |log: &str| {
        log.lines()
            .filter(|l| l.contains("handled keys restored"))
            .any(|l| !l.contains(" keys=0 "))
    };
    while !restored_some(&pipeline.daemon("payment").log_text()) {
        assert!(
            Instant::now() < deadline,
            "the keys it paid were not restored:\n{}",
            pipeline.daemon("payment").log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    post_accepted(port, "twice-1").await;
    post_accepted(port, "once-2").await;
    let paid = counts(&pipeline.payments, 3);
    assert_eq!(
        paid.get("twice-1"),
        Some(&1),
        "paid again after the restart: {paid:?}"
    );
    assert_eq!(paid.get("once-2"), Some(&1), "{paid:?}");
    assert_eq!(
        repeats(&mut pipeline).await,
        1.0,
        "the repeat after the restart"
    );

    // Downstream sees one payment of it, so one reservation and one notification.
    let reserved = counts(&pipeline.reserved, 3);
    assert_eq!(reserved.get("twice-1"), Some(&1), "{reserved:?}");
}

/// An order whose payment failed waits in the retry topic; the client posts it again and
/// that copy is paid; the retry copy, handled later, is a repeat.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_copy_of_an_order_paid_meanwhile_is_not_paid_again() {
    let mut pipeline = Pipeline::new();
    pipeline.start("order", &[]).await;
    let failing = "[simulate]\nfailure_rate = 1.0\n";
    pipeline
        .start_with_config("payment", &[("RETRY_DELAYS_MS", "6000")], failing)
        .await;
    let port = pipeline.order_port;
    post_accepted(port, "retried-1").await;
    let retry = Pipeline::retry(&pipeline.orders);
    let waiting = consume(&retry, 1, Duration::from_secs(30), Duration::ZERO);
    assert_eq!(waiting.len(), 1, "the failed payment waits in {retry}");
    let failed_at = Instant::now();

    // The gateway recovers; the client, told nothing useful, posts the order again.
    let config_path = pipeline.log_dir.join("payment.toml");
    std::fs::write(&config_path, "[simulate]\nfailure_rate = 0.0\n").unwrap();
    pipeline.daemon("payment").signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pipeline
        .daemon("payment")
        .log_text()
        .contains("configuration reloaded")
    {
        assert!(Instant::now() < deadline, "no reload logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    post_accepted(port, "retried-1").await;
    let paid = counts(&pipeline.payments, 1);
    assert_eq!(paid.get("retried-1"), Some(&1), "{paid:?}");
    assert!(
        failed_at.elapsed() < Duration::from_secs(6),
        "the copy posted again must be paid before the retry copy is due; the test's \
         timing did not hold ({:?})",
        failed_at.elapsed()
    );

    // The retry copy comes due and is recognised.
    let deadline = Instant::now() + Duration::from_secs(30);
    while repeats(&mut pipeline).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the retry copy was not handled as a repeat"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let paid = counts(&pipeline.payments, 1);
    assert_eq!(paid.get("retried-1"), Some(&1), "paid twice: {paid:?}");
    let dead = consume(
        &Pipeline::dlq(&pipeline.orders),
        1,
        Duration::from_secs(2),
        Duration::ZERO,
    );
    assert!(
        dead.is_empty(),
        "a repeat is acknowledged, not dead-lettered"
    );
}

/// At least once keeps the orderIds in memory only: a repeat is recognised while the
/// process lives.
#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_recognises_repeats_in_memory() {
    let mut pipeline = Pipeline::new();
    pipeline.start("order", &[]).await;
    pipeline
        .start("payment", &[("PROCESSING_GUARANTEE", "at-least-once")])
        .await;
    let port = pipeline.order_port;
    for _ in 0..2 {
        post_accepted(port, "alo-1").await;
    }
    let paid = counts(&pipeline.payments, 1);
    assert_eq!(paid.get("alo-1"), Some(&1), "{paid:?}");
    assert_eq!(repeats(&mut pipeline).await, 1.0);
}
