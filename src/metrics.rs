//! Prometheus metrics and the small HTTP server that exposes them with the health probes.
//!
//! Every series carries the `service` label (a constant label of the registry), and the
//! names of the Node.js original are kept so its dashboards keep working.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::lifecycle::{Health, Shutdown};
use crate::serve::Limits;

/// All series of a daemon. Each daemon uses the ones that apply to it.
pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounterVec,
    pub produced: IntCounterVec,
    pub handler_errors: IntCounterVec,
    pub handler_duration: Histogram,
    pub inflight: IntGauge,
    pub retries: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub transactions: IntCounterVec,
    pub end_to_end: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub batch_failures: IntGauge,
    pub producer_rebuilds: IntCounter,
    pub dlq_truncated: IntCounter,
    pub stalled: IntGauge,
    pub cannot_deliver: IntGauge,
    pub late_acks: IntCounter,
    pub connections: crate::serve::ConnectionMetrics,
    pub repeats: IntCounter,
    pub dedup_keys: IntGauge,
}

/// Latency buckets from 1 ms to 60 s: fast paths and retried records fit in one histogram.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
];

impl Metrics {
    pub fn new(service: &str, stage: &str) -> Result<Arc<Self>, prometheus::Error> {
        let labels = [("service".to_string(), service.to_string())].into();
        let registry = Registry::new_custom(None, Some(labels))?;
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram = |name: &str, help: &str| -> Result<Histogram, prometheus::Error> {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let single = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let inflight = gauge("inflight_handlers", "Records being handled right now")?;
        let batch_failures = gauge(
            "kop_batch_failures_consecutive",
            "Batches aborted (or repairs failed) since the last commit",
        )?;
        let stalled = gauge(
            "kop_stage_stalled",
            "1 while input waits and nothing was committed for stage.stall_timeout",
        )?;
        let cannot_deliver = gauge(
            "kop_order_cannot_deliver",
            "1 while kop-order cannot deliver orders to Kafka (its /readyz is 503)",
        )?;
        let late_acks = single(
            "kop_order_late_acks_total",
            "Orders answered 503 (not acknowledged within http.produce_timeout) that Kafka stored afterwards",
        )?;
        let connections = crate::serve::ConnectionMetrics {
            open: gauge("kop_http_connections_open", "HTTP connections open")?,
            refused: single(
                "kop_http_connections_refused_total",
                "HTTP connections answered 503 and closed: max_connections open, none idle",
            )?,
            cut_off: single(
                "kop_http_connections_cut_off_total",
                "HTTP connections closed for a limit: idle, a slow request head, or room needed",
            )?,
        };
        let producer_rebuilds = single(
            "kop_producer_rebuilds_total",
            "Producers replaced after a fenced, fatal or hung transaction call",
        )?;
        let dlq_truncated = single(
            "kop_dlq_truncated_total",
            "Dead letters written cut, because the whole record could not be written",
        )?;
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "kafka_consumer_lag",
                "Records between the committed offset and the end of the partition (librdkafka statistics)",
            ),
            &["topic", "partition"],
        )?;
        registry.register(Box::new(consumer_lag.clone()))?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time to answer an API request",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method", "path"],
        )?;
        registry.register(Box::new(http_duration.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let metrics = Metrics {
            consumed: counter(
                "kafka_messages_consumed_total",
                "Records consumed",
                &["topic"],
            )?,
            produced: counter(
                "kafka_messages_produced_total",
                "Records produced and acknowledged",
                &["topic"],
            )?,
            handler_errors: counter(
                "handler_errors_total",
                "Records whose handling failed",
                &["stage"],
            )?,
            handler_duration: histogram("handler_duration_seconds", "Time to handle one record")?,
            inflight,
            retries: counter(
                "kop_retries_total",
                "Records sent to a retry topic",
                &["topic"],
            )?,
            dead_letters: counter(
                "kop_dlq_total",
                "Records sent to a dead-letter topic",
                &["topic"],
            )?,
            transactions: counter(
                "kop_transactions_total",
                "Batches finished, by outcome (commit or abort)",
                &["outcome"],
            )?,
            end_to_end: histogram(
                "kop_end_to_end_latency_seconds",
                "From order accepted by the API to handled by this stage",
            )?,
            consumer_lag,
            http_requests: counter(
                "http_requests_total",
                "API requests answered, by status",
                &["status"],
            )?,
            http_duration,
            batch_failures,
            producer_rebuilds,
            dlq_truncated,
            stalled,
            cannot_deliver,
            late_acks,
            connections,
            dedup_keys: gauge(
                "kop_dedup_keys",
                "Handled keys kept in memory to recognise repeats (dedup)",
            )?,
            repeats: single(
                "kop_repeats_total",
                "Records whose key was handled already (dedup): acknowledged, not handled or written again",
            )?,
            registry,
        };
        // Create the error series at zero, so that rates and alerts see it before the first error.
        metrics.handler_errors.with_label_values(&[stage]);
        Ok(Arc::new(metrics))
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

async fn route(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, metrics.render());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz or /readyz\n",
        ),
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until shutdown.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
) {
    crate::serve::serve_connections(listener, shutdown, Limits::METRICS, None, move |req| {
        route(req, metrics.clone(), health.clone())
    })
    .await;
}
