//! A listener that serves at most N connections at once: the N+1st waits in the kernel's
//! listen backlog until one closes. Upgraded WebSockets count too (they are connections), so
//! neither many idle keep-alive connections nor many streams can exhaust the daemon's memory or
//! file descriptors.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
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
    warned: bool,
}

impl<L> Limited<L> {
    pub fn new(inner: L, max: usize) -> Self {
        Limited { inner, permits: Arc::new(Semaphore::new(max)), max, warned: false }
    }
}

/// A connection holding its permit until dropped.
pub struct Counted<S> {
    io: S,
    _permit: OwnedSemaphorePermit,
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
        (Counted { io, _permit: permit }, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
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
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
