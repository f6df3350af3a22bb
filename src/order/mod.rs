//! The order API (`POST /order`).
//!
//! A request is answered `202` only after the broker acknowledged the record, so an
//! accepted order is never lost. Every refusal is JSON `{error, field?}` with a status that
//! tells the client what to do: fix the request (4xx) or come back later (503 with
//! `Retry-After`, when Kafka cannot take the record in time). Memory stays bounded: bodies
//! are capped, a pending request keeps only the order's id, and the producer's queue is
//! finite; a full queue answers 503 at once.

mod health;
mod producer;
mod request;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::config::OrderConfig;
use crate::event::{Order, OrderCreated, now_ms};
use crate::kafka::{self, BrokerWatch, H_TRACEPARENT};
use crate::lifecycle::Shutdown;
use crate::metrics::Metrics;
use crate::serve::Limits;

use producer::{OrderContext, Outcomes, new_producer};
use request::{HttpResponse, Refusal, error_response, is_json, json_response, unavailable};

pub use request::parse_order;

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
