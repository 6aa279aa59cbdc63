//! A listener that serves at most N connections at once (the N+1st waits in the kernel's
//! listen backlog until one closes; WebSockets count) and closes a connection that moves no
//! byte either way for an idle timeout, so that neither many streams nor idle or half-open
//! connections hold the daemon's memory, descriptors or every slot.

use std::{
    future::Future as _,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::warn;

pub struct Limited<L> {
    inner: L,
    permits: Arc<Semaphore>,
    max: usize,
    idle: Duration,
    warned: bool,
}

impl<L> Limited<L> {
    /// At most `max` connections; each closed after `idle` without a byte read or written.
    pub fn new(inner: L, max: usize, idle: Duration) -> Self {
        Limited { inner, permits: Arc::new(Semaphore::new(max)), max, idle, warned: false }
    }
}

/// A connection holding its permit until dropped, failing with TimedOut once idle too long.
pub struct Counted<S> {
    io: S,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Counted<S> {
    fn touch(&mut self) {
        self.deadline.as_mut().reset(tokio::time::Instant::now() + self.idle);
    }

    /// What a read or write of the inner stream returned: done, it counts as activity;
    /// pending, it becomes an error once the connection has been idle for the timeout.
    fn track<T>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.touch();
                Poll::Ready(r)
            }
            Poll::Pending if self.deadline.as_mut().poll(cx).is_ready() => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn idle_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "API connection idle: closed")
}

impl<L: axum::serve::Listener> axum::serve::Listener for Limited<L>
where
    L::Io: Unpin,
{
    type Io = Counted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !self.warned {
                    warn!(max_connections = self.max, "API connection limit reached; new connections wait");
                    self.warned = true;
                }
                self.permits.clone().acquire_owned().await.expect("the semaphore is never closed")
            }
        };
        let (io, addr) = self.inner.accept().await;
        let deadline = Box::pin(tokio::time::sleep(self.idle));
        (Counted { io, _permit: permit, idle: self.idle, deadline }, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        self.track(cx, r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.track(cx, r)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.track(cx, r)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn counted(io: tokio::io::DuplexStream, idle: Duration) -> Counted<tokio::io::DuplexStream> {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        Counted { io, _permit: permit, idle, deadline: Box::pin(tokio::time::sleep(idle)) }
    }

    #[tokio::test]
    async fn an_idle_connection_fails_and_an_active_one_does_not() {
        let (a, mut peer) = tokio::io::duplex(64);
        let mut c = counted(a, Duration::from_millis(300));
        // Bytes every 100 ms keep it open past the timeout.
        for _ in 0..5 {
            peer.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t0 = std::time::Instant::now();
        let mut b = [0u8; 1];
        let e = c.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(150), "{:?}", t0.elapsed());
    }
}
