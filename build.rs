//! Stamps the build with its git commit and date, for `--version` and
//! `cx_proxy_build_info` (SPEC section 2): `CX_BUILD_COMMIT` (12 hex digits from git, the
//! variable of that name when set, else `unknown`) and `CX_BUILD_DATE` (`YYYY-MM-DD`, UTC; `SOURCE_DATE_EPOCH` when
//! set, for reproducible builds).

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[path = "src/logging/civil.rs"]
mod civil;

fn main() {
    // A build without the repository (a container build context) is told the commit.
    let commit = std::env::var("CX_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
    let (y, m, d) = civil::civil_from_days(secs.div_euclid(86_400));
    println!("cargo:rustc-env=CX_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=CX_BUILD_DATE={y:04}-{m:02}-{d:02}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-env-changed=CX_BUILD_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    // A new commit or checkout stamps anew; outside git nothing is watched.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        for path in ["HEAD", "refs", "packed-refs"] {
            let p = std::path::Path::new(&dir).join(path);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}
