//! A legacy app listing its robot's groups (`GET /api/apps/v1/robot/chats`, PLATFORM.md
//! section 1), the way it did before cx-proxy, minus the credentials: no `corp_secret`, no
//! token fetch, no `access_token` parameter.
//!
//! ```text
//! cargo run --release -- demo            # in one terminal
//! cargo run --example robot_list_groups  # in another (CX_BASE_URL overrides the proxy URL)
//! ```

#[path = "common.rs"]
mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::call(
        http::Method::GET,
        "/api/apps/v1/robot/chats?page_count=30&page_index=0",
        None,
    )
    .await
}
