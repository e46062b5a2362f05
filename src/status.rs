//! The status page (`GET /status` on the admin port, SPEC section 6): what an operator looks
//! at first. It owns the page's memory, per app the requests and server errors of the last
//! 15 minutes in 10-second buckets ([`Traffic`], a fixed ring of atomics written on the
//! request path), and the page itself, rendered on the server with maud (every value
//! HTML-escaped: the platform's `err_msg` is untrusted text) with small inline SVG charts and
//! a meta refresh: no script, nothing fetched by the browser, no secret or token.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use maud::{html, Markup, PreEscaped, DOCTYPE};

/// Seconds per bucket.
pub const BUCKET_SECS: u64 = 10;
/// Buckets kept: 15 minutes.
pub const BUCKETS: usize = 90;

/// Requests and server errors (5xx) per app in 10-second buckets, the last [`BUCKETS`].
///
/// A bucket is claimed for its window by the first request that lands in it (a
/// compare-and-swap of its window number, then its counts are zeroed); a request racing that
/// claim may be lost from the chart, never from the metrics.
#[derive(Debug)]
pub struct Traffic {
    origin: Instant,
    apps: Vec<AppTraffic>,
}

#[derive(Debug)]
struct AppTraffic {
    /// The window each bucket holds (window numbers start at 1; 0: empty).
    window: [AtomicU64; BUCKETS],
    requests: [AtomicU32; BUCKETS],
    errors: [AtomicU32; BUCKETS],
}

impl Traffic {
    /// Empty buckets for `apps` apps.
    pub fn new(apps: usize) -> Self {
        Traffic {
            origin: Instant::now(),
            apps: (0..apps)
                .map(|_| AppTraffic {
                    window: std::array::from_fn(|_| AtomicU64::new(0)),
                    requests: std::array::from_fn(|_| AtomicU32::new(0)),
                    errors: std::array::from_fn(|_| AtomicU32::new(0)),
                })
                .collect(),
        }
    }

    fn window(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() / BUCKET_SECS + 1
    }

    /// Counts one answered request of app `app` (`None`: not routed, not charted).
    pub fn record(&self, app: Option<usize>, server_error: bool) {
        let Some(a) = app.and_then(|i| self.apps.get(i)) else {
            return;
        };
        let window = self.window(Instant::now());
        let slot = (window % BUCKETS as u64) as usize;
        let held = a.window[slot].load(Ordering::Relaxed);
        if held != window
            && a.window[slot]
                .compare_exchange(held, window, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            a.requests[slot].store(0, Ordering::Relaxed);
            a.errors[slot].store(0, Ordering::Relaxed);
        }
        a.requests[slot].fetch_add(1, Ordering::Relaxed);
        if server_error {
            a.errors[slot].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// App `app`'s last [`BUCKETS`] buckets, oldest first, as (requests, errors).
    pub fn series(&self, app: usize) -> Vec<(u32, u32)> {
        let Some(a) = self.apps.get(app) else {
            return Vec::new();
        };
        let now = self.window(Instant::now());
        (0..BUCKETS as u64)
            .rev()
            .map(|back| {
                let Some(window) = now.checked_sub(back).filter(|w| *w > 0) else {
                    return (0, 0);
                };
                let slot = (window % BUCKETS as u64) as usize;
                if a.window[slot].load(Ordering::Relaxed) == window {
                    (
                        a.requests[slot].load(Ordering::Relaxed),
                        a.errors[slot].load(Ordering::Relaxed),
                    )
                } else {
                    (0, 0)
                }
            })
            .collect()
    }
}

/// One app as the page shows it.
#[derive(Debug, Clone)]
pub struct AppView {
    /// The configured name.
    pub name: String,
    /// Holds a usable token.
    pub ready: bool,
    /// Seconds left on the token.
    pub seconds_left: u64,
    /// The last fetch error while not ready (may quote the platform's `err_msg`).
    pub last_error: Option<String>,
    /// Requests and server errors per 10 s, oldest first.
    pub series: Vec<(u32, u32)>,
}

/// One callback route's queue as the page shows it.
#[derive(Debug, Clone)]
pub struct QueueView {
    /// Route name.
    pub route: String,
    /// Events waiting.
    pub pending: u64,
    /// Dead letters.
    pub dead: u64,
    /// Age of the oldest waiting event, seconds.
    pub oldest_pending_s: u64,
}

/// An inline SVG line chart of requests (and server errors, in red) per 10 s.
fn chart(series: &[(u32, u32)]) -> Markup {
    const W: usize = 3;
    const H: u32 = 40;
    let max = series.iter().map(|(r, _)| *r).max().unwrap_or(0).max(1);
    let points = |pick: fn(&(u32, u32)) -> u32| -> String {
        series
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{},{}", i * W, H - pick(p) * H / max))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let width = series.len().saturating_sub(1) * W;
    html! {
        svg class="chart" width=(width) height=(H) viewBox=(format!("0 0 {width} {H}"))
            role="img" aria-label="requests and server errors per 10 seconds, last 15 minutes" {
            polyline class="requests" fill="none" stroke="#2563eb" stroke-width="1.5"
                points=(points(|p| p.0)) {}
            polyline class="errors" fill="none" stroke="#dc2626" stroke-width="1.5"
                points=(points(|p| p.1)) {}
        }
    }
}

/// What else the page shows, from the metrics: platform error answers by app and code
/// (since start), and the call-limit windows in use.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// (app, platform `err_code`, answers so far).
    pub platform_errors: Vec<(String, String, u64)>,
    /// (app, rule, calls in the current window, limit).
    pub limits: Vec<(String, String, i64, String)>,
}

/// The page: every app with its token state, time left, last fetch error and traffic chart;
/// the platform's error codes and the call-limit windows when there are any; the callback
/// queues when the relay runs. Refreshes itself every 10 s.
pub fn page(
    version: &str,
    apps: &[AppView],
    extras: &Extras,
    queues: Option<&[QueueView]>,
) -> String {
    let style = PreEscaped(
        "body{font:14px system-ui,sans-serif;margin:1.5em;color:#111}\
         table{border-collapse:collapse}td,th{padding:.35em .8em;border-bottom:1px solid #ddd;\
         text-align:left;vertical-align:middle}.ok{color:#15803d}.bad{color:#b91c1c}\
         .err{font-family:monospace;max-width:40em;overflow-wrap:anywhere}",
    );
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="10";
                title { "cx-proxy status" }
                style { (style) }
            }
            body {
                h1 { "cx-proxy status" }
                p { "Version " (version) ". Requests (blue) and server errors (red) per 10 seconds over the last 15 minutes; the page refreshes every 10 seconds." }
                table id="apps" {
                    thead { tr { th { "App" } th { "Token" } th { "Time left" } th { "Last fetch error" } th { "Traffic" } } }
                    tbody {
                        @for app in apps {
                            tr class="app" data-app=(app.name) {
                                td class="name" { (app.name) }
                                @if app.ready {
                                    td class="token ok" { "ready" }
                                } @else {
                                    td class="token bad" { "no usable token" }
                                }
                                td class="left" { (format!("{}m {:02}s", app.seconds_left / 60, app.seconds_left % 60)) }
                                td class="err" { (app.last_error.as_deref().unwrap_or("")) }
                                td { (chart(&app.series)) }
                            }
                        }
                    }
                }
                @if !extras.platform_errors.is_empty() {
                    h2 { "Platform error codes (since start)" }
                    table id="platform-errors" {
                        thead { tr { th { "App" } th { "err_code" } th { "Answers" } } }
                        tbody {
                            @for (app, code, n) in &extras.platform_errors {
                                tr { td { (app) } td { (code) } td { (n) } }
                            }
                        }
                    }
                }
                @if !extras.limits.is_empty() {
                    h2 { "Call limits in use" }
                    table id="limits" {
                        thead { tr { th { "App" } th { "Rule" } th { "Calls in the window" } th { "Limit" } } }
                        tbody {
                            @for (app, rule, calls, limit) in &extras.limits {
                                tr { td { (app) } td { (rule) } td { (calls) } td { (limit) } }
                            }
                        }
                    }
                }
                @if let Some(queues) = queues {
                    h2 { "Callback queues" }
                    table id="queues" {
                        thead { tr { th { "Route" } th { "Pending" } th { "Dead letters" } th { "Oldest waiting" } } }
                        tbody {
                            @for q in queues {
                                tr { td { (q.route) } td { (q.pending) } td { (q.dead) } td { (q.oldest_pending_s) " s" } }
                            }
                        }
                    }
                }
            }
        }
    }
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_escapes_what_it_shows_and_draws_a_chart_per_app() {
        let traffic = Traffic::new(1);
        for i in 0..5 {
            traffic.record(Some(0), i == 0);
        }
        let series = traffic.series(0);
        assert_eq!(series.len(), BUCKETS);
        assert_eq!(series.last(), Some(&(5, 1)));
        let apps = [AppView {
            name: "a<b".into(),
            ready: false,
            seconds_left: 0,
            last_error: Some("platform said <script>alert(1)</script>".into()),
            series,
        }];
        let extras = Extras {
            platform_errors: vec![("a<b".into(), "40001".into(), 2)],
            limits: vec![],
        };
        let html = page("0.1.0", &apps, &extras, None);
        assert!(html.contains("40001"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("a&lt;b"), "{html}");
        assert_eq!(html.matches("<svg").count(), 1);
    }
}
