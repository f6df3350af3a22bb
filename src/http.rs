//! The order API (`POST /order`).
//!
//! A request is answered `202` only after the broker acknowledged the record, so an
//! accepted order is never lost. Every refusal is JSON `{error, field?}` with a status that
//! tells the client what to do: fix the request (4xx) or come back later (503 with
//! `Retry-After`, when Kafka cannot take the record in time). Memory stays bounded: bodies
//! are capped, a pending request keeps only the order's id, and the producer's queue is
//! finite; a full queue answers 503 at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{debug, error, info, warn};

use crate::config::OrderConfig;
use crate::event::{Order, OrderCreated, now_ms};
use crate::kafka::{self, BrokerWatch, H_TRACEPARENT};
use crate::lifecycle::{Health, Shutdown, ShutdownTrigger, Watchdog, status};
use crate::metrics::Metrics;
use crate::order_health::{DeliveryHealth, Observation, Verdict};
use crate::serve::Limits;

/// How often a blocked API renews its STATUS line.
const STATUS_RENEWAL: Duration = Duration::from_secs(5);

/// Blocked this long with a broker that answers a fresh client, the producer is taken for
/// stuck and replaced (and again at most this often).
const REPLACE_AFTER: Duration = Duration::from_secs(15);

type OrderProducer = FutureProducer<OrderContext>;

pub struct OrderApi {
    /// Replaced when it no longer delivers to a broker that is back (see `watch`).
    producer: RwLock<OrderProducer>,
    config: OrderConfig,
    metrics: Arc<Metrics>,
    outcomes: Arc<Outcomes>,
    brokers: Arc<BrokerWatch>,
    /// Set while the health check finds that orders cannot be delivered: requests are then
    /// refused at once rather than after `produce_timeout`.
    blocked: AtomicBool,
}

/// `stalled` (`[simulate] stall`, for the first producer only) makes a producer that holds
/// its records for 15 minutes: it stands in for one that does not resume after a broker
/// restart, which the health check must replace.
fn new_producer(
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
struct Outcomes {
    acks: AtomicU64,
    failures: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

impl Outcomes {
    fn record(&self, result: &OwnedDeliveryResult) {
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

type HttpResponse = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &Value) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(status: StatusCode, error: &str, field: Option<&str>) -> HttpResponse {
    let body = match field {
        Some(field) => json!({ "error": error, "field": field }),
        None => json!({ "error": error }),
    };
    json_response(status, &body)
}

fn unavailable(error: &str) -> HttpResponse {
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, error, None);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// A request the API refuses, with the status and field to report.
struct Refusal {
    status: StatusCode,
    error: String,
    field: Option<String>,
}

impl Refusal {
    fn unavailable(error: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: error.into(),
            field: None,
        }
    }

    fn bad(error: impl Into<String>, field: Option<String>) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            error: error.into(),
            field,
        }
    }
}

const ORDER_FIELDS: [&str; 5] = ["orderId", "amount", "currency", "customerId", "items"];
const ITEM_FIELDS: [&str; 2] = ["sku", "qty"];

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

fn is_json(content_type: Option<&HeaderValue>) -> bool {
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

impl OrderApi {
    /// Creates the producer and makes sure the broker answers and the topic exists.
    pub async fn connect(
        config: OrderConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, KafkaError> {
        let common = &config.common;
        if common.topics.create {
            let created =
                kafka::ensure_topics(common, &[&config.topic], Duration::from_secs(30)).await?;
            if !created.is_empty() {
                info!(topics = ?created, "created topics");
            }
        }
        let brokers = Arc::new(BrokerWatch::default());
        let producer = new_producer(&config, &brokers, config.common.simulate.stall)?;
        let probe = producer.clone();
        let topic = config.topic.clone();
        tokio::task::spawn_blocking(move || kafka::require_topics(probe.client(), &[&topic]))
            .await
            .map_err(|_| KafkaError::Canceled)??;
        Ok(Arc::new(OrderApi {
            producer: RwLock::new(producer),
            config,
            metrics,
            outcomes: Arc::default(),
            brokers,
            blocked: AtomicBool::new(false),
        }))
    }

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

    fn producer(&self) -> OrderProducer {
        match self.producer.read() {
            Ok(producer) => producer.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A producer that has not delivered for `REPLACE_AFTER` while a fresh client reaches
    /// the cluster is stuck (librdkafka has been seen not to resume after a broker restart
    /// until its next re-bootstrap): a new one is built. Nothing is built while the cluster
    /// does not answer, so an outage causes no churn.
    fn spawn_replacement(&self) -> tokio::task::JoinHandle<Option<OrderProducer>> {
        let config = self.config.clone();
        let brokers = self.brokers.clone();
        tokio::task::spawn_blocking(move || {
            kafka::probe(&config.common).ok()?;
            new_producer(&config, &brokers, false)
                .inspect_err(|e| warn!(error = %e, "cannot build a new producer"))
                .ok()
        })
    }

    fn replace_producer(&self, fresh: OrderProducer) {
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

    fn set_blocked(&self, blocked: bool, health: &Health) {
        self.blocked.store(blocked, Ordering::Release);
        health.set_ready(!blocked);
        self.metrics.cannot_deliver.set(i64::from(blocked));
    }

    fn observe(&self) -> Observation {
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

    /// Serves the API until shutdown, then flushes what the producer still holds.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) {
        let api = self.clone();
        let limits = Limits {
            header_read_timeout: self.config.header_read_timeout,
            idle_timeout: self.config.idle_timeout,
            max_connections: self.config.max_connections,
        };
        let metrics = Some(self.metrics.connections.clone());
        crate::serve::serve_connections(listener, shutdown, limits, metrics, move |req| {
            let api = api.clone();
            async move { Ok(api.handle(req).await) }
        })
        .await;
        let producer = self.producer();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
    }

    async fn handle(&self, req: Request<Incoming>) -> HttpResponse {
        let started = Instant::now();
        let method = req.method().clone();
        let path_label = if req.uri().path() == "/order" {
            "/order"
        } else {
            "other"
        };
        let response = self.route(req).await;
        self.metrics
            .http_requests
            .with_label_values(&[response.status().as_str()])
            .inc();
        self.metrics
            .http_duration
            .with_label_values(&[method.as_str(), path_label])
            .observe(started.elapsed().as_secs_f64());
        response
    }

    async fn route(&self, req: Request<Incoming>) -> HttpResponse {
        if req.uri().path() != "/order" {
            return error_response(
                StatusCode::NOT_FOUND,
                "no such resource; the API is POST /order",
                None,
            );
        }
        if req.method() != Method::POST {
            let mut response =
                error_response(StatusCode::METHOD_NOT_ALLOWED, "use POST /order", None);
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        match self.accept(req).await {
            Ok(response) => response,
            Err(refusal) => {
                let mut response =
                    error_response(refusal.status, &refusal.error, refusal.field.as_deref());
                if refusal.status == StatusCode::SERVICE_UNAVAILABLE {
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                }
                // The rest of a body that came too slowly is not waited for.
                if refusal.status == StatusCode::REQUEST_TIMEOUT {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        }
    }

    async fn accept(&self, req: Request<Incoming>) -> Result<HttpResponse, Refusal> {
        let limit = self.config.max_body_bytes;
        if !is_json(req.headers().get(CONTENT_TYPE)) {
            return Err(Refusal {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                error: "send the order as Content-Type: application/json".into(),
                field: None,
            });
        }
        let too_large = || Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            error: format!("body larger than {limit} bytes"),
            field: None,
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            return Err(too_large());
        }
        let traceparent = req
            .headers()
            .get(H_TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::trace::next_hop)
            .unwrap_or_else(crate::trace::new_traceparent);
        let reading = Limited::new(req.into_body(), limit).collect();
        let body = match tokio::time::timeout(self.config.body_read_timeout, reading).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Ok(Err(e)) => return Err(Refusal::bad(format!("cannot read the body: {e}"), None)),
            Err(_) => {
                return Err(Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    error: format!(
                        "the body did not arrive within {}",
                        humantime::format_duration(self.config.body_read_timeout)
                    ),
                    field: None,
                });
            }
        };
        let order = parse_order(&body).map_err(|(error, field)| Refusal::bad(error, field))?;
        drop(body);
        if self.blocked.load(Ordering::Acquire) {
            return Ok(unavailable(
                "kop-order cannot deliver to Kafka right now; retry later",
            ));
        }
        let (order_id, mut delivery) = self.send(order, &traceparent)?;
        let outcome = match tokio::time::timeout(self.config.produce_timeout, &mut delivery).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.follow_late(order_id.clone(), delivery);
                return Ok(unavailable(&format!(
                    "Kafka did not acknowledge the order within {}; it may still be stored: \
                     retry with the same orderId",
                    humantime::format_duration(self.config.produce_timeout)
                )));
            }
        };
        if let Ok(result) = &outcome {
            self.outcomes.record(result);
        }
        match outcome {
            Ok(Ok(delivery)) => {
                self.metrics
                    .produced
                    .with_label_values(&[&self.config.topic])
                    .inc();
                debug!(
                    order_id,
                    topic = %self.config.topic,
                    partition = delivery.partition,
                    offset = delivery.offset,
                    trace_id = crate::trace::trace_id(&traceparent).unwrap_or(""),
                    "order accepted"
                );
                Ok(json_response(
                    StatusCode::ACCEPTED,
                    &json!({
                        "orderId": order_id,
                        "status": "accepted",
                        "partition": delivery.partition,
                        "offset": delivery.offset,
                    }),
                ))
            }
            Ok(Err((e, _))) => {
                warn!(order_id, error = %e, "order not acknowledged by Kafka");
                Ok(unavailable(&format!("Kafka did not take the order: {e}")))
            }
            Err(_) => Ok(unavailable("the producer was shut down")),
        }
    }

    /// Hands the order to the producer. The encoded event lives only until the producer has
    /// copied it: a pending request keeps the order's id and nothing else.
    fn send(&self, order: Order, traceparent: &str) -> Result<(String, DeliveryFuture), Refusal> {
        let event = OrderCreated {
            order,
            accepted_at: now_ms(),
        };
        let payload = serde_json::to_vec(&event).map_err(|e| Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: format!("cannot encode the event: {e}"),
            field: None,
        })?;
        let order_id = event.order.order_id;
        let headers = kafka::with_header(
            rdkafka::message::OwnedHeaders::new(),
            H_TRACEPARENT,
            traceparent,
        );
        let record = FutureRecord::to(&self.config.topic)
            .key(&order_id)
            .payload(&payload)
            .headers(headers);
        match self.producer().send_result(record) {
            Ok(delivery) => Ok((order_id, delivery)),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Err(
                Refusal::unavailable("too many orders waiting for Kafka; retry later"),
            ),
            Err((e, _)) => {
                warn!(order_id, error = %e, "cannot hand the order to the producer");
                Err(Refusal::unavailable(format!(
                    "Kafka refused the order: {e}"
                )))
            }
        }
    }

    /// A record answered 503 goes on trying: its outcome still counts for health, and an
    /// operator learns that the order was stored after all.
    fn follow_late(&self, order_id: String, delivery: DeliveryFuture) {
        let outcomes = self.outcomes.clone();
        let metrics = self.metrics.clone();
        let topic = self.config.topic.clone();
        tokio::spawn(async move {
            let Ok(result) = delivery.await else { return };
            outcomes.record(&result);
            match result {
                Ok(delivery) => {
                    metrics.produced.with_label_values(&[&topic]).inc();
                    metrics.late_acks.inc();
                    info!(
                        order_id,
                        topic,
                        partition = delivery.partition,
                        offset = delivery.offset,
                        "order stored after its 503 answer"
                    );
                }
                // Many at once when a stuck producer is replaced: counted, and at debug.
                Err((e, _)) => debug!(order_id, error = %e, "order not stored"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_the_field() {
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
    fn json_content_types() {
        let v = |s: &'static str| Some(HeaderValue::from_static(s));
        assert!(is_json(v("application/json").as_ref()));
        assert!(is_json(v("Application/JSON; charset=utf-8").as_ref()));
        assert!(is_json(v("application/vnd.kop+json").as_ref()));
        assert!(!is_json(v("text/plain").as_ref()));
        assert!(!is_json(None));
    }
}
