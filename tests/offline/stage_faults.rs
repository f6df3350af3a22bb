//! The stage loop under faults a real broker cannot be made to produce on demand: an error
//! on one request, a fenced producer, a transaction call that takes long, a broker gone and
//! back, a group member joining and leaving. Each scenario runs kop's stage in-process
//! against librdkafka's mock cluster (no JVM, seconds) and asserts what the loop must
//! achieve: every record reaches its output (or its DLQ), the stage recovers without
//! exiting, and its readiness tells the truth meanwhile.
//!
//! What the mock cannot show is left to the real-broker tests: it ignores
//! `isolation.level` (aborted records stay visible) and does not store offsets sent with a
//! transaction. So these tests count distinct orders, never duplicates.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kop::config::{Service, SimulateConfig, StageConfig};
use kop::lifecycle::{Health, ShutdownTrigger, shutdown_channel};
use kop::metrics::Metrics;
use kop::stage::{Stage, StageError};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const IN: &str = "orders";
const OUT: &str = "payments";
const RETRY: &str = "orders.retry";
const DLQ: &str = "orders.dlq";

struct Harness {
    stage: tokio::task::JoinHandle<Result<(), StageError>>,
    trigger: ShutdownTrigger,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    bootstrap: String,
    group: String,
    transactional_id: String,
    /// Writes the scenario's records, and owns the mock cluster (`test.mock.num.brokers`).
    // Declared last: dropped after every client of its cluster.
    producer: BaseProducer,
}

fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Starts kop-payment's stage against a fresh one-broker mock cluster; `extra` is more
/// `[stage]` keys (its lines before any section) and more TOML sections (e.g. `[simulate]`),
/// `kafka` more librdkafka properties, `history` orders written before the stage starts.
async fn start(guarantee: &str, extra: &str, kafka: &[(&str, &str)], history: &[&str]) -> Harness {
    start_on(1, guarantee, extra, kafka, history).await
}

/// [`start`] on a mock cluster of `brokers` brokers.
async fn start_on(
    brokers: i32,
    guarantee: &str,
    extra: &str,
    kafka: &[(&str, &str)],
    history: &[&str],
) -> Harness {
    // KOP_TEST_LOG=debug shows the stage's log.
    if let Ok(filter) = std::env::var("KOP_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let producer: BaseProducer = ClientConfig::new()
        .set("test.mock.num.brokers", brokers.to_string())
        .create()
        .expect("producer and mock cluster");
    no_initial_rebalance_delay(&producer);
    let cluster = producer.client().mock_cluster().expect("mock cluster");
    let group = unique("group");
    // kop-payment's changelog of paid orderIds too (`[topics] create = false` below).
    let changelog = format!("{group}.dedup-changelog");
    for topic in [IN, OUT, RETRY, DLQ, changelog.as_str()] {
        cluster.create_topic(topic, 2, 1).expect("topic");
    }
    let bootstrap = cluster.bootstrap_servers();
    drop(cluster);
    for id in history {
        producer
            .send(BaseRecord::to(IN).key(*id).payload(&order_json(id)))
            .map_err(|(e, _)| e)
            .expect("produce");
    }
    producer.flush(Duration::from_secs(10)).expect("flush");
    let name = unique("pay");
    // As the stage builds it: kop-<service name>-<instance id> (set below).
    let transactional_id = format!("kop-{name}-0");
    // A retry waits 1 s, and never longer (x-retry-at is capped at the longest delay),
    // unless `extra` has a [retry] section of its own.
    let retry = if extra.contains("[retry]") {
        ""
    } else {
        "[retry]\nmax_attempts = 3\ndelays = [\"1s\"]\n"
    };
    // kop-payment keeps its paid orderIds, unless `extra` says otherwise. (The mock's
    // changelog shows aborted records, so a scenario that aborts turns it off.)
    let dedup = if extra.contains("[dedup]") {
        ""
    } else {
        "[dedup]\nenabled = true\n"
    };
    let (stage_lines, extra) = match extra.find("\n[") {
        _ if extra.starts_with('[') => ("", extra),
        Some(at) => extra.split_at(at + 1),
        None => (extra, ""),
    };
    let mut kafka_lines = String::new();
    for (k, v) in kafka {
        kafka_lines.push_str(&format!("\"{k}\" = \"{v}\"\n"));
    }
    let toml = format!(
        r#"
[service]
name = "{name}"
instance_id = "0"
[kafka]
"bootstrap.servers" = "{bootstrap}"
"session.timeout.ms" = "3000"
"heartbeat.interval.ms" = "300"
"topic.metadata.refresh.interval.ms" = "1000"
{kafka_lines}
[topics]
create = false
[stage]
input = "{IN}"
output = "{OUT}"
retry_topic = "{RETRY}"
dlq_topic = "{DLQ}"
group_id = "{group}"
processing_guarantee = "{guarantee}"
stall_timeout = "4s"
{stage_lines}
{dedup}
{retry}
{extra}
"#,
    );
    let path = std::env::temp_dir().join(format!("{}.toml", unique("kop-stage-faults")));
    std::fs::write(&path, toml).expect("config");
    let env: BTreeMap<&str, &str> = BTreeMap::new();
    let config = StageConfig::load(Service::Payment, Some(&path), &env).expect("config");
    let _ = std::fs::remove_file(&path);

    let metrics = Metrics::new("payment-test", "payment").expect("metrics");
    let health = Arc::new(Health::default());
    // The scenario's `[simulate]` is put in place once the warm-up is through, as SIGHUP
    // would: a simulated delay is for the scenario's records, not for the warm-up's.
    let scenario_simulate = config.common.simulate.clone();
    let simulate = Arc::new(RwLock::new(SimulateConfig::default()));
    let stage = Stage::connect(
        config,
        Arc::new(kop::handlers::Payment),
        metrics.clone(),
        simulate.clone(),
    )
    .await
    .expect("the stage connects to the mock cluster");
    health.set_ready(true);
    let (trigger, shutdown) = shutdown_channel();
    let stage = tokio::spawn(stage.run(shutdown, health.clone()));
    let harness = Harness {
        stage,
        trigger,
        health,
        metrics,
        bootstrap,
        group,
        transactional_id,
        producer,
    };
    // An order through proves the stage consumes before a scenario starts. Orders written
    // before the assignment may be skipped (a scenario may set auto.offset.reset = latest),
    // so one goes every second until one is through.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent: Option<Instant> = None;
    for n in 0.. {
        if sent.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            harness.order(&format!("warm-up-{n}"));
            sent = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if harness.keys(OUT).iter().any(|k| k.starts_with("warm-up-")) {
            break;
        }
        assert!(Instant::now() < deadline, "the stage never consumed");
    }
    // Nothing of the warm-up may still be in flight when a scenario injects its faults:
    // every record consumed is handled (the gauge counts the simulated delays) and its
    // output committed.
    harness
        .wait_until("the warm-up is done", Duration::from_secs(30), |h| {
            h.counter("inflight_handlers", None) == 0.0
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    *simulate.write().expect("simulate") = scenario_simulate;
    harness
}

/// The mock holds a group's first join for 3 s, as a broker does by default
/// (`group.initial.rebalance.delay.ms`); the test broker runs with 0, and so does the mock
/// here, instead of every scenario waiting that long before it starts.
fn no_initial_rebalance_delay(owner: &BaseProducer) {
    use rdkafka::bindings::{
        rd_kafka_handle_mock_cluster, rd_kafka_mock_group_initial_rebalance_delay_ms,
    };
    // rust-rdkafka does not wrap this setting of the mock.
    // SAFETY: `owner` is a live client, and the mock cluster it owns lives as long as it.
    unsafe {
        let mock = rd_kafka_handle_mock_cluster(owner.client().native_ptr());
        assert!(!mock.is_null(), "the client owns no mock cluster");
        rd_kafka_mock_group_initial_rebalance_delay_ms(mock, 0);
    }
}

fn order_json(id: &str) -> Vec<u8> {
    serde_json::json!({"orderId": id, "amount": 5, "acceptedAt": 1})
        .to_string()
        .into_bytes()
}

impl Harness {
    /// The mock cluster, to inject faults with.
    fn cluster(&self) -> MockCluster<'_, DefaultProducerContext> {
        self.producer.client().mock_cluster().expect("mock cluster")
    }

    /// On a cluster of two: the outputs move to broker 2, the inputs and both coordinators
    /// to broker 1, so that broker 2 can be slowed down alone. Returns once the stage has
    /// committed a transaction there.
    async fn outputs_apart(&self) {
        for partition in 0..2 {
            self.cluster()
                .partition_leader(OUT, partition, Some(2))
                .expect("leader");
            for topic in [IN, RETRY, DLQ] {
                self.cluster()
                    .partition_leader(topic, partition, Some(1))
                    .expect("leader");
            }
        }
        self.cluster()
            .coordinator(MockCoordinator::Group(self.group.clone()), 1)
            .expect("group coordinator");
        self.cluster()
            .coordinator(
                MockCoordinator::Transaction(self.transactional_id.clone()),
                1,
            )
            .expect("transaction coordinator");
        // The stage found its coordinators before they moved to broker 1 (the mock may have
        // put them on broker 2, which is about to answer slowly): a transaction committed
        // from now on has followed them there.
        let commits = self.commits();
        self.pay_all("before", 3).await;
        self.wait_until(
            "a commit after the coordinators moved",
            Duration::from_secs(20),
            |h| h.commits() > commits,
        )
        .await;
    }

    fn produce(&self, topic: &str, key: &str, value: &[u8], headers: &[(&str, &str)]) {
        let mut owned = OwnedHeaders::new();
        for (k, v) in headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        self.producer
            .send(BaseRecord::to(topic).key(key).payload(value).headers(owned))
            .map_err(|(e, _)| e)
            .expect("produce");
        self.producer.flush(Duration::from_secs(10)).expect("flush");
    }

    fn order(&self, id: &str) {
        self.produce(IN, id, &order_json(id), &[]);
    }

    /// Everything in a topic now (read_uncommitted: the mock shows aborted records anyway).
    fn read(&self, topic: &str) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_uncommitted")
            .create()
            .expect("consumer");
        let mut list = rdkafka::TopicPartitionList::new();
        let mut remaining = 0;
        for p in 0..2 {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .expect("watermarks");
            remaining += high - low;
            list.add_partition_offset(topic, p, rdkafka::Offset::Offset(low))
                .expect("partition");
        }
        consumer.assign(&list).expect("assign");
        drop(list);
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while remaining > 0 && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                out.push(m.detach());
                remaining -= 1;
            }
        }
        assert_eq!(remaining, 0, "{topic} could not be read to its end");
        out
    }

    fn keys(&self, topic: &str) -> HashSet<String> {
        self.read(topic)
            .iter()
            .filter_map(|m| m.key().map(|k| String::from_utf8_lossy(k).into_owned()))
            .collect()
    }

    /// Sends `n` orders and waits until every one is paid.
    async fn pay_all(&self, prefix: &str, n: usize) {
        let orders = ids(prefix, n);
        for id in &orders {
            self.order(id);
        }
        self.wait_paid(&refs(&orders), Duration::from_secs(30))
            .await;
    }

    /// Sends orders and waits until the stage has consumed them (it holds them while their
    /// handling takes its simulated time).
    async fn send_and_hold(&self, ids: &[String]) {
        let consumed = self.counter("kafka_messages_consumed_total", Some(("topic", IN)));
        for id in ids {
            self.order(id);
        }
        let wanted = consumed + ids.len() as f64;
        self.wait_until("the stage holds the orders", Duration::from_secs(10), |h| {
            h.counter("kafka_messages_consumed_total", Some(("topic", IN))) >= wanted
        })
        .await;
    }

    /// Waits until every order id appears in the output topic.
    async fn wait_paid(&self, ids: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let paid = self.keys(OUT);
            let missing: Vec<_> = ids.iter().filter(|id| !paid.contains(**id)).collect();
            if missing.is_empty() {
                return;
            }
            assert!(!self.stage.is_finished(), "the stage ended: {:?}", missing);
            assert!(
                Instant::now() < deadline,
                "not paid within {timeout:?}: {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_until(&self, what: &str, timeout: Duration, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
            assert!(!self.stage.is_finished(), "{what}: the stage ended");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A second member of the stage's group, once it has partitions (so the stage's were
    /// revoked); dropping it rebalances again.
    async fn join_member(&self) -> BaseConsumer {
        let member: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.group)
            .set("session.timeout.ms", "3000")
            .set("heartbeat.interval.ms", "300")
            .set("enable.auto.commit", "false")
            .create()
            .expect("member");
        member.subscribe(&[IN, RETRY]).expect("subscribe");
        // The rebalance takes about a session timeout (3 s) on the mock; a busy machine may
        // take longer, so the member polls until it has partitions.
        let joined = Instant::now();
        let has_partitions =
            |m: &BaseConsumer| m.assignment().map(|a| a.count() > 0).unwrap_or(false);
        while !has_partitions(&member) && joined.elapsed() < Duration::from_secs(30) {
            let _ = member.poll(Duration::from_millis(50));
            tokio::task::yield_now().await;
        }
        assert!(
            has_partitions(&member),
            "the second member got no partition in 30 s: no rebalance happened"
        );
        member
    }

    fn counter(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        let text = self.metrics.render();
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| label.is_none_or(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Records of the input the stage's group has not committed yet.
    fn uncommitted(&self) -> i64 {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut list = rdkafka::TopicPartitionList::new();
        for p in 0..2 {
            list.add_partition(IN, p);
        }
        let committed = reader
            .committed_offsets(list, Duration::from_secs(5))
            .expect("committed offsets");
        (0..2)
            .map(|p| {
                let (low, high) = reader
                    .fetch_watermarks(IN, p, Duration::from_secs(5))
                    .expect("watermarks");
                let done = match committed.find_partition(IN, p).map(|e| e.offset()) {
                    Some(rdkafka::Offset::Offset(o)) => o,
                    _ => low,
                };
                high - done
            })
            .sum()
    }

    fn commits(&self) -> f64 {
        self.counter("kop_transactions_total", Some(("outcome", "commit")))
    }

    fn aborts(&self) -> f64 {
        self.counter("kop_transactions_total", Some(("outcome", "abort")))
    }

    fn rebuilds(&self) -> f64 {
        self.counter("kop_producer_rebuilds_total", None)
    }

    /// Stops the stage as SIGTERM would; it must end well.
    async fn stop(self) {
        assert!(!self.stage.is_finished(), "the stage ended on its own");
        // Everything it was given is done: it must say it is ready.
        self.wait_until("ready at the end", Duration::from_secs(5), |h| {
            h.health.is_ready()
        })
        .await;
        self.trigger.trigger();
        let result = tokio::time::timeout(Duration::from_secs(30), self.stage)
            .await
            .expect("the stage stops within 30 s")
            .expect("the stage task");
        result.expect("the stage ends without an error");
    }
}

/// Handling takes 2 s per record (per key, below the 4 s stall timeout), so that a test can
/// act while the stage holds records it has not committed: it acts within a poll (100 ms)
/// of seeing them consumed.
const DELAY_2S: &str = "[simulate]\ndelay = \"2s\"\n";

/// Runs `scenario` in each processing guarantee, side by side: each on a mock cluster and a
/// stage of its own, so they cannot see each other, and the test takes the time of one.
async fn in_both_guarantees(scenario: impl AsyncFn(&'static str)) {
    futures_util::future::join(scenario("exactly-once"), scenario("at-least-once")).await;
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn refs(ids: &[String]) -> Vec<&str> {
    ids.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_that_fails_is_aborted_and_read_again() {
    let h = start("exactly-once", "", &[], &[]).await;
    // One error: the commit fails, the abort that follows works.
    h.cluster().request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN],
    );
    h.pay_all("abortable", 20).await;
    assert!(
        h.aborts() >= 1.0,
        "no commit failed: the test proves nothing"
    );
    // The aborted transaction's paid orderIds were forgotten with it: read again, its
    // orders are paid, not taken for repeats.
    assert_eq!(h.counter("kop_repeats_total", None), 0.0);
    assert_eq!(
        h.rebuilds(),
        0.0,
        "an abortable error needs no new producer"
    );
    assert!(h.health.is_ready());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fenced_producer_is_replaced_without_exiting() {
    let h = start("exactly-once", "", &[], &[]).await;
    h.cluster().request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    h.pay_all("fenced", 20).await;
    assert!(h.rebuilds() >= 1.0, "the producer was never replaced");
    assert_eq!(h.counter("kop_repeats_total", None), 0.0);
    h.stop().await;
}

/// The abort itself fails (the commit failed, then the abort is fenced): the transaction
/// must not be taken for closed; a new producer takes over.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_that_fails_is_repaired_with_a_new_producer() {
    let h = start("exactly-once", "", &[], &[]).await;
    h.cluster().request_errors(
        RDKafkaApiKey::EndTxn,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
        ],
    );
    h.pay_all("abort-fails", 20).await;
    assert!(h.rebuilds() >= 1.0, "the producer was never replaced");
    h.stop().await;
}

/// Errors on the other transaction requests and on the coordinator lookup.
#[tokio::test(flavor = "multi_thread")]
async fn errors_on_every_transaction_request_are_recovered() {
    let h = start("exactly-once", "", &[], &[]).await;
    for key in [
        RDKafkaApiKey::AddPartitionsToTxn,
        RDKafkaApiKey::AddOffsetsToTxn,
        RDKafkaApiKey::TxnOffsetCommit,
        RDKafkaApiKey::FindCoordinator,
        RDKafkaApiKey::Produce,
    ] {
        h.cluster().request_errors(
            key,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            ],
        );
        h.pay_all(&format!("{key:?}"), 5).await;
    }
    h.stop().await;
}

/// The transaction and group coordinators move to other brokers, twice, mid-stream.
#[tokio::test(flavor = "multi_thread")]
async fn coordinators_that_move_are_followed() {
    let h = start_on(3, "exactly-once", "", &[], &[]).await;
    h.pay_all("before-the-move", 5).await;
    for broker in [2, 3] {
        h.cluster()
            .coordinator(
                MockCoordinator::Transaction(h.transactional_id.clone()),
                broker,
            )
            .expect("move the transaction coordinator");
        h.cluster()
            .coordinator(MockCoordinator::Group(h.group.clone()), broker)
            .expect("move the group coordinator");
        h.pay_all(&format!("moved-to-{broker}"), 10).await;
    }
    h.stop().await;
}

/// A transaction call that takes longer than the stall timeout: the loop keeps turning
/// (the stage reports itself not ready meanwhile) and goes on once the broker answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_transaction_call_makes_the_stage_not_ready_then_it_goes_on() {
    // Each record takes 2 s to handle: the broker turns slow while the stage holds them.
    // Each request then takes 2 s, so a commit (five requests or so) outlasts the 4 s stall
    // timeout, while the group's heartbeats (3 s session) still get through.
    let h = start("exactly-once", DELAY_2S, &[], &[]).await;
    let orders = ids("slow", 5);
    h.send_and_hold(&orders).await;
    h.cluster()
        .broker_round_trip_time(1, Duration::from_secs(2))
        .expect("rtt");
    h.wait_until(
        "not ready while nothing commits",
        Duration::from_secs(20),
        |h| !h.health.is_ready(),
    )
    .await;
    assert_eq!(h.counter("kop_stage_stalled", None), 1.0);
    h.cluster()
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("rtt");
    h.wait_paid(&refs(&orders), Duration::from_secs(60)).await;
    h.wait_until("ready again", Duration::from_secs(10), |h| {
        h.health.is_ready()
    })
    .await;
    h.stop().await;
}

/// The broker goes away while the stage holds records it has not committed: not ready;
/// back: ready, and nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_is_reported_and_recovered_in_both_guarantees() {
    in_both_guarantees(async |guarantee| {
        // Each record takes 2 s to handle, so the stage holds them when the broker goes.
        let h = start(guarantee, DELAY_2S, &[], &[]).await;
        let orders = ids(&format!("outage-{guarantee}"), 5);
        h.send_and_hold(&orders).await;
        h.cluster().broker_down(1).expect("down");
        assert!(
            h.counter("inflight_handlers", None) > 0.0,
            "{guarantee}: the orders were handled before the broker went: the test proves nothing"
        );
        h.wait_until(
            &format!("{guarantee}: not ready during the outage"),
            Duration::from_secs(30),
            |h| !h.health.is_ready(),
        )
        .await;
        assert_eq!(h.counter("kop_stage_stalled", None), 1.0, "{guarantee}");
        h.cluster().broker_up(1).expect("up");
        h.wait_paid(&refs(&orders), Duration::from_secs(60)).await;
        h.wait_until(
            &format!("{guarantee}: ready again"),
            Duration::from_secs(15),
            |h| h.health.is_ready(),
        )
        .await;
        h.stop().await;
    })
    .await;
}

/// A retry partition held (its record not yet due) when the group rebalances: librdkafka
/// keeps the pause across the revocation and re-assignment, so the stage must lift it.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_held_across_a_rebalance_is_still_handled() {
    // Retries may wait up to 30 s: the record below is held for 10 s, longer than the
    // rebalance below takes (about a session timeout, 3 s); if it ever is not, the check
    // after it fails rather than let the test pass without a held partition.
    let h = start(
        "exactly-once",
        "[retry]\ndelays = [\"1s\", \"30s\"]\n",
        &[],
        &[],
    )
    .await;
    let due = kop::event::now_ms() + 10_000;
    h.produce(
        RETRY,
        "held",
        &order_json("held"),
        &[("x-attempt", "1"), ("x-retry-at", &due.to_string())],
    );
    h.wait_until("the retry record is held", Duration::from_secs(10), |h| {
        h.counter("kafka_messages_consumed_total", Some(("topic", RETRY))) >= 1.0
    })
    .await;
    // A second member joins the group and leaves again: two rebalances.
    let member = h.join_member().await;
    assert!(
        !h.keys(OUT).contains("held"),
        "the retry was handled before the rebalance: the test proves nothing"
    );
    // Consumed a little while holding them, as a member does.
    let held_since = Instant::now();
    while held_since.elapsed() < Duration::from_millis(500) {
        let _ = member.poll(Duration::from_millis(50));
    }
    drop(member);
    h.wait_paid(&["held"], Duration::from_secs(60)).await;
    h.stop().await;
}

/// A transaction fails (here: a rebalance) while the broker has not answered for some of its
/// records. librdkafka's abort would give their sequence numbers to the next records, and a
/// broker that had written them without answering would take the next ones for repeats and
/// drop them with the aborted transaction (seen in a broker failover: 76 orders lost). So
/// the stage ends such a transaction with a new producer, which starts a new epoch.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_failing_with_records_in_doubt_ends_under_a_new_producer() {
    let h = start_on(2, "exactly-once", "[dedup]\nenabled = false\n", &[], &[]).await;
    h.outputs_apart().await;
    // Broker 2 answers after 20 s (below the stage's 30 s message timeout): the outputs
    // below stay unacknowledged meanwhile.
    h.cluster()
        .broker_round_trip_time(2, Duration::from_secs(20))
        .expect("rtt");
    let orders = ids("doubt", 6);
    h.send_and_hold(&orders).await;
    let asked = Instant::now();
    let member = h.join_member().await;
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "the rebalance took {:?}: the outputs may have been answered before it",
        asked.elapsed()
    );
    h.wait_until(
        "the revocation ends the open transaction",
        Duration::from_secs(20),
        |h| h.aborts() >= 1.0,
    )
    .await;
    // A new producer counts as an abort too; a plain abort does not build one.
    h.wait_until(
        "the failed transaction ends under a new producer, not with librdkafka's abort",
        Duration::from_secs(5),
        |h| h.rebuilds() >= 1.0,
    )
    .await;
    h.cluster()
        .broker_round_trip_time(2, Duration::ZERO)
        .expect("rtt");
    drop(member);
    h.wait_paid(&refs(&orders), Duration::from_secs(60)).await;
    h.stop().await;
}

/// With `auto.offset.reset = latest`, records written before the stage started are never
/// handled — not even after an abort rewinds a partition that has no committed offset.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_rewinds_to_where_reading_started_not_to_the_beginning() {
    let old = ["old-1", "old-2", "old-3"];
    let h = start("exactly-once", "", &[("auto.offset.reset", "latest")], &old).await;
    h.cluster().request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; 2],
    );
    let orders = ids("new", 5);
    for id in &orders {
        h.order(id);
    }
    h.wait_paid(&refs(&orders), Duration::from_secs(30)).await;
    assert!(h.aborts() >= 1.0, "no abort: the test proves nothing");
    let paid = h.keys(OUT);
    for old in old {
        assert!(
            !paid.contains(old),
            "{old} was read although it predates the stage"
        );
    }
    h.stop().await;
}

/// A forged `x-retry-at` a day ahead holds its partition no longer than the longest
/// configured delay (1 s here).
#[tokio::test(flavor = "multi_thread")]
async fn a_far_future_retry_time_waits_only_the_longest_delay() {
    let h = start("exactly-once", "", &[], &[]).await;
    let forged = kop::event::now_ms() + 86_400_000;
    let sent = Instant::now();
    h.produce(
        RETRY,
        "forged",
        &order_json("forged"),
        &[("x-attempt", "1"), ("x-retry-at", &forged.to_string())],
    );
    h.wait_paid(&["forged"], Duration::from_secs(15)).await;
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "handled before any delay: the record was not held"
    );
    h.stop().await;
}

/// The broker refuses one record's output at delivery: that record alone becomes a dead
/// letter; the transaction holding it is aborted and the rest goes through. Exactly-once
/// first sends the record once more alone (the refusal may have been its batch's), so it
/// takes a second refusal.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_the_broker_refuses_becomes_a_dead_letter_alone() {
    in_both_guarantees(async |guarantee| {
        let refusals = if guarantee == "exactly-once" { 2 } else { 1 };
        let h = start(guarantee, DELAY_2S, &[], &[]).await;
        // Injected once the stage holds the order: the error is the stage's, not ours.
        h.send_and_hold(&["refused".to_string()]).await;
        h.cluster().request_errors(
            RDKafkaApiKey::Produce,
            &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; refusals],
        );
        h.wait_until(
            &format!("{guarantee}: the refused order is dead-lettered"),
            Duration::from_secs(30),
            |h| h.keys(DLQ).contains("refused"),
        )
        .await;
        let dead = h.read(DLQ);
        let letter = dead
            .iter()
            .find(|m| m.key() == Some(b"refused".as_slice()))
            .expect("dead letter");
        let error = header(letter, "x-error");
        assert!(error.contains("refused"), "{guarantee}: {error}");
        let after = ids(&format!("after-{guarantee}"), 10);
        for id in &after {
            h.order(id);
        }
        h.wait_paid(&refs(&after), Duration::from_secs(30)).await;
        assert!(
            !h.keys(DLQ).iter().any(|k| k.starts_with("after-")),
            "{guarantee}"
        );
        h.stop().await;
    })
    .await;
}

/// Exactly-once: a record refused once is sent again alone, and paid when the broker takes
/// it then (the first refusal was its batch's, not its own).
#[tokio::test(flavor = "multi_thread")]
async fn a_record_refused_once_is_sent_alone_and_paid() {
    let h = start("exactly-once", DELAY_2S, &[], &[]).await;
    h.send_and_hold(&["refused-once".to_string()]).await;
    h.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    h.wait_paid(&["refused-once"], Duration::from_secs(30))
        .await;
    assert!(
        h.aborts() >= 1.0,
        "nothing was refused: the test proves nothing"
    );
    assert!(!h.keys(DLQ).contains("refused-once"), "dead-lettered");
    h.pay_all("after-refusal", 10).await;
    h.stop().await;
}

fn header(message: &OwnedMessage, name: &str) -> String {
    use rdkafka::message::Headers;
    message
        .headers()
        .and_then(|hs| hs.iter().filter(|h| h.key == name).last())
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// An order that arrives twice is paid once, in both guarantees; the repeat is
/// acknowledged (its offset commits) and counted.
#[tokio::test(flavor = "multi_thread")]
async fn an_order_that_arrives_twice_is_paid_once() {
    in_both_guarantees(async |guarantee| {
        let h = start(guarantee, "", &[], &["twice", "twice", "once"]).await;
        h.wait_paid(&["twice", "once"], Duration::from_secs(30))
            .await;
        h.wait_until(
            &format!("{guarantee}: the repeat is counted"),
            Duration::from_secs(10),
            |h| h.counter("kop_repeats_total", None) >= 1.0,
        )
        .await;
        let paid = h.read(OUT);
        let twice = paid
            .iter()
            .filter(|m| m.key() == Some(b"twice".as_slice()))
            .count();
        assert_eq!(twice, 1, "{guarantee}: paid {twice} times");
        h.stop().await;
    })
    .await;
}

/// Commits start at least `commit_interval` apart, in both guarantees, however often
/// records arrive; and the last records are committed without any record after them. (The
/// loop's 500 ms tick would commit them too: this does not show that it wakes for the
/// interval itself, which the benchmark's latency would.)
#[tokio::test(flavor = "multi_thread")]
async fn commits_are_spaced_by_the_commit_interval() {
    in_both_guarantees(async |guarantee| {
        let interval = Duration::from_millis(400);
        let h = start(guarantee, "commit_interval = \"400ms\"\n", &[], &[]).await;
        let before = h.commits();
        let started = Instant::now();
        // One order every 50 ms for 1.5 s: unspaced, about one commit each.
        let orders = ids(&format!("paced-{guarantee}"), 30);
        for id in &orders {
            h.order(id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        h.wait_paid(&refs(&orders), Duration::from_secs(10)).await;
        if guarantee == "at-least-once" {
            h.wait_until(
                "every order committed, the last with nothing after it",
                Duration::from_secs(10),
                |h| h.uncommitted() == 0,
            )
            .await;
        } else {
            // librdkafka's mock keeps no offsets of a transaction (TxnOffsetCommit is
            // answered, not stored), so the last commit is waited for, not observed.
            tokio::time::sleep(interval * 3).await;
        }
        let commits = h.commits() - before;
        let elapsed = started.elapsed();
        // n commits started in the span are n − 1 intervals apart at least.
        let most = (elapsed.as_secs_f64() / interval.as_secs_f64()).floor() + 1.0;
        assert!(
            commits <= most,
            "{guarantee}: {commits} commits in {elapsed:?}, at most {most} at one per {interval:?}"
        );
        assert!(
            commits >= 2.0,
            "{guarantee}: {commits} commits for orders over {elapsed:?}: the test proves nothing"
        );
        h.stop().await;
    })
    .await;
}

/// Under a steady stream a transaction still commits once `commit_interval` has passed: it
/// stops taking records and waits only for the acknowledgements of those it holds. Before,
/// it waited for a moment with nothing unacknowledged, which never comes while the records
/// arrive faster than their outputs are acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_commits_on_time_under_a_steady_stream() {
    let extra = "commit_interval = \"100ms\"\n[dedup]\nenabled = false\n";
    let h = start_on(2, "exactly-once", extra, &[], &[]).await;
    h.outputs_apart().await;
    // Broker 2, where the outputs go, answers 500 ms late; an order comes every 20 ms.
    let ack_delay = Duration::from_millis(500);
    h.cluster()
        .broker_round_trip_time(2, ack_delay)
        .expect("rtt");
    let before = h.commits();
    let orders = ids("stream", 100);
    let mut sent = Instant::now();
    let mut widest_gap = Duration::ZERO;
    for id in &orders {
        h.order(id);
        widest_gap = widest_gap.max(sent.elapsed());
        sent = Instant::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = h.commits() - before;
    assert!(
        widest_gap < ack_delay,
        "the stream paused for {widest_gap:?}, long enough for every output to be \
         acknowledged: the test proves nothing"
    );
    // About 2 s of stream. Before, no commit at all: some output was always unacknowledged.
    assert!(
        during >= 3.0,
        "{during} commits while orders kept coming for 2 s with commit_interval 100 ms"
    );
    h.cluster()
        .broker_round_trip_time(2, Duration::ZERO)
        .expect("rtt");
    h.wait_paid(&refs(&orders), Duration::from_secs(30)).await;
    h.stop().await;
}

/// Records of one key are handled and written in the order they were read while other keys
/// go past them, and no more records are handled at once than `max_in_flight` (the bound
/// that keeps memory flat at 10,000 in flight), in both guarantees.
#[tokio::test(flavor = "multi_thread")]
async fn one_key_stays_in_order_and_max_in_flight_bounds_the_work() {
    in_both_guarantees(async |guarantee| {
        let extra = "max_in_flight = 8\ncommit_max_records = 4\n\
                     [simulate]\ndelay = \"200ms\"\n[dedup]\nenabled = false\n";
        let h = start(guarantee, extra, &[], &[]).await;
        // Four keys of ten records each, numbered in acceptedAt, between twenty others.
        let mut others = Vec::new();
        let mut records = Vec::new();
        for n in 1..=10u64 {
            for k in 0..4 {
                let key = format!("{guarantee}-key-{k}");
                let value = serde_json::json!({"orderId": key, "amount": 5, "acceptedAt": n});
                records.push((key, value.to_string().into_bytes()));
            }
            for m in 0..2 {
                let id = format!("{guarantee}-other-{n}-{m}");
                records.push((id.clone(), order_json(&id)));
                others.push(id);
            }
        }
        // All at once, so that the stage has more to handle than it may take.
        for (key, value) in &records {
            h.producer
                .send(BaseRecord::to(IN).key(key).payload(value))
                .map_err(|(e, _)| e)
                .expect("produce");
        }
        h.producer.flush(Duration::from_secs(10)).expect("flush");
        // Sampled while the work goes on: 60 records at 200 ms each, 8 at a time.
        let mut most = 0.0f64;
        let deadline = Instant::now() + Duration::from_secs(30);
        let written = loop {
            most = most.max(h.counter("inflight_handlers", None));
            let written = h.read(OUT);
            let keys: Vec<&[u8]> = written.iter().filter_map(|m| m.key()).collect();
            let keyed = keys
                .iter()
                .filter(|k| k.starts_with(format!("{guarantee}-key-").as_bytes()))
                .count();
            if keyed >= 40 && others.iter().all(|id| keys.contains(&id.as_bytes())) {
                break written;
            }
            assert!(Instant::now() < deadline, "{guarantee}: not done in 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            most <= 8.0,
            "{guarantee}: {most} records handled at once, over 8"
        );
        assert!(
            most >= 2.0,
            "{guarantee}: at most {most} at once: nothing ran concurrently, the bound is untested"
        );
        for k in 0..4 {
            let key = format!("{guarantee}-key-{k}");
            let sequence: Vec<u64> = written
                .iter()
                .filter(|m| m.key() == Some(key.as_bytes()))
                .filter_map(|m| {
                    let value: serde_json::Value = serde_json::from_slice(m.payload()?).ok()?;
                    value["acceptedAt"].as_u64()
                })
                .collect();
            assert_eq!(
                sequence,
                (1..=10).collect::<Vec<_>>(),
                "{guarantee}: {key} written out of order"
            );
        }
        h.stop().await;
    })
    .await;
}
