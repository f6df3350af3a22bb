//! The HTTP/1 accept loop of the order API and of the metrics server: connections are
//! served until shutdown, then the open ones may finish, for a bounded time.
//!
//! What a client may hold is bounded, so that slow or idle clients cannot starve the
//! others: a connection waits for a request at most `idle_timeout`; a request's head must
//! arrive within `header_read_timeout` of its first byte (its body is the handler's
//! business); and at most `max_connections` are open. A connection over the cap closes
//! the one that has been idle longest, and gets a 503 if none is idle: a flood of idle
//! connections pushes out its own oldest, while a client that sends its request at once
//! is served. At most `MAX_CLOSING` are closing at once and `MAX_WAITING` wait for them,
//! so the descriptors held stay within the cap plus 80.

mod connection;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use prometheus::{IntCounter, IntGauge};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::lifecycle::Shutdown;
use connection::{ConnectionState, Watched};

/// How long in-flight requests may take to finish after shutdown was asked. With the
/// producer's flush after it, this stays inside the units' `TimeoutStopSec` (30 s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Connections asked to make room that have not closed yet, at most; beyond, a new
/// connection over the cap is refused. It bounds the descriptors held over the cap.
const MAX_CLOSING: usize = 16;

/// New connections over the cap that may wait for room at once (while `MAX_CLOSING` are
/// closing), and how long; beyond, they are refused.
const MAX_WAITING: usize = 64;
const ROOM_WAIT: Duration = Duration::from_secs(1);

/// The answer to a connection that finds no room; it is closed after it.
const NO_ROOM: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n\
content-type: application/json\r\ncontent-length: 45\r\nconnection: close\r\n\r\n\
{\"error\":\"too many connections; retry later\"}";

/// What a client may hold of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    /// The metrics server: a scraper or two, and probes.
    pub const METRICS: Limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 64,
    };
}

/// Series the accept loop keeps up to date, when given.
#[derive(Clone)]
pub struct ConnectionMetrics {
    pub open: IntGauge,
    pub refused: IntCounter,
    pub cut_off: IntCounter,
}

/// Binds an address; a separate step so that a busy port fails the start early.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Accepts HTTP/1 connections until shutdown, then lets the open ones finish (bounded).
pub async fn serve_connections<F, Fut>(
    listener: TcpListener,
    mut shutdown: Shutdown,
    limits: Limits,
    metrics: Option<ConnectionMetrics>,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's own timer runs from the moment it waits for a request, idle time included,
    // so it cannot tell an idle client from a slow one: the connection's watch below does,
    // and hyper's is only the backstop.
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout + limits.idle_timeout);
    let server = Arc::new(Server {
        builder,
        handler,
        limits,
        metrics,
        connections: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(0),
        open: AtomicUsize::new(0),
        closing: AtomicUsize::new(0),
        closed: Notify::new(),
        waiting: AtomicUsize::new(0),
    });
    loop {
        let stream = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over the cap, the connection idle longest makes room: it closes within moments,
        // and the new one is served meanwhile.
        let watcher = graceful.watcher();
        if server.open.load(Ordering::Acquire) >= limits.max_connections {
            match server.make_room() {
                Room::Made => {}
                Room::Full => {
                    server.refuse(stream);
                    continue;
                }
                // Enough are closing already: wait a moment for them, a few at a time.
                Room::Closing if server.waiting.load(Ordering::Acquire) < MAX_WAITING => {
                    server.waiting.fetch_add(1, Ordering::AcqRel);
                    let server = server.clone();
                    tokio::spawn(async move {
                        let made = tokio::time::timeout(ROOM_WAIT, server.wait_for_room()).await;
                        server.waiting.fetch_sub(1, Ordering::AcqRel);
                        if made == Ok(true) {
                            let (id, state) = server.admit();
                            server.serve(stream, watcher, id, state).await;
                        } else {
                            server.refuse(stream);
                        }
                    });
                    continue;
                }
                Room::Closing => {
                    server.refuse(stream);
                    continue;
                }
            }
        }
        // Counted before the task runs, so that a burst of connections sees the cap.
        let (id, state) = server.admit();
        let server = server.clone();
        tokio::spawn(async move { server.serve(stream, watcher, id, state).await });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("some connections were still open after {DRAIN_TIMEOUT:?}");
    }
}

/// What every connection of one server shares.
struct Server<F> {
    builder: hyper::server::conn::http1::Builder,
    handler: F,
    limits: Limits,
    metrics: Option<ConnectionMetrics>,
    /// The open connections, by when they opened.
    connections: Mutex<BTreeMap<u64, Arc<ConnectionState>>>,
    next_id: AtomicU64,
    /// Connections being served, those asked to make room included.
    open: AtomicUsize,
    /// Connections asked to make room, not closed yet.
    closing: AtomicUsize,
    /// Notified when one of them has closed.
    closed: Notify,
    /// New connections waiting for room.
    waiting: AtomicUsize,
}

impl<F> Server<F> {
    /// A connection asked to make room has closed, or will not.
    fn stopped_closing(&self, state: &ConnectionState) {
        if state.closing.swap(false, Ordering::AcqRel) {
            self.closing.fetch_sub(1, Ordering::AcqRel);
            self.closed.notify_waiters();
        }
    }
}

/// What asking for room gave.
enum Room {
    /// The connection idle longest was asked to close.
    Made,
    /// `MAX_CLOSING` are closing already.
    Closing,
    /// None is idle.
    Full,
}

impl<F, Fut> Server<F>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    fn admit(&self) -> (u64, Arc<ConnectionState>) {
        self.open.fetch_add(1, Ordering::AcqRel);
        let state = Arc::new(ConnectionState::new());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut connections) = self.connections.lock() {
            connections.insert(id, state.clone());
        }
        (id, state)
    }

    async fn serve(
        &self,
        stream: TcpStream,
        watcher: Watcher,
        id: u64,
        state: Arc<ConnectionState>,
    ) {
        let io = TokioIo::new(Watched {
            stream,
            state: state.clone(),
        });
        let handler = self.handler.clone();
        let service_state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let request = service_state.request_started();
            let answer = handler(req);
            async move {
                let answer = answer.await;
                drop(request);
                answer
            }
        });
        let connection = watcher.watch(self.builder.serve_connection(io, service));
        if let Some(m) = &self.metrics {
            m.open.inc();
        }
        let cut = watch_connection(connection, &state, self.limits, self).await;
        if let Ok(mut connections) = self.connections.lock() {
            connections.remove(&id);
        }
        self.stopped_closing(&state);
        self.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(m) = &self.metrics {
            m.open.dec();
            if cut {
                m.cut_off.inc();
            }
        }
    }

    /// Asks the connection idle longest to close, if one is idle; says whether one was.
    /// O(open connections), and only when the cap is reached.
    fn make_room(&self) -> Room {
        if self.closing.load(Ordering::Acquire) >= MAX_CLOSING {
            return Room::Closing;
        }
        let Ok(connections) = self.connections.lock() else {
            return Room::Full;
        };
        let longest = connections
            .values()
            .filter(|c| c.is_idle() && !c.closing.load(Ordering::Acquire))
            .min_by_key(|c| c.idle_since.load(Ordering::Acquire));
        let Some(connection) = longest else {
            return Room::Full;
        };
        connection.closing.store(true, Ordering::Release);
        self.closing.fetch_add(1, Ordering::AcqRel);
        connection.close.notify_one();
        Room::Made
    }

    /// Makes room once fewer connections are closing; false if none is idle.
    async fn wait_for_room(&self) -> bool {
        loop {
            let closed = self.closed.notified();
            let mut closed = std::pin::pin!(closed);
            // Listening before looking: a close in between is not missed.
            closed.as_mut().enable();
            match self.make_room() {
                Room::Made => return true,
                Room::Full => return false,
                Room::Closing => closed.await,
            }
        }
    }

    /// No room: a short answer, then the connection is closed.
    fn refuse(&self, stream: TcpStream) {
        // A fresh socket's send buffer takes the whole answer; if not, closing says enough.
        let _ = stream.try_write(NO_ROOM);
        if let Some(m) = &self.metrics {
            m.refused.inc();
        }
    }
}

/// Serves one connection, closing it when a limit is reached or when room is asked for
/// and it is idle. Returns whether it was cut off.
async fn watch_connection<C: Future, F>(
    connection: C,
    state: &ConnectionState,
    limits: Limits,
    server: &Server<F>,
) -> bool {
    let mut connection = std::pin::pin!(connection);
    let every = (limits.header_read_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut check = tokio::time::interval(every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut connection => return false,
            _ = check.tick() => {
                if let Some(why) = state.overdue(limits.header_read_timeout, limits.idle_timeout) {
                    debug!(why, "closing a connection");
                    return true;
                }
            }
            _ = state.close.notified() => {
                // Still idle: a request may have begun since it was picked.
                if state.is_idle() {
                    debug!("closing the connection idle longest, to make room");
                    return true;
                }
                server.stopped_closing(state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_without_room_is_well_formed() {
        let text = std::str::from_utf8(NO_ROOM).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let _: serde_json::Value = serde_json::from_str(body).unwrap();
    }
}
