//! A legacy app sending a text message to a robot group through cx-proxy, with no
//! credentials of its own.
//!
//! ```text
//! cargo run --release -- demo                    # in one terminal
//! cargo run --example robot_send_group_message   # in another
//! ```

#[path = "common.rs"]
mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let group = std::env::args().nth(1).unwrap_or_else(|| "1".into());
    let body = serde_json::json!({
        "group_id": group,
        "msg_type": "text",
        "text": { "content": "Build 1432 passed — sent through cx-proxy" },
    });
    common::call(
        http::Method::POST,
        "/api/apps/v1/robot/groups/messages",
        Some(body.to_string()),
    )
    .await
}
