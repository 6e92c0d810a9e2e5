//! The hand-off to hyper: the connection's socket, with the bytes already read put back in
//! front of it, as hyper's I/O for the rest of the connection.

use super::*;

/// The connection, handed to hyper: the bytes read so far come first.
pub struct Handoff<P: HeldPoll> {
    socket: Arc<Socket<P>>,
    read: Bytes,
}

impl<P: HeldPoll> Handoff<P> {
    pub(super) fn new(socket: Arc<Socket<P>>, read: Vec<u8>) -> Handoff<P> {
        Handoff {
            socket,
            read: read.into(),
        }
    }

    fn stream(&self) -> &TcpStream {
        &self.socket.stream
    }
}

impl<P: HeldPoll> AsyncRead for Handoff<P> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.stream().poll_read_ready(cx))?;
            match self.stream().try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r.map(drop)),
            }
        }
    }
}

impl<P: HeldPoll> AsyncWrite for Handoff<P> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream().poll_write_ready(cx))?;
            match self.stream().try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream().poll_write_ready(cx))?;
            match self.stream().try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let sock = socket2::SockRef::from(self.stream());
        Poll::Ready(sock.shutdown(std::net::Shutdown::Write))
    }
}
