//! kop-order's producer, and the watch that judges whether it delivers: readiness, STATUS,
//! the watchdog, and a stuck producer replaced.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::statistics::Statistics;
use tracing::{error, info, warn};

use super::health::{DeliveryHealth, Observation, Verdict};
use super::{OrderApi, OrderProducer};
use crate::config::OrderConfig;
use crate::event::now_ms;
use crate::kafka::{self, BrokerWatch};
use crate::lifecycle::{Health, Shutdown, ShutdownTrigger, Watchdog, status};

/// How often a blocked API renews its STATUS line.
const STATUS_RENEWAL: Duration = Duration::from_secs(5);

/// Blocked this long with a broker that answers a fresh client, the producer is taken for
/// stuck and replaced (and again at most this often).
const REPLACE_AFTER: Duration = Duration::from_secs(15);

/// `stalled` (`[simulate] stall`, for the first producer only) makes a producer that holds
/// its records for 15 minutes: it stands in for one that does not resume after a broker
/// restart, which the health check must replace.
pub(super) fn new_producer(
    config: &OrderConfig,
    brokers: &Arc<BrokerWatch>,
    stalled: bool,
) -> Result<OrderProducer, KafkaError> {
    let mut producer_config = kafka::order_producer_config(&config.common, config.max_pending);
    if stalled {
        warn!("simulate.stall is set: the first producer holds its records");
        producer_config
            .set("linger.ms", "900000")
            .set("message.timeout.ms", "1000000");
    }
    producer_config.create_with_context(OrderContext {
        brokers: brokers.clone(),
    })
}

/// The producer's callbacks: only its connections matter here. (The producer wraps its
/// context out of reach, so the watch is shared.)
pub struct OrderContext {
    brokers: Arc<BrokerWatch>,
}

impl ClientContext for OrderContext {
    fn stats(&self, statistics: Statistics) {
        self.brokers.saw(&statistics);
    }

    /// Connection errors repeat every second while a broker is away: the health check
    /// reports the last one with its verdict, and each is only a debug line.
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka error");
        self.brokers.failed(&error, reason);
    }
}

/// What became of the records handed to the producer, for the health check.
#[derive(Default)]
pub(super) struct Outcomes {
    pub(super) acks: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) last_failure: Mutex<Option<String>>,
}

impl Outcomes {
    pub(super) fn record(&self, result: &OwnedDeliveryResult) {
        match result {
            Ok(_) => {
                self.acks.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = self.last_failure.lock() {
                    *last = Some(e.to_string());
                }
            }
        }
    }
}

impl OrderApi {
    /// Judges delivery about once a second: sets readiness and STATUS, feeds the watchdog,
    /// and after `stall_timeout` without delivering (or at a fatal producer error) stops
    /// the daemon. Returns why it gave up, if it did.
    pub async fn watch(
        self: Arc<Self>,
        health: Arc<Health>,
        mut shutdown: Shutdown,
        trigger: ShutdownTrigger,
        running_line: String,
    ) -> Option<String> {
        let mut watchdog = Watchdog::from_env();
        let mut tick = tokio::time::interval(watchdog.tick().min(Duration::from_secs(1)));
        let mut judge = DeliveryHealth::new(self.config.produce_timeout, self.config.stall_timeout);
        // While blocked, STATUS is renewed now and then (its seconds count), not every tick.
        let mut status_sent = Instant::now();
        let mut blocked_since: Option<Instant> = None;
        let mut replaced_at: Option<Instant> = None;
        let mut replacing: Option<tokio::task::JoinHandle<Option<OrderProducer>>> = None;
        loop {
            tokio::select! {
                _ = shutdown.wait() => return None,
                _ = tick.tick() => {}
            }
            if let Some(task) = replacing.take_if(|task| task.is_finished())
                && let Ok(Some(fresh)) = task.await
            {
                self.replace_producer(fresh);
                replaced_at = Some(Instant::now());
            }
            let verdict = match self.producer().client().fatal_error() {
                // An idempotent producer that lost track of its sequence cannot go on.
                Some((code, reason)) => {
                    Verdict::GiveUp(format!("the producer hit a fatal error: {code}: {reason}"))
                }
                None => judge.observe(&self.observe(), Instant::now()),
            };
            let was_blocked = self.blocked.load(Ordering::Acquire);
            match verdict {
                Verdict::Delivering => {
                    watchdog.ping();
                    blocked_since = None;
                    if was_blocked {
                        info!("delivering orders again");
                        self.set_blocked(false, &health);
                        status(&running_line);
                    }
                }
                Verdict::Blocked(why) => {
                    watchdog.ping();
                    if !was_blocked || status_sent.elapsed() >= STATUS_RENEWAL {
                        status(&format!("cannot deliver: {why}"));
                        status_sent = Instant::now();
                    }
                    if !was_blocked {
                        warn!(reason = %why, "cannot deliver orders; answering 503 until Kafka takes them again");
                        self.set_blocked(true, &health);
                    }
                    let since = *blocked_since.get_or_insert_with(Instant::now);
                    let due =
                        |at: Option<Instant>| at.is_none_or(|at| at.elapsed() >= REPLACE_AFTER);
                    if since.elapsed() >= REPLACE_AFTER && due(replaced_at) && replacing.is_none() {
                        replaced_at = Some(Instant::now());
                        replacing = Some(self.spawn_replacement());
                    }
                }
                Verdict::GiveUp(why) => {
                    error!(reason = %why, "giving up: exiting for the service manager to start kop-order again");
                    self.set_blocked(true, &health);
                    status(&format!("giving up: {why}"));
                    trigger.trigger();
                    return Some(why);
                }
            }
        }
    }

    pub(super) fn producer(&self) -> OrderProducer {
        match self.producer.read() {
            Ok(producer) => producer.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A producer that has not delivered for `REPLACE_AFTER` while a fresh client reaches
    /// the cluster is stuck (librdkafka has been seen not to resume after a broker restart
    /// until its next re-bootstrap): a new one is built. Nothing is built while the cluster
    /// does not answer, so an outage causes no churn.
    pub(super) fn spawn_replacement(&self) -> tokio::task::JoinHandle<Option<OrderProducer>> {
        let config = self.config.clone();
        let brokers = self.brokers.clone();
        tokio::task::spawn_blocking(move || {
            kafka::probe(&config.common).ok()?;
            new_producer(&config, &brokers, false)
                .inspect_err(|e| warn!(error = %e, "cannot build a new producer"))
                .ok()
        })
    }

    pub(super) fn replace_producer(&self, fresh: OrderProducer) {
        let old = match self.producer.write() {
            Ok(mut producer) => std::mem::replace(&mut *producer, fresh),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), fresh),
        };
        let dropped = old.in_flight_count();
        warn!(
            dropped,
            "the broker answers but the producer delivers nothing: replaced it; the orders it \
             held were answered 503 and are dropped"
        );
        self.metrics.producer_rebuilds.inc();
        // Destroying a client waits for its threads: not on an async worker.
        tokio::task::spawn_blocking(move || drop(old));
    }

    pub(super) fn set_blocked(&self, blocked: bool, health: &Health) {
        self.blocked.store(blocked, Ordering::Release);
        health.set_ready(!blocked);
        self.metrics.cannot_deliver.set(i64::from(blocked));
    }

    pub(super) fn observe(&self) -> Observation {
        Observation {
            unreachable: self.brokers.unreachable_for(now_ms()),
            connection_error: self.brokers.last_error(),
            waiting: u64::try_from(self.producer().in_flight_count()).unwrap_or(0),
            acks: self.outcomes.acks.load(Ordering::Relaxed),
            failures: self.outcomes.failures.load(Ordering::Relaxed),
            last_failure: self
                .outcomes
                .last_failure
                .lock()
                .ok()
                .and_then(|l| l.clone()),
        }
    }
}
