//! A small HTTP/1.1 keep-alive client for the load tool: requests are written as bytes,
//! responses parsed with `httparse`, bodies read by `Content-Length`. Small per connection, so
//! the tool's own memory and CPU stay out of the way of the server it measures.

use std::io;
use std::net::{IpAddr, SocketAddr};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Read buffer of a connection; grows only for large responses.
const READ_CHUNK: usize = 4096;
/// Headers a response may carry.
const MAX_HEADERS: usize = 32;

/// The parts of a response the tool uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub last_modified: Option<String>,
    pub etag: Option<String>,
    pub body: Vec<u8>,
}

pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Connects to `server`, from `source` when given (spreads ephemeral ports over loopback
    /// addresses).
    pub async fn open(server: SocketAddr, source: Option<IpAddr>) -> io::Result<Conn> {
        let socket = match server {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(server).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::new(),
        })
    }

    /// Writes a request head (and body) without waiting for the answer.
    pub async fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.stream.write_all(request).await
    }

    /// Reads one whole response.
    pub async fn receive(&mut self) -> io::Result<Reply> {
        loop {
            if let Some(reply) = parse(&mut self.buf)? {
                return Ok(reply);
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ));
            }
        }
    }

    pub async fn request(&mut self, request: &[u8]) -> io::Result<Reply> {
        self.send(request).await?;
        self.receive().await
    }
}

/// Parses one response off the front of `buf` once it is complete.
pub fn parse(buf: &mut BytesMut) -> io::Result<Option<Reply>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
    };
    let mut reply = Reply {
        status: resp.code.unwrap_or(0),
        ..Reply::default()
    };
    let mut length = 0usize;
    for h in resp.headers.iter() {
        let value = || String::from_utf8_lossy(h.value).into_owned();
        if h.name.eq_ignore_ascii_case("content-length") {
            length = value()
                .trim()
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        } else if h.name.eq_ignore_ascii_case("last-modified") {
            reply.last_modified = Some(value());
        } else if h.name.eq_ignore_ascii_case("etag") {
            reply.etag = Some(value());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "chunked responses are not expected from the servers under test",
            ));
        }
    }
    if buf.len() < head_len + length {
        return Ok(None);
    }
    buf.advance(head_len);
    reply.body = buf.split_to(length).to_vec();
    Ok(Some(reply))
}

/// A GET request head.
pub fn get(host: &str, path: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (k, v) in extra_headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// A POST request with a text body.
pub fn post(host: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Splits `http://host:port/path` into the address and the path.
pub fn split_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = authority
        .parse()
        .map_err(|_| format!("{url}: the host must be an IP:port on loopback"))?;
    let path = if path.is_empty() { "/" } else { path };
    Ok((addr, path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_complete_responses_only() {
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nEtag: 7\r\nLast-Modified: x\r\n\r\nhelloHTTP/1.1 204";
        let mut buf = BytesMut::from(&text[..text.len() - 12]);
        let r = parse(&mut buf).unwrap().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello");
        assert_eq!(r.etag.as_deref(), Some("7"));
        assert_eq!(r.last_modified.as_deref(), Some("x"));
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"[..]);
        assert_eq!(parse(&mut partial).unwrap(), None);
        let mut bad = BytesMut::from(&b"NOT HTTP\r\n\r\n"[..]);
        assert!(parse(&mut bad).is_err());
    }

    #[test]
    fn splits_urls() {
        let (addr, path) = split_url("http://127.0.0.1:8080/news/{topic}").unwrap();
        assert_eq!(addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(path, "/news/{topic}");
        assert!(split_url("https://x/").is_err());
        assert!(split_url("http://localhost:1/").is_err());
    }
}
