//! The state of one served connection that its watch reads: answering a request, idle
//! since when, a request's head begun when, asked to close.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Milliseconds on a monotonic clock that starts with the process (0 means "never").
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// What one connection is doing, as its watch needs to know.
pub(super) struct ConnectionState {
    /// Requests being answered (more than one only when pipelined).
    requests: AtomicU32,
    /// When the last answer was given, or the connection opened.
    pub(super) idle_since: AtomicU64,
    /// When the first byte of the next request arrived; 0 while none did.
    head_started: AtomicU64,
    /// Asked to close to make room for a new connection.
    pub(super) close: Notify,
    pub(super) closing: AtomicBool,
}

impl ConnectionState {
    pub(super) fn new() -> Self {
        ConnectionState {
            requests: AtomicU32::new(0),
            idle_since: AtomicU64::new(clock_ms()),
            head_started: AtomicU64::new(0),
            close: Notify::new(),
            closing: AtomicBool::new(false),
        }
    }

    pub(super) fn bytes_read(&self) {
        if self.requests.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == 0
        {
            self.head_started.store(clock_ms(), Ordering::Release);
        }
    }

    pub(super) fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        RequestGuard(self.clone())
    }

    pub(super) fn is_idle(&self) -> bool {
        self.requests.load(Ordering::Acquire) == 0 && self.head_started.load(Ordering::Acquire) == 0
    }

    /// Why the connection should be closed now, if it should. A request being answered is
    /// the handler's to bound (its body's read time, Kafka's acknowledgement).
    pub(super) fn overdue(
        &self,
        header_read_timeout: Duration,
        idle_timeout: Duration,
    ) -> Option<&'static str> {
        if self.requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        let now = clock_ms();
        let since = |at: u64| Duration::from_millis(now.saturating_sub(at));
        match self.head_started.load(Ordering::Acquire) {
            0 => (since(self.idle_since.load(Ordering::Acquire)) >= idle_timeout)
                .then_some("idle for idle_timeout"),
            started => (since(started) >= header_read_timeout)
                .then_some("request head not received within header_read_timeout"),
        }
    }
}

/// Marks a request as being answered while alive.
pub(super) struct RequestGuard(Arc<ConnectionState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.idle_since.store(clock_ms(), Ordering::Release);
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A TCP stream that tells its connection's state when bytes arrive.
pub(super) struct Watched {
    pub(super) stream: TcpStream,
    pub(super) state: Arc<ConnectionState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_and_slow_heads_are_told_apart() {
        let header_read_timeout = Duration::from_millis(40);
        let idle_timeout = Duration::from_millis(400);
        let overdue = |state: &ConnectionState| state.overdue(header_read_timeout, idle_timeout);
        let state = Arc::new(ConnectionState::new());
        assert!(state.is_idle());
        std::thread::sleep(Duration::from_millis(60));
        // Idle past the header timeout is still only idle.
        assert_eq!(overdue(&state), None);
        state.bytes_read();
        assert!(!state.is_idle());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            overdue(&state),
            Some("request head not received within header_read_timeout")
        );
        // A request being answered is never overdue here.
        let request = state.request_started();
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(overdue(&state), None);
        drop(request);
        assert!(state.is_idle());
    }
}
