//! Raw bytes in request targets, as legacy clients send them (an old Windows system putting
//! GBK "张三" in a query unescaped; a Java client putting `{"a":1}` in one): percent-encoded
//! on the connection's read side before hyper parses the request line, so such requests are
//! served as nginx serves them (SPEC section 4.1).
//!
//! Why an adapter, not a parser: hyper (through httparse) accepts these bytes in a request
//! line and then refuses the target when building its `Uri`, with a bare 400. Escaping them
//! where they arrive keeps hyper the only HTTP parser: [`EscapeTargets`] never interprets a
//! request, it only finds where request lines start. It knows that for certain at the
//! start of the connection and after a head that has no body: one without a
//! `Content-Length` or `Transfer-Encoding` field (RFC 9112 section 6.3; only the field
//! names are looked at, case-insensitively, at line starts, never their values). A head
//! that has one (or may: a line cut off by the end of a read that could still become one),
//! or that is followed by anything but a method and a space (HTTP/2's frames after its
//! preface), ends its work on that connection: from then on bytes pass untouched, so a body
//! is never altered and never taken for a request (a raw target on a later request after a
//! body gets hyper's 400, which is logged and counted).
//!
//! Which bytes: `0x80`-`0xFF` and every visible ASCII byte the `http` crate refuses in a
//! path or query (a unit test asks it, byte by byte, so the two cannot drift apart). A
//! request line longer than the head limit is left alone (hyper refuses it as too large).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::MAX_HEAD_BYTES;

/// Methods a request line after a bodiless request may start with (RFC 9110 section 9
/// and PATCH); anything else there is not taken for a request line.
const METHODS: [&[u8]; 8] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
];

/// Whether a request-line byte is escaped: `0x80`-`0xFF`, DEL, and the visible ASCII bytes
/// the `http` crate refuses in a path or query (`"`, `<`, `>`, `` ` ``; a unit test holds
/// this to what `http` does, byte by byte). Written as comparisons so that a line's check
/// compiles to vector compares.
fn escapes(b: u8) -> bool {
    (b >= 0x7F) | (b == b'"') | (b == b'<') | (b == b'>') | (b == b'`')
}

/// The header fields that give a request a body (RFC 9112 section 6.3), lower case.
const FRAMING: [&[u8]; 2] = [b"content-length", b"transfer-encoding"];

/// Whether a header line starting with `start` names a framing field (`start` may hold more
/// of the line), or, when `cut` (the line goes on past the bytes read), may still name one.
fn frames(start: &[u8], cut: bool) -> bool {
    FRAMING.iter().any(|name| {
        let n = name.len().min(start.len());
        start[..n].eq_ignore_ascii_case(&name[..n]) && (n == name.len() || cut)
    })
}

/// Whether any byte of `line` is escaped (no early exit: vectorised).
fn any_escaped(line: &[u8]) -> bool {
    line.iter().fold(0u8, |any, &b| any | u8::from(escapes(b))) != 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a request line (this many bytes of it read).
    Line(usize),
    /// In a head's header lines; the last bytes seen, to find its end.
    Head,
    /// After a head: this many bytes of a method and a space seen so far.
    Sniff(usize),
    /// Not at a request line again on this connection: bytes pass untouched.
    Through,
}

/// The read side of a client connection with raw target bytes percent-encoded (see the
/// module docs); the write side passes through.
#[derive(Debug)]
pub struct EscapeTargets<I> {
    inner: I,
    state: State,
    /// The last bytes of a head seen (newest lowest), to find `\r\n\r\n` or `\n\n` across
    /// reads.
    tail: u32,
    /// The sniffed start of what follows a head.
    sniffed: [u8; 8],
    /// The head being read has (or may have) a body: no request line can be known after it.
    framed: bool,
    /// Byte at a time: bytes of the current header line seen, and which framing names
    /// (bit 0, 1 of [`FRAMING`]) they still match.
    line_pos: usize,
    line_may_frame: u8,
    /// Escaped bytes not yet handed on, and how many of them were.
    pending: Vec<u8>,
    handed: usize,
}

impl<I> EscapeTargets<I> {
    /// Wraps a client connection, at its start.
    pub fn new(inner: I) -> Self {
        EscapeTargets {
            inner,
            // A request line is known by its method: the bytes of an unknown one, raw
            // or not, are hyper's to judge.
            state: State::Sniff(0),
            tail: 0,
            sniffed: [0; 8],
            framed: false,
            line_pos: 0,
            line_may_frame: 0,
            pending: Vec::new(),
            handed: 0,
        }
    }

    /// Moves the state over `new` a line at a time (`memchr`, not a byte at a time: this
    /// runs for every request head); the index of the first byte to escape, the state then
    /// just past it.
    fn scan(&mut self, new: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < new.len() {
            let rest = &new[i..];
            match self.state {
                State::Through => return None,
                State::Head => match self.head_end(rest) {
                    Some(k) => {
                        i += k;
                        self.state = self.after_head();
                    }
                    None => {
                        self.remember(rest);
                        return None;
                    }
                },
                State::Line(n) => {
                    let end = memchr::memchr(b'\n', rest);
                    let line = &rest[..end.unwrap_or(rest.len())];
                    let escape = (n < MAX_HEAD_BYTES && any_escaped(line))
                        .then(|| line.iter().position(|&b| escapes(b)))
                        .flatten();
                    if let Some(j) = escape {
                        self.remember(&line[..=j]);
                        self.state = State::Line(n + j + 1);
                        return Some(i + j);
                    }
                    match end {
                        Some(e) => {
                            self.remember(&rest[..=e]);
                            self.state = State::Head;
                            i += e + 1;
                        }
                        None => {
                            self.remember(rest);
                            self.state = State::Line(n + rest.len());
                            return None;
                        }
                    }
                }
                // Empty lines before a request line are ignored (RFC 9112 section 2.2).
                State::Sniff(0) if rest[0] == b'\r' || rest[0] == b'\n' => i += 1,
                // The common case, a whole method and its space at hand: one comparison
                // per method, not a byte-at-a-time sniff (the longest, `OPTIONS `, is 8).
                State::Sniff(0) if rest.len() >= 8 => {
                    let method = rest[..8]
                        .iter()
                        .position(|&b| b == b' ')
                        .map(|sp| &rest[..=sp])
                        .filter(|m| METHODS.contains(m));
                    let Some(method) = method else {
                        self.state = State::Through;
                        return None;
                    };
                    self.state = State::Line(method.len());
                    self.tail = 0;
                    self.framed = false;
                    i += method.len();
                }
                State::Sniff(_) => {
                    if self.step(rest[0]) {
                        return Some(i);
                    }
                    i += 1;
                }
            }
        }
        None
    }

    /// Where in `rest` (read in [`State::Head`]) the head ends, just past its empty line
    /// (`\r\n` or a bare `\n`), if it does; notes in `framed` whether a line up to there
    /// names a framing field or, cut off by the end of `rest`, may.
    fn head_end(&mut self, rest: &[u8]) -> Option<usize> {
        let tail = self.tail;
        // The byte `k` before position `p`, from `rest` or from the bytes seen before it.
        let before = |p: usize, k: usize| -> u8 {
            if p >= k {
                rest[p - k]
            } else {
                (tail >> (8 * (k - p - 1))) as u8
            }
        };
        let mut framed = false;
        let mut check = |start: usize| {
            let line = &rest[start..];
            // Most lines (Host, User-Agent, Accept) are told apart by their first letter.
            if !matches!(line.first(), Some(b'c' | b'C' | b't' | b'T')) {
                return;
            }
            let cut = line.len() < 17 && !line.contains(&b'\n');
            framed |= frames(line, cut);
        };
        // A line starting this read (the last one ended the read before).
        if tail as u8 == b'\n' && !rest.is_empty() {
            check(0);
        }
        let end = memchr::memchr_iter(b'\n', rest)
            .find(|&p| {
                let empty = match before(p, 1) {
                    b'\n' => true,
                    b'\r' => before(p, 2) == b'\n',
                    _ => false,
                };
                if !empty && p + 1 < rest.len() {
                    check(p + 1);
                }
                empty
            })
            .map(|p| p + 1);
        self.framed |= framed;
        end
    }

    /// The state after a head: the next request line, unless the head has a body.
    fn after_head(&self) -> State {
        if self.framed {
            State::Through
        } else {
            State::Sniff(0)
        }
    }

    /// Byte at a time in a head: follows the current line's match with [`FRAMING`].
    fn follow_line(&mut self, b: u8) {
        if b == b'\n' {
            self.line_pos = 0;
            self.line_may_frame = 0b11;
            return;
        }
        for (bit, name) in FRAMING.iter().enumerate() {
            let mask = 1 << bit;
            if self.line_may_frame & mask == 0 {
                continue;
            }
            if name.get(self.line_pos) != Some(&b.to_ascii_lowercase()) {
                self.line_may_frame &= !mask;
            } else if self.line_pos + 1 == name.len() {
                self.framed = true;
                self.line_may_frame = 0;
            }
        }
        self.line_pos += 1;
    }

    /// At the end of a read handled byte at a time: a header line cut off there that may
    /// still name a framing field counts as one (the next read is scanned a line at a time).
    fn end_of_read(&mut self) {
        if self.state == State::Head && self.line_pos > 0 && self.line_may_frame != 0 {
            self.framed = true;
        }
    }

    /// Keeps the last bytes of `seen` in `tail`.
    fn remember(&mut self, seen: &[u8]) {
        for &b in &seen[seen.len().saturating_sub(4)..] {
            self.tail = (self.tail << 8) | u32::from(b);
        }
    }

    /// Moves the state over `b`; whether `b` is to be escaped.
    fn step(&mut self, b: u8) -> bool {
        match self.state {
            State::Through => false,
            State::Line(n) => {
                self.tail = (self.tail << 8) | u32::from(b);
                if b == b'\n' {
                    self.state = State::Head;
                    self.follow_line(b);
                    // A request line ending the head (`GET / HTTP/1.0\r\n\r\n`).
                    return false;
                }
                self.state = State::Line(n + 1);
                n < MAX_HEAD_BYTES && escapes(b)
            }
            State::Head => {
                self.tail = (self.tail << 8) | u32::from(b);
                // An empty line: `\n\r\n` or `\n\n`, as `head_end` finds it.
                if self.tail & 0xFF_FFFF == 0x0A_0D0A || self.tail & 0xFFFF == 0x0A0A {
                    self.state = self.after_head();
                } else {
                    self.follow_line(b);
                }
                false
            }
            State::Sniff(0) if b == b'\r' || b == b'\n' => false,
            State::Sniff(n) => {
                let Some(slot) = self.sniffed.get_mut(n) else {
                    self.state = State::Through;
                    return false;
                };
                *slot = b;
                let seen = &self.sniffed[..=n];
                if METHODS.contains(&seen) {
                    self.state = State::Line(n + 1);
                    self.tail = 0;
                    self.framed = false;
                } else if METHODS.iter().any(|m| m.starts_with(seen)) {
                    self.state = State::Sniff(n + 1);
                } else {
                    self.state = State::Through;
                }
                false
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for EscapeTargets<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.handed < this.pending.len() {
            let n = buf.remaining().min(this.pending.len() - this.handed);
            buf.put_slice(&this.pending[this.handed..this.handed + n]);
            this.handed += n;
            return Poll::Ready(Ok(()));
        }
        let start = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.state == State::Through || !matches!(polled, Poll::Ready(Ok(()))) {
            return polled;
        }
        // The common case: nothing to escape, the bytes stay where they are.
        let Some(first) = this.scan(&buf.filled()[start..]) else {
            return Poll::Ready(Ok(()));
        };
        // Escaping grows the bytes: they move to `pending` and are handed on from there.
        let read = buf.filled()[start..].to_vec();
        buf.set_filled(start + first);
        this.pending.clear();
        this.handed = 0;
        push_escaped(&mut this.pending, read[first]);
        for &b in &read[first + 1..] {
            if this.step(b) {
                push_escaped(&mut this.pending, b);
            } else {
                this.pending.push(b);
            }
        }
        this.end_of_read();
        let n = buf.remaining().min(this.pending.len());
        buf.put_slice(&this.pending[..n]);
        this.handed = n;
        Poll::Ready(Ok(()))
    }
}

fn push_escaped(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
}

impl<I: AsyncWrite + Unpin> AsyncWrite for EscapeTargets<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn through(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        EscapeTargets::new(input)
            .read_to_end(&mut out)
            .await
            .unwrap();
        out
    }

    #[tokio::test]
    async fn raw_target_bytes_are_escaped_in_request_lines_only() {
        let gbk = b"GET /api?name=\xd5\xc5\xc8\xfd HTTP/1.1\r\nHost: x\r\nX: \xd5\r\n\r\n";
        assert_eq!(
            through(gbk).await,
            b"GET /api?name=%D5%C5%C8%FD HTTP/1.1\r\nHost: x\r\nX: \xd5\r\n\r\n"
        );
        // A second request after a bodiless one; then a body, after which nothing changes.
        let two = b"GET /a?q={\"k\":1} HTTP/1.1\r\n\r\nPOST /b?x=\xe5 HTTP/1.1\r\nContent-Length: 8\r\n\r\n{\"\xe5\":1}GET /c?\xe5 HTTP/1.1\r\n\r\n";
        assert_eq!(
            through(two).await,
            b"GET /a?q={%22k%22:1} HTTP/1.1\r\n\r\nPOST /b?x=%E5 HTTP/1.1\r\nContent-Length: 8\r\n\r\n{\"\xe5\":1}GET /c?\xe5 HTTP/1.1\r\n\r\n".to_vec()
        );
        // What follows a head without being a method and a space ends the work.
        for after in [
            &b"GETS /\xe5 HTTP/1.1\r\n\r\n"[..],
            b"OPTIONSX /\xe5",
            b"get /\xe5 HTTP/1.1\r\n",
        ] {
            let mut input = b"GET / HTTP/1.1\r\n\r\n".to_vec();
            input.extend_from_slice(after);
            assert_eq!(through(&input).await, input);
        }
        // An unknown method is hyper's to judge, raw bytes and all; empty lines before a
        // request line are skipped, as hyper skips them.
        assert_eq!(
            through(b"G\xd5T /\xe5 HTTP/1.1\r\n\r\n").await,
            b"G\xd5T /\xe5 HTTP/1.1\r\n\r\n"
        );
        assert_eq!(
            through(b"\r\n\r\nGET /\xe5 HTTP/1.1\r\n\r\n").await,
            b"\r\n\r\nGET /%E5 HTTP/1.1\r\n\r\n"
        );
        // HTTP/2's preface and frames pass untouched.
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\xff\xfe";
        assert_eq!(through(h2).await, h2.to_vec());
    }

    /// Reads `input` through the adapter `size` bytes at a time.
    async fn in_reads_of(input: &[u8], size: usize) -> Vec<u8> {
        let mut r = EscapeTargets::new(input);
        let mut out = Vec::new();
        let mut chunk = vec![0u8; size];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn a_body_is_never_altered_nor_taken_for_a_request_line() {
        // A body that looks like a request line with raw bytes, then a smuggled request:
        // escaping it would lengthen the body and make its tail a second request.
        let body = b"GET /\xd5\xd5\xd5 HTTP/1.1\r\nDELETE /api/apps/v1/to-do/S HTTP/1.1\r\nHost: x\r\n\r\n";
        for (framing, suffix) in [
            (format!("Content-Length: {}", body.len()), &b""[..]),
            (format!("cOnTeNt-LeNgTh: {}", body.len()), b""),
            ("Transfer-Encoding: chunked".to_owned(), b""),
            (format!("X-A: 1\r\ncontent-length:{}", body.len()), b""),
        ] {
            let mut input = format!("POST /a?q=\u{0} HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n")
                .replace('\u{0}', "1")
                .into_bytes();
            input.extend_from_slice(body);
            input.extend_from_slice(suffix);
            for size in [1, 2, 3, 5, 7, 8, 13, 64, 4096] {
                assert_eq!(
                    in_reads_of(&input, size).await,
                    input,
                    "{framing}, reads of {size}"
                );
            }
            // The same with a raw byte in the request line: escaped there, nowhere else.
            let raw = [&b"POST /a?q=\xe5"[..], &input[b"POST /a?q=1".len()..]].concat();
            let mut want = b"POST /a?q=%E5".to_vec();
            want.extend_from_slice(&input[b"POST /a?q=1".len()..]);
            for size in [1, 2, 3, 5, 7, 8, 13, 64, 4096] {
                assert_eq!(
                    in_reads_of(&raw, size).await,
                    want,
                    "{framing} raw, reads of {size}"
                );
            }
        }
        // Without a framing field the next request line is known: escaped, whatever the
        // reads (a header merely starting like one counts as one: `Content-Type` does not).
        let input = b"GET /a HTTP/1.1\r\nContent-Type: x\r\nTransfer: y\r\n\r\nGET /b?\xe5 HTTP/1.1\r\n\r\n";
        let want =
            b"GET /a HTTP/1.1\r\nContent-Type: x\r\nTransfer: y\r\n\r\nGET /b?%E5 HTTP/1.1\r\n\r\n";
        assert_eq!(in_reads_of(input, 4096).await, want);
    }

    #[test]
    fn the_escaped_bytes_are_those_http_refuses_in_a_target() {
        for b in 0u8..=0xFF {
            let refused = b >= 0x80 || {
                let c = b as char;
                (0x21..=0x7F).contains(&b)
                    && c != '#'
                    && c != '%'
                    && (http::uri::PathAndQuery::try_from(format!("/a{c}b?c").as_str()).is_err()
                        || http::uri::PathAndQuery::try_from(format!("/?a{c}b").as_str()).is_err())
            };
            assert_eq!(escapes(b), refused, "{b:#04x}");
        }
    }

    #[tokio::test]
    async fn reads_of_any_size_give_the_same_bytes() {
        let input: &[u8] = b"GET /\xe5\xe5 HTTP/1.1\r\nHost: x\r\n\r\nGET /b?\xe6 HTTP/1.0\n\nOPTIONS /d?\xe9 HTTP/1.1\r\n\r\nPOST /c?\xe7 HTTP/1.1\r\n\r\n{\"\xe8\"}";
        let want: &[u8] = b"GET /%E5%E5 HTTP/1.1\r\nHost: x\r\n\r\nGET /b?%E6 HTTP/1.0\n\nOPTIONS /d?%E9 HTTP/1.1\r\n\r\nPOST /c?%E7 HTTP/1.1\r\n\r\n{\"\xe8\"}";
        assert_eq!(through(input).await, want);
        for size in 1..=9 {
            let mut r = EscapeTargets::new(input);
            let mut out = Vec::new();
            let mut chunk = [0u8; 9];
            loop {
                let n = r.read(&mut chunk[..size]).await.unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(out, want, "reads of {size}");
        }
    }
}
