//! A legacy app marking a to-do done (`PUT /api/apps/v1/to-do/{id}`, PLATFORM.md section 1)
//! through cx-proxy, with no credentials of its own.
//!
//! ```text
//! cargo run --release -- demo        # in one terminal
//! cargo run --example todo_update    # in another; optional argument: the to-do's id
//! ```

#[path = "common.rs"]
mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let id = std::env::args().nth(1).unwrap_or_else(|| "todo-001".into());
    let body = serde_json::json!({
        "title": "Approve purchase order PO-2026-118",
        "status": "done",
    });
    common::call(
        http::Method::PUT,
        &format!("/api/apps/v1/to-do/{id}"),
        Some(body.to_string()),
    )
    .await
}
