//! The access-log line (README "Logs", SPEC section 3), formatted by hand straight into the
//! thread's log buffer.
//!
//! Through tracing-subscriber's formatter the line cost ~22k instructions per request
//! (field visitors, `core::fmt` for every piece, ANSI wrappers even with colours off, the
//! timestamp); here it costs a few thousand. The bytes are those the formatter wrote, in text
//! and in JSON, except that durations are written to the microsecond (`total_ms=2.319`)
//! instead of as the shortest `f64` (`2.3192809999999997`). When this crate's logger is not
//! the one installed (a library user's own subscriber), the line goes out as a tracing event
//! instead, with the same fields.

use std::fmt::Display;
use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One request's access-log line.
pub struct AccessLine<'a> {
    /// The request id (the client's `X-Request-Id` or a new one).
    pub request_id: &'a str,
    /// The client's address (`-` when unknown).
    pub peer: Option<std::net::SocketAddr>,
    /// The identified `[[client]]`, else `-`.
    pub client: &'a str,
    /// The app the request was routed to, else `-`.
    pub app: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The path and query, secrets masked.
    pub path: &'a dyn Display,
    /// The client's protocol.
    pub protocol: http::Version,
    /// The client's `User-Agent` (first 200 characters), else `-`.
    pub user_agent: &'a str,
    /// The answer's status code.
    pub status: u16,
    /// The answer's declared length in bytes.
    pub bytes: Option<u64>,
    /// From the request's arrival to its answer's head.
    pub total: Duration,
    /// The upstream exchange, when there was one.
    pub upstream: Option<Duration>,
    /// The proxy's error kind, when it answered itself.
    pub error: Option<&'a str>,
    /// That error's message.
    pub cause: Option<&'a str>,
}

/// The protocol as the log has always written it (`http::Version`'s `Debug`).
fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

impl AccessLine<'_> {
    /// Appends the line, newline included, as text or as one JSON object.
    pub fn write(&self, json: bool, out: &mut Vec<u8>) {
        if json {
            self.write_json(out)
        } else {
            self.write_text(out)
        }
    }

    fn write_text(&self, out: &mut Vec<u8>) {
        timestamp(out);
        out.extend_from_slice(b"  INFO cx_proxy::access: request_id=");
        quoted(out, self.request_id);
        out.extend_from_slice(b" peer=");
        peer(out, self.peer);
        out.extend_from_slice(b" client=");
        quoted(out, self.client);
        out.extend_from_slice(b" app=");
        quoted(out, self.app);
        out.extend_from_slice(b" method=");
        out.extend_from_slice(self.method.as_bytes());
        let _ = write!(out, " path={}", self.path);
        out.extend_from_slice(b" protocol=");
        out.extend_from_slice(protocol(self.protocol).as_bytes());
        out.extend_from_slice(b" user_agent=");
        quoted(out, self.user_agent);
        out.extend_from_slice(b" status=");
        number(out, u64::from(self.status));
        if let Some(bytes) = self.bytes {
            out.extend_from_slice(b" bytes=");
            number(out, bytes);
        }
        out.extend_from_slice(b" total_ms=");
        millis(out, self.total);
        if let Some(upstream) = self.upstream {
            out.extend_from_slice(b" upstream_ms=");
            millis(out, upstream);
        }
        if let Some(error) = self.error {
            out.extend_from_slice(b" error=");
            quoted(out, error);
        }
        if let Some(cause) = self.cause {
            out.extend_from_slice(b" cause=");
            quoted(out, cause);
        }
        out.push(b'\n');
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"request_id\":");
        json_str(out, self.request_id);
        out.extend_from_slice(b",\"peer\":\"");
        peer(out, self.peer);
        out.push(b'"');
        out.extend_from_slice(b",\"client\":");
        json_str(out, self.client);
        out.extend_from_slice(b",\"app\":");
        json_str(out, self.app);
        out.extend_from_slice(b",\"method\":");
        json_str(out, self.method);
        out.extend_from_slice(b",\"path\":");
        json_display(out, self.path);
        out.extend_from_slice(b",\"protocol\":\"");
        out.extend_from_slice(protocol(self.protocol).as_bytes());
        out.extend_from_slice(b"\",\"user_agent\":");
        json_str(out, self.user_agent);
        out.extend_from_slice(b",\"status\":");
        number(out, u64::from(self.status));
        if let Some(bytes) = self.bytes {
            out.extend_from_slice(b",\"bytes\":");
            number(out, bytes);
        }
        out.extend_from_slice(b",\"total_ms\":");
        millis(out, self.total);
        if let Some(upstream) = self.upstream {
            out.extend_from_slice(b",\"upstream_ms\":");
            millis(out, upstream);
        }
        if let Some(error) = self.error {
            out.extend_from_slice(b",\"error\":");
            json_str(out, error);
        }
        if let Some(cause) = self.cause {
            out.extend_from_slice(b",\"cause\":");
            json_str(out, cause);
        }
        out.extend_from_slice(b",\"target\":\"cx_proxy::access\"}\n");
    }

    /// The same line as a tracing event, for a subscriber other than this crate's.
    pub fn event(&self) {
        tracing::info!(
            target: "cx_proxy::access",
            request_id = self.request_id,
            peer = %Peer(self.peer),
            client = self.client,
            app = self.app,
            method = %self.method,
            path = %self.path,
            protocol = %protocol(self.protocol),
            user_agent = self.user_agent,
            status = self.status,
            bytes = self.bytes,
            total_ms = self.total.as_secs_f64() * 1000.0,
            upstream_ms = self.upstream.map(|d| d.as_secs_f64() * 1000.0),
            error = self.error,
            cause = self.cause,
        );
    }
}

/// Whether `s` can be written between quotes as it is, in Rust's `Debug` and in JSON alike.
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// `s` quoted and escaped as `Debug` does (what the formatter wrote for string fields).
fn quoted(out: &mut Vec<u8>, s: &str) {
    if plain(s) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// `s` as a JSON string.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if plain(s) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // A string always serialises.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// `value`'s `Display` as a JSON string.
fn json_display(out: &mut Vec<u8>, value: &dyn Display) {
    let start = out.len();
    let _ = write!(out, "{value}");
    let shown = &out[start..];
    if shown
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.insert(start, b'"');
        out.push(b'"');
    } else {
        let text = String::from_utf8_lossy(&out[start..]).into_owned();
        out.truncate(start);
        json_str(out, &text);
    }
}

/// Milliseconds to the microsecond: `2.319`.
fn millis(out: &mut Vec<u8>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    number(out, us / 1000);
    let frac = us % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// `n` in decimal (`core::fmt`'s integer path costs several times more).
fn number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The client's address as `Display` writes it: `127.0.0.1:44486`, `[::1]:5`, `-`.
fn peer(out: &mut Vec<u8>, addr: Option<std::net::SocketAddr>) {
    match addr {
        Some(std::net::SocketAddr::V4(a)) => {
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(out, u64::from(octet));
            }
            out.push(b':');
            number(out, u64::from(a.port()));
        }
        Some(a) => {
            let _ = write!(out, "{a}");
        }
        None => out.push(b'-'),
    }
}

/// A peer for a tracing event.
struct Peer(Option<std::net::SocketAddr>);

impl Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("-"),
        }
    }
}

thread_local! {
    /// The second last written and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// Now, in RFC 3339 UTC to the microsecond, as the formatter wrote it:
/// `2026-12-05T05:06:57.540692Z`.
fn timestamp(out: &mut Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    timestamp_at(out, now);
}

/// [`timestamp`] for `now` after the Unix epoch.
fn timestamp_at(out: &mut Vec<u8>, now: Duration) {
    let secs = now.as_secs();
    let (cached, mut text) = SECOND.with(std::cell::Cell::get);
    if cached != secs {
        text = civil(secs);
        SECOND.with(|s| s.set((secs, text)));
    }
    out.extend_from_slice(&text);
    // Six digits by hand: `write!` with `{:06}` cost more than the rest of the stamp.
    let mut frac = *b".000000Z";
    let mut us = now.subsec_micros();
    for d in frac[1..7].iter_mut().rev() {
        *d = b'0' + (us % 10) as u8;
        us /= 10;
    }
    out.extend_from_slice(&frac);
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time in seconds.
fn civil(secs: u64) -> [u8; 19] {
    let rem = secs % 86_400;
    let (year, month, day) = super::civil::civil_from_days((secs / 86_400) as i64);
    let mut text = [0u8; 19];
    let mut cursor = std::io::Cursor::new(&mut text[..]);
    let _ = write!(
        cursor,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        year.clamp(0, 9999),
        month,
        day,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(path: &'a dyn Display, peer: &str) -> AccessLine<'a> {
        let peer = peer.parse().ok();
        AccessLine {
            request_id: "090b83cc0005592e",
            peer,
            client: "-",
            app: "bench",
            method: "GET",
            path,
            protocol: http::Version::HTTP_11,
            user_agent: "curl/7.88.1",
            status: 200,
            bytes: Some(53),
            total: Duration::from_micros(2319),
            upstream: Some(Duration::from_micros(2_314_081)),
            error: None,
            cause: None,
        }
    }

    #[test]
    fn text_is_the_formatter_s_layout() {
        let mut out = Vec::new();
        line(&"/api/x?group_id=1", "127.0.0.1:44486").write(false, &mut out);
        let text = String::from_utf8(out).unwrap();
        let (ts, rest) = text.split_once("  ").unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        assert_eq!(
            rest,
            "INFO cx_proxy::access: request_id=\"090b83cc0005592e\" peer=127.0.0.1:44486 \
             client=\"-\" app=\"bench\" method=GET path=/api/x?group_id=1 protocol=HTTP/1.1 \
             user_agent=\"curl/7.88.1\" status=200 bytes=53 total_ms=2.319 upstream_ms=2314.081\n"
        );
    }

    #[test]
    fn json_is_one_object_with_every_field_and_odd_bytes_escaped() {
        let mut l = line(&"/a?q=\"x\"\\", "[::1]:5");
        l.user_agent = "agent \u{7f}\n\"q\" 橙";
        l.error = Some("no_route");
        l.cause = Some("no app serves \"/api/d\"");
        l.bytes = None;
        l.upstream = None;
        let mut out = Vec::new();
        l.write(true, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["target"], "cx_proxy::access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["path"], "/a?q=\"x\"\\");
        assert_eq!(v["peer"], "[::1]:5");
        assert_eq!(v["user_agent"], "agent \u{7f}\n\"q\" 橙");
        assert_eq!(v["error"], "no_route");
        assert_eq!(v["cause"], "no app serves \"/api/d\"");
        assert_eq!(v["status"], 200);
        assert_eq!(v["total_ms"], 2.319);
        let mut l = line(&"/p", "10.0.255.7:65535");
        l.total = Duration::from_micros(7_000_005);
        l.status = 502;
        let mut out = Vec::new();
        l.write(true, &mut out);
        let w: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(w["peer"], "10.0.255.7:65535");
        assert_eq!(w["total_ms"], 7000.005);
        assert_eq!(w["status"], 502);
        assert!(v.get("bytes").is_none() && v.get("upstream_ms").is_none());
        let stamp = v["timestamp"].as_str().unwrap();
        assert_eq!(stamp.len(), 27, "{stamp}");
    }

    #[test]
    fn text_escapes_as_debug_does() {
        let mut l = line(&"/p", "-");
        l.user_agent = "a\"b\\c\n";
        let mut out = Vec::new();
        l.write(false, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#"user_agent="a\"b\\c\n""#), "{text}");
    }

    #[test]
    fn stamps_carry_six_digits_of_microseconds() {
        for (nanos, want) in [
            (42_000, "2026-12-05T05:06:57.000042Z"),
            (540_692_999, "2026-12-05T05:06:57.540692Z"),
            (0, "2026-12-05T05:06:57.000000Z"),
            (999_999_000, "2026-12-05T05:06:57.999999Z"),
        ] {
            let mut out = Vec::new();
            timestamp_at(&mut out, Duration::new(1_796_447_217, nanos));
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn dates_are_the_calendar_s() {
        assert_eq!(&civil(0), b"1970-01-01T00:00:00");
        assert_eq!(&civil(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&civil(1_796_448_417), b"2026-12-05T05:26:57");
        assert_eq!(&civil(4_107_542_399), b"2100-02-28T23:59:59");
    }
}
