//! Writing answers on the held-poll path: in place without waiting (the publisher's write),
//! whole under the write timeout (the connection's own), and the HTTP/1.1 encoding of a
//! response and of a batch's shared answer.

use super::*;

/// Writes `parts` now if the socket takes them: `None` when all was written, else the rest.
///
/// Written to the socket directly, past tokio's readiness bookkeeping (which costs a cache miss
/// per socket in a fan-out): a full socket only means that the connection's own next wait for
/// write readiness returns once at once, finds the socket still full, and waits properly.
pub(super) fn write_now(stream: &TcpStream, parts: &[&[u8]; 4]) -> io::Result<Option<Vec<u8>>> {
    let slices = parts.map(IoSlice::new);
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let written = match socket2::SockRef::from(stream).send_vectored(&slices) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if written == total {
        return Ok(None);
    }
    Ok(Some(parts.concat().split_off(written)))
}

/// Writes all of `bufs`; a write blocked for `timeout` fails.
pub(super) async fn write_all<P: HeldPoll>(
    socket: &Socket<P>,
    bufs: &mut [IoSlice<'_>],
    timeout: Duration,
) -> io::Result<()> {
    let mut bufs = bufs;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match socket.stream.try_write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::timeout(timeout, socket.write_ready())
                    .await
                    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether a connection goes on after a response.
pub(super) enum Keep {
    Open,
    Close,
}

/// Awaits and writes a response; it closes the connection when it says so or the server drains.
/// While the answer is awaited (an authorization decision, then a poll's whole hold), the
/// client is watched: if it closes, the answer is dropped (its poll counts as its client gone).
pub(super) async fn respond<P: HeldPoll>(
    socket: &Socket<P>,
    answer: Answer,
    buf: &mut Vec<u8>,
    drain: &Drain,
    timeout: Duration,
) -> io::Result<Keep> {
    let mut answer = answer;
    let mut reading = buf.is_empty();
    let resp = loop {
        tokio::select! {
            resp = &mut answer => break resp,
            r = socket.read_ready(), if reading => {
                let gone = match r {
                    Err(_) => true,
                    Ok(()) => {
                        buf.reserve(HEAD_BUFFER);
                        match socket.stream.try_read_buf(buf) {
                            Ok(0) => true,
                            // The client's next request, pipelined: kept for later.
                            Ok(_) => {
                                reading = false;
                                false
                            }
                            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
                        }
                    }
                };
                if gone {
                    return Ok(Keep::Close);
                }
            }
        }
    };
    let close = drain.is_draining() || says_close(resp.headers());
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.put_u8(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    with_date(|date| head.extend_from_slice(date));
    header_lines(&parts.headers, &mut head);
    if close && !parts.headers.contains_key(header::CONNECTION) {
        head.extend_from_slice(b"connection: close\r\n");
    }
    // Statuses without a body (RFC 9110 6.4.1): none is written, whatever the response held.
    let no_body = parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED
        || parts.status.is_informational();
    let body = if no_body { Bytes::new() } else { body };
    if !no_body {
        content_length(body.len(), &mut head);
    }
    head.extend_from_slice(b"\r\n");
    let bufs = &mut [IoSlice::new(&head), IoSlice::new(&body)];
    write_all(socket, bufs, timeout).await?;
    Ok(if close { Keep::Close } else { Keep::Open })
}

/// Whether a response closes its connection (`close` among its `Connection` options).
fn says_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// A batch's answer after its status and date lines: headers, then the body.
pub(super) fn batch_tail(resp: &Response<Body>, batch: &Batch) -> Bytes {
    let mut out = Vec::with_capacity(160 + batch.body.len());
    header_lines(resp.headers(), &mut out);
    content_length(batch.body.len(), &mut out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&batch.body);
    out.into()
}

pub(super) fn header_lines(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

fn content_length(len: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Calls `f` with this second's `date` header line (formatted once per second and thread).
pub(super) fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    thread_local! {
        static DATE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, line)| {
        if *at != second {
            *at = second;
            line.clear();
            line.extend_from_slice(b"date: ");
            line.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            line.extend_from_slice(b"\r\n");
        }
        f(line)
    })
}
