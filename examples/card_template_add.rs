//! A legacy app adding a workbench card template through cx-proxy. On this platform adding
//! is a **`PUT`** to `/api/apps/v1/card/templates` (and updating a `POST` to
//! `/api/apps/v1/card/templates/{template_id}`), PLATFORM.md section 1; 10 calls an hour.
//!
//! ```text
//! cargo run --release -- demo              # in one terminal
//! cargo run --example card_template_add    # in another
//! ```

#[path = "common.rs"]
mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let body = serde_json::json!({
        "name": "sales-board",
        "fields": [{ "key": "total", "type": "number" }],
    });
    common::call(
        http::Method::PUT,
        "/api/apps/v1/card/templates",
        Some(body.to_string()),
    )
    .await
}
