//! The command line (SPEC section 2): `run`, `check`, `sandbox`, `demo`.
//!
//! `main.rs` only parses [`Cli`] and calls [`main`]; everything here is in the library so the
//! commands can be tested.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::{Config, Loaded};
use crate::error::StartupError;
use crate::gateway::Gateway;
use crate::logging::{self, LogFormat};
use crate::proxy::Proxy;
use crate::sandbox::{ParamApp, Reissue, Sandbox, SandboxApp, SandboxOptions};
use crate::server::{run, Listeners, ProxyHandle};

/// Exit code for a configuration the proxy cannot run with (`EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// `cx-proxy`: an authenticating reverse proxy for the Cheng-Xun open platform.
#[derive(Debug, Parser)]
#[command(name = "cx-proxy", version, about, long_about = None)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Config file.
    #[arg(
        short,
        long,
        global = true,
        env = "CX_PROXY_CONFIG",
        default_value = "proxy.toml"
    )]
    pub config: PathBuf,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `cx_proxy=debug,warn`); default `RUST_LOG`, else `info`.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config and every secret source; print the effective config, secrets as ***.
    Check,
    /// Run the offline Cheng-Xun emulator over HTTPS.
    Sandbox(SandboxArgs),
    /// Run the sandbox and the proxy wired together on loopback, and print curl lines to try.
    Demo(DemoArgs),
}

/// `cx-proxy sandbox`.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Where ca.pem is written.
    #[arg(long, default_value = "sandbox")]
    pub state_dir: PathBuf,
    /// An app as KEY:CORP_ID:SECRET (repeatable; default demo-app:10001:demo-secret).
    #[arg(long = "app")]
    pub apps: Vec<SandboxApp>,
    /// An organisation-service app as NAME@/token/path?key=value&... (repeatable): a fetch at
    /// that path with exactly those parameters gets a token.
    #[arg(long = "param-app")]
    pub param_apps: Vec<ParamApp>,
    /// Lifetime of issued tokens, seconds.
    #[arg(long, default_value_t = 7200)]
    pub expires_in: u64,
    /// Whether a new fetch issues a new token or returns the current one.
    #[arg(long, value_enum, default_value_t = Reissue::New)]
    pub reissue: Reissue,
    /// With --reissue new: seconds the previous token stays valid.
    #[arg(long, default_value_t = 0)]
    pub overlap_s: u64,
    /// Successful token fetches allowed per app before err_code 45009 (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub daily_quota: u32,
    /// Header checked for the token when the query carries none.
    #[arg(long, default_value = "authorization")]
    pub token_header: String,
}

/// `cx-proxy demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the proxy listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the sandbox listens (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub sandbox_listen: SocketAddr,
    /// Where the sandbox CA, the demo secret and the generated proxy.toml are written.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// Runs a parsed command line; returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    if let Err(e) = logging::init(cli.log_format, cli.log_level.as_deref()) {
        eprintln!("cx-proxy: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&cli.config),
        Command::Run => {
            // The config decides the runtime (server.workers), so it is read first.
            let Some(loaded) = load_or_report(&cli.config) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            let problems = check_tls(&loaded.config);
            if !problems.is_empty() {
                for p in problems {
                    eprintln!("{p}");
                }
                return ExitCode::from(EXIT_CONFIG);
            }
            with_runtime(
                loaded.config.server.workers,
                run_command(loaded.config, &cli.config),
            )
        }
        Command::Sandbox(args) => with_runtime(0, sandbox(args)),
        Command::Demo(args) => with_runtime(0, demo(args)),
    }
}

/// Runs `fut` on a runtime with `workers` threads (0: one per core; 1: single-threaded,
/// which on a small shared box avoids cross-thread wake-ups).
fn with_runtime(workers: usize, fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let built = match workers {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    match built {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("cx-proxy: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_or_report(path: &Path) -> Option<Loaded> {
    match Config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            Some(loaded)
        }
        Err(e) => {
            for p in &e.problems {
                eprintln!("{p}");
            }
            None
        }
    }
}

/// Checks what only opening the files can tell (certificates, keys), as `file: key: problem`.
fn check_tls(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let file = &config.source;
    if let Err(e) = crate::tls::upstream_roots(config.upstream.ca_file.as_deref()) {
        problems.push(format!("{file}: upstream.ca_file: {e}"));
    }
    if let Some(files) = &config.server.tls {
        if let Err(e) = crate::tls::server_config_from_files(files) {
            problems.push(format!("{file}: server.tls_cert: {e}"));
        }
    }
    problems
}

fn check(path: &Path) -> ExitCode {
    let Some(loaded) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    let problems = check_tls(&loaded.config);
    if !problems.is_empty() {
        for p in problems {
            eprintln!("{p}");
        }
        return ExitCode::FAILURE;
    }
    print!("{}", loaded.config.render());
    eprintln!("{}: ok", loaded.config.source);
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

async fn run_command(config: Config, path: &Path) -> ExitCode {
    match run_proxy(config, path).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cx-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_proxy(config: Config, path: &Path) -> Result<(), StartupError> {
    let proxy = Proxy::new(config)?;
    let listeners = Listeners::bind(proxy.config()).await?;
    let apps: Vec<&str> = proxy
        .config()
        .apps
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        listen = %local(&listeners.proxy),
        admin = listeners.admin.as_ref().map(local),
        upstream = %proxy.config().upstream.url,
        apps = ?apps,
        "cx-proxy listening"
    );
    let gateway = Gateway::new(proxy, Some(path.to_path_buf()))?;
    tokio::spawn(reload_on_sighup(gateway.clone()));
    run(gateway, listeners, shutdown_signal()).await
}

/// SIGHUP: read the config file again; a refused file leaves the running config in force.
async fn reload_on_sighup(gateway: Arc<Gateway>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload needs a restart");
        return;
    };
    while hup.recv().await.is_some() {
        match gateway.reload().await {
            Ok(()) => tracing::info!("SIGHUP: configuration reloaded"),
            Err(problems) => {
                for p in problems {
                    tracing::error!("{p}");
                }
                tracing::error!("SIGHUP: configuration refused; the running one stays in force");
            }
        }
    }
}

async fn sandbox(args: SandboxArgs) -> ExitCode {
    let token_header = match http::HeaderName::from_bytes(args.token_header.as_bytes()) {
        Ok(h) => h,
        Err(_) => {
            eprintln!(
                "cx-proxy sandbox: --token-header {:?} is not a header name",
                args.token_header
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let opts = SandboxOptions {
        listen: args.listen,
        state_dir: Some(args.state_dir.clone()),
        apps: if args.apps.is_empty() && args.param_apps.is_empty() {
            vec![SandboxApp::demo()]
        } else {
            args.apps
        },
        param_apps: args.param_apps,
        expires_in: Duration::from_secs(args.expires_in),
        reissue: args.reissue,
        overlap: Duration::from_secs(args.overlap_s),
        daily_quota: args.daily_quota,
        token_header,
        ..SandboxOptions::default()
    };
    let apps: Vec<String> = opts
        .apps
        .iter()
        .map(|a| format!("{} (corp {})", a.app_key, a.corp_id))
        .collect();
    let sandbox = match Sandbox::start(opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cx-proxy sandbox: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "cx-proxy sandbox: {} (apps: {}); CA certificate: {}",
        sandbox.url(),
        apps.join(", "),
        args.state_dir.join("ca.pem").display()
    );
    shutdown_signal().await;
    sandbox.shutdown().await;
    ExitCode::SUCCESS
}

/// The config `demo` runs the proxy with (also written to `DIR/proxy.toml` for reading).
fn demo_config(listen: SocketAddr, sandbox_url: &str, dir: &Path) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    format!(
        "# Written by `cx-proxy demo`: the proxy in front of the offline sandbox.\n\
         [server]\nlisten = {listen}\n\n\
         [upstream]\nurl = {url}\nca_file = {ca}\n\n\
         [[app]]\nname = \"demo\"\napp_key = \"demo-app\"\ncorp_id = 10001\ncorp_secret_file = {secret}\nprefix = \"/\"\n",
        listen = q(&listen.to_string()),
        url = q(sandbox_url),
        ca = q(&dir.join("ca.pem").display().to_string()),
        secret = q(&dir.join("corp_secret").display().to_string()),
    )
}

async fn demo(args: DemoArgs) -> ExitCode {
    match demo_inner(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cx-proxy demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo_inner(args: DemoArgs) -> Result<(), StartupError> {
    let dir = args.state_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("cx-proxy-demo-{}", std::process::id()))
    });
    let sandbox = Sandbox::start(SandboxOptions {
        listen: args.sandbox_listen,
        state_dir: Some(dir.clone()),
        ..SandboxOptions::default()
    })
    .await?;
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text)
            .map_err(|e| StartupError::Other(format!("{}: {e}", dir.join(name).display())))
    };
    write("corp_secret", &SandboxApp::demo().secret)?;
    let text = demo_config(args.listen, &sandbox.url(), &dir);
    write("proxy.toml", &text)?;
    let config = Config::from_toml(&text, &dir.join("proxy.toml").display().to_string(), None)
        .map_err(|e| StartupError::Config(e.problems))?
        .config;
    let proxy = ProxyHandle::start(config).await?;
    let base = format!("http://{}", proxy.addr);
    println!(
        "cx-proxy demo: sandbox (offline Cheng-Xun) at {}",
        sandbox.url()
    );
    println!(
        "cx-proxy demo: proxy at {base}, config {}",
        dir.join("proxy.toml").display()
    );
    println!(
        "The proxy fetches the token and injects it; the calls below carry no credentials. Try:"
    );
    println!("  curl -s '{base}/api/apps/v1/robot/groups?group_id=1'");
    println!(
        "  curl -s -X POST '{base}/api/apps/v1/robot/groups/messages' -H 'Content-Type: application/json' -d '{{\"group_id\":\"1\",\"msg_type\":\"text\",\"text\":{{\"content\":\"hello\"}}}}'"
    );
    println!("Ctrl-C stops both.");
    shutdown_signal().await;
    proxy.shutdown().await?;
    sandbox.shutdown().await;
    Ok(())
}
