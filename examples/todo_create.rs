//! A legacy app creating a to-do for a user through cx-proxy, with no credentials of its own.
//!
//! ```text
//! cargo run --release -- demo        # in one terminal
//! cargo run --example todo_create    # in another
//! ```

#[path = "common.rs"]
mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let body = serde_json::json!({
        "title": "Approve purchase order PO-2026-118",
        "assignees": ["u1001"],
        "source_url": "https://erp.example.internal/po/2026-118",
    });
    common::call(
        http::Method::POST,
        "/api/todo/v1/tasks",
        Some(body.to_string()),
    )
    .await
}
