//! A legacy app pushing a message to a staff member (`POST /api/apps/message/v1/push`,
//! PLATFORM.md section 1) through cx-proxy, with no credentials of its own.
//!
//! ```text
//! cargo run --release -- demo          # in one terminal
//! cargo run --example message_push     # in another; optional argument: the staff_id
//! ```

#[path = "common.rs"]
mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let staff = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "staff-001".into());
    let body = serde_json::json!({
        "type": "text",
        "recipients": [staff],
        "message": { "content": "Build 1432 passed — sent through cx-proxy" },
    });
    common::call(
        http::Method::POST,
        "/api/apps/message/v1/push",
        Some(body.to_string()),
    )
    .await
}
