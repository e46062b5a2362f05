//! The command line (SPEC section 2): `run`, `check`, `sandbox`, `demo`, `corp-secret`.
//!
//! `main.rs` only parses [`Cli`] and calls [`main`]; everything here is in the library so the
//! commands can be tested.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Loaded};
use crate::error::StartupError;
use crate::gateway::Gateway;
use crate::gateway::{run, Listeners, ProxyHandle, Role};
use crate::logging::{self, LogFormat};
use crate::platform;
use crate::proxy::Proxy;
use crate::sandbox::{ParamApp, Reissue, Sandbox, SandboxApp, SandboxCorp, SandboxOptions};

/// Exit code for a configuration the proxy cannot run with (`EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// `--version`: the crate's version, the git commit and the build date (`build.rs`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CX_BUILD_COMMIT"),
    ", built ",
    env!("CX_BUILD_DATE"),
    ")"
);

/// `cx-proxy`: an authenticating reverse proxy for the Cheng-Xun open platform.
#[derive(Debug, Parser)]
#[command(name = "cx-proxy", version = VERSION, about, long_about = None)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The config file of `cx-proxy` without a command (as `run`).
    #[command(flatten)]
    pub config: ConfigArg,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `cx_proxy=debug,warn`); default `RUST_LOG`, else `info`.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

/// `-c/--config PATH`, on the commands that read a config file.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArg {
    /// Config file [env: CX_PROXY_CONFIG] [default: proxy.toml].
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// The path given here, else the one given before the command, else `$CX_PROXY_CONFIG`,
    /// else `proxy.toml`.
    fn resolve(&self, outer: &ConfigArg) -> PathBuf {
        self.config
            .clone()
            .or_else(|| outer.config.clone())
            .or_else(|| std::env::var_os("CX_PROXY_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("proxy.toml"))
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run(ConfigArg),
    /// Validate the config and every secret source; print the effective config, secrets as ***.
    Check(ConfigArg),
    /// Run the offline Cheng-Xun emulator over HTTPS.
    Sandbox(SandboxArgs),
    /// Run the sandbox and the proxy wired together on loopback, and print curl lines to try.
    Demo(DemoArgs),
    /// Exchange an organisation's 24-hour temp_corp_secret for its permanent corp_secret, once,
    /// and write it to a new file (mode 0600); the secret is never printed.
    CorpSecret(CorpSecretArgs),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish) on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout: `cx-proxy manpage | man -l -`.
    Manpage {
        /// Write every page (cx-proxy.1 and one per command: cx-proxy-run.1, ...) into DIR.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `cx-proxy corp-secret`.
#[derive(Debug, Args)]
pub struct CorpSecretArgs {
    /// The config file whose `[upstream]` is used.
    #[command(flatten)]
    pub config: ConfigArg,
    /// The organisation's corp_id.
    #[arg(long)]
    pub corp_id: String,
    /// Environment variable holding corp_authorization.
    #[arg(long, value_name = "VAR")]
    pub corp_authorization_env: String,
    /// Environment variable holding the 24-hour temp_corp_secret.
    #[arg(long = "temp-secret-env", value_name = "VAR")]
    pub temp_secret_env: String,
    /// File the permanent corp_secret is written to (must not exist yet).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Whether the sandbox enforces the documented rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Enforced.
    On,
    /// Not enforced (load tests).
    Off,
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
    /// An organisation-service corp as CORP_ID:SECRET or CORP_ID:SECRET:TEMP_SECRET
    /// (repeatable; default 20002:demo-corp-secret:demo-temp-secret): SECRET is its permanent
    /// corp_secret, TEMP_SECRET (default temp-CORP_ID) the 24-hour one exchanged for it once.
    #[arg(long = "corp")]
    pub corps: Vec<SandboxCorp>,
    /// An app with any other token request shape, as NAME@/token/path?key=value&...
    /// (repeatable): a fetch at that path with exactly those parameters gets a token.
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
    /// Successful token fetches allowed per app before err_code 49001 (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub daily_quota: u32,
    /// Enforce the platform's documented rate limits (49001 / 55001); off for load tests.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub rate_limits: OnOff,
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
        // No logger to write it: a JSON line by hand when JSON was asked for.
        match cli.log_format {
            LogFormat::Json => eprintln!(
                "{}",
                serde_json::json!({"level": "ERROR", "target": "cx_proxy::cli", "message": format!("cx-proxy: {e}")})
            ),
            LogFormat::Text => eprintln!("cx-proxy: {e}"),
        }
        return ExitCode::from(EXIT_CONFIG);
    }
    let outer = cli.config;
    let command = cli.command.unwrap_or(Command::Run(ConfigArg::default()));
    let reads_config = matches!(
        command,
        Command::Run(_) | Command::Check(_) | Command::CorpSecret(_)
    );
    if outer.config.is_some() && !reads_config {
        crate::logging::error(
            "cx-proxy: -c/--config is not used by this command (it reads no config file)",
        );
        return ExitCode::from(2);
    }
    match command {
        Command::Check(c) => check(&c.resolve(&outer)),
        Command::Run(c) => {
            let path = c.resolve(&outer);
            // The config decides the runtime (server.workers), so it is read first.
            let Some(loaded) = load_or_report(&path) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            let problems = check_tls(&loaded.config);
            if !problems.is_empty() {
                for p in problems {
                    crate::logging::error(p);
                }
                return ExitCode::from(EXIT_CONFIG);
            }
            // The proxy port is served by worker threads of their own (server.workers);
            // this runtime keeps the rest: signals, token refreshes, admin, callbacks.
            with_runtime(1, run_command(loaded.config, &path))
        }
        Command::Sandbox(args) => with_runtime(0, sandbox(args)),
        Command::Demo(args) => with_runtime(0, demo(args)),
        Command::CorpSecret(args) => {
            let path = args.config.resolve(&outer);
            with_runtime(1, corp_secret(&path, args))
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "cx-proxy", &mut out);
            if shell == clap_complete::Shell::Bash {
                out = bash_completion_fix(&out);
            }
            print_bytes(&out)
        }
        Command::Manpage { dir } => match man_pages(dir.as_deref()) {
            Ok(Some(page)) => print_bytes(&page),
            Ok(None) => ExitCode::SUCCESS,
            Err(e) => {
                crate::logging::error(format_args!("cx-proxy: cannot write the man pages: {e}"));
                ExitCode::FAILURE
            }
        },
    }
}

/// What the generated page lacks: environment, files, exit status, signals, and the
/// commands' own pages.
const MAN_EXTRA: &str = r#".SH ENVIRONMENT
.TP
\fBCX_PROXY_CONFIG\fR
The config file when \fB-c\fR is not given (else \fI./proxy.toml\fR).
.TP
\fBhttps_proxy\fR, \fBHTTPS_PROXY\fR, \fBall_proxy\fR, \fBALL_PROXY\fR, \fBno_proxy\fR, \fBNO_PROXY\fR
The HTTP CONNECT proxy to the platform, read as curl reads them, unless the config sets \fBupstream.proxy\fR.
.TP
\fBRUST_LOG\fR
The log filter when \fB--log-level\fR is not given.
.PP
Secrets named by \fB*_env\fR keys in the config (\fBcorp_secret_env\fR ...) are read from the environment too.
.SH FILES
.TP
\fI/etc/cx-proxy/proxy.toml\fR
The config file of the packaged service; \fBcx-proxy check\fR prints what it means, secrets as ***.
.TP
\fI/etc/cx-proxy/env\fR
Environment of the packaged service (secrets, \fBHTTPS_PROXY\fR), mode 0600.
.TP
\fI/var/lib/cx-proxy\fR
The service's state folder (the callback queue).
.SH EXIT STATUS
0 after a clean stop or a usable config (\fBcheck\fR); 1 when \fBcheck\fR finds problems or the proxy cannot start; 2 for a command-line mistake; 64 when \fBrun\fR refuses the config.
.SH SIGNALS
SIGTERM and SIGINT stop accepting and let in-flight requests finish for up to \fBshutdown_grace_s\fR. SIGHUP (or \fBPOST /reload\fR on the admin port) reads the config again; a refused file leaves the running one in force.
.SH SEE ALSO
\fBcx-proxy-run\fR(1), \fBcx-proxy-check\fR(1), \fBcx-proxy-sandbox\fR(1), \fBcx-proxy-demo\fR(1), \fBcx-proxy-corp-secret\fR(1), \fBcx-proxy-completions\fR(1), \fBcx-proxy-manpage\fR(1)
"#;

/// The main man page with [`MAN_EXTRA`]; with `dir`, it and one page per command are
/// written there instead (`None` returned).
fn man_pages(dir: Option<&Path>) -> std::io::Result<Option<Vec<u8>>> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    page.extend_from_slice(MAN_EXTRA.as_bytes());
    let Some(dir) = dir else {
        return Ok(Some(page));
    };
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    std::fs::write(dir.join("cx-proxy.1"), page)?;
    Ok(None)
}

/// Writes `out` to stdout; a closed pipe (`| head`) ends the command quietly.
fn print_bytes(out: &[u8]) -> ExitCode {
    use std::io::Write as _;
    match std::io::stdout().write_all(out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            crate::logging::error(format_args!("cx-proxy: cannot write to stdout: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// clap_complete's bash script for a name with a hyphen labels its subcommands'
/// cases `cx__subcmd__proxy__subcmd__run` where it sets `cmd` to
/// `cx__proxy__subcmd__run`, so nothing after the first word completes (clap-rs/clap#6421,
/// open). Until it is fixed there, the labels are renamed to match.
fn bash_completion_fix(script: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(script)
        .replace("cx__subcmd__proxy__", "cx__proxy__")
        .into_bytes()
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
            crate::logging::error(format_args!("cx-proxy: cannot start the runtime: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn load_or_report(path: &Path) -> Option<Loaded> {
    match Config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                crate::logging::warn(w);
            }
            Some(loaded)
        }
        Err(e) => {
            for p in &e.problems {
                crate::logging::error(p);
            }
            None
        }
    }
}

/// Checks what only opening the files can tell (certificates, keys), as `file: key: problem`,
/// naming the key whose file is wrong.
fn check_tls(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let file = &config.source;
    if let Err(e) = crate::tls::upstream_roots(config.upstream.ca_file.as_deref()) {
        problems.push(format!("{file}: upstream.ca_file: {e}"));
    }
    let listeners = [
        ("server", config.server.tls.as_ref()),
        (
            "callbacks",
            config.callbacks.as_ref().and_then(|c| c.tls.as_ref()),
        ),
    ];
    for (table, files) in listeners {
        let Some(files) = files else { continue };
        let problem = if let Err(e) = crate::tls::load_certs(&files.cert) {
            Some(("tls_cert", e))
        } else if let Err(e) = crate::tls::load_key(&files.key) {
            Some(("tls_key", e))
        } else if let Some(Err(e)) = files.client_ca.as_deref().map(crate::tls::load_certs) {
            Some(("client_ca", e))
        } else {
            // Both read: what is left is that they do not belong together.
            crate::tls::server_config_from_files(files)
                .err()
                .map(|e| ("tls_key", e))
        };
        if let Some((key, e)) = problem {
            problems.push(format!("{file}: {table}.{key}: {e}"));
        }
    }
    for (i, route) in config.routes.iter().enumerate() {
        if let Some(ca) = &route.ca_file {
            if let Err(e) = crate::tls::upstream_roots(Some(ca)) {
                problems.push(format!("{file}: callback[{i}].ca_file: {e}"));
            }
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
            crate::logging::error(p);
        }
        return ExitCode::FAILURE;
    }
    print!("{}", loaded.config.render());
    // The limit of the shell `check` runs in, which a service manager may set otherwise.
    if let Some(w) = crate::server::raise_open_files_limit(loaded.config.open_files_needed()) {
        crate::logging::warn(format_args!("{}: {w}", loaded.config.source));
    }
    crate::logging::note(format_args!("{}: ok", loaded.config.source));
    ExitCode::SUCCESS
}

/// SIGTERM or SIGINT (Ctrl-C elsewhere).
#[cfg(not(unix))]
async fn shutdown_signal() {
    if tokio::signal::ctrl_c().await.is_ok() {
        tracing::info!("Ctrl-C: stopping");
    } else {
        tracing::error!("cannot listen for Ctrl-C; stop the process another way");
        std::future::pending::<()>().await;
    }
}

/// SIGTERM or SIGINT (Ctrl-C elsewhere).
#[cfg(unix)]
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
            crate::logging::error(format_args!("cx-proxy: {e}"));
            ExitCode::FAILURE
        }
    }
}

async fn run_proxy(config: Config, path: &Path) -> Result<(), StartupError> {
    let proxy = Proxy::new(config)?;
    let listeners = Listeners::bind_per_core(proxy.config()).await?;
    let apps: Vec<&str> = proxy
        .config()
        .apps
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    tracing::info!(
        listen = listeners.addr(Role::Proxy).map(|a| a.to_string()),
        admin = listeners.addr(Role::Admin).map(|a| a.to_string()),
        callbacks = listeners.addr(Role::Callbacks).map(|a| a.to_string()),
        workers = listeners.workers(),
        upstream = %proxy.config().upstream.url,
        egress = proxy.config().upstream.proxy.as_ref().map(|p| p.to_string()),
        apps = ?apps,
        "cx-proxy listening"
    );
    let gateway = Gateway::new(proxy, Some(path.to_path_buf()))?;
    tokio::spawn(reload_on_sighup(gateway.clone()));
    run(gateway, listeners, shutdown_signal()).await
}

/// No SIGHUP outside Unix: `POST /reload` on the admin port reloads.
#[cfg(not(unix))]
async fn reload_on_sighup(_gateway: Arc<Gateway>) {}

/// SIGHUP: read the config file again; a refused file leaves the running config in force.
#[cfg(unix)]
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
            crate::logging::error(format_args!(
                "cx-proxy sandbox: --token-header {:?} is not a header name",
                args.token_header
            ));
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
        corps: if args.corps.is_empty() {
            vec![SandboxCorp::demo()]
        } else {
            args.corps
        },
        param_apps: args.param_apps,
        rate_limits: args.rate_limits == OnOff::On,
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
        .map(|a| format!("app {} (corp {})", a.app_key, a.corp_id))
        .chain(
            opts.corps
                .iter()
                .map(|c| format!("corp-service corp {}", c.corp_id)),
        )
        .collect();
    let sandbox = match Sandbox::start(opts).await {
        Ok(s) => s,
        Err(e) => {
            crate::logging::error(format_args!("cx-proxy sandbox: {e}"));
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

/// The config `demo` runs the proxy with (also written to `DIR/proxy.toml` for reading): the
/// sandbox's demo app on every path, its demo corp under `/corp`.
fn demo_config(listen: SocketAddr, sandbox_url: &str, dir: &Path, receiver: &str) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    format!(
        "# Written by `cx-proxy demo`: the proxy in front of the offline sandbox.\n\
         [server]\nlisten = {listen}\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstream]\nurl = {url}\nca_file = {ca}\n# the sandbox is on loopback: never through HTTPS_PROXY\nproxy = \"\"\n\n\
         [callbacks]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.1\", \"::1\"]\nqueue = {queue}\n\n\
         [[callback]]\nname = \"contacts\"\npath = \"/cx/callback\"\napp = \"demo\"\n\
         key_file = {key}\ndeliver_to = {receiver}\n\n\
         [[app]]\nname = \"demo\"\napp_key = \"demo-app\"\ncorp_id = 10001\ncorp_secret_file = {secret}\nprefix = \"/\"\n\n\
         [[app]]\nname = \"demo-corp\"\nkind = \"corp-service\"\ncorp_id = 20002\ncorp_secret_file = {corp_secret}\nprefix = \"/corp\"\n",
        listen = q(&listen.to_string()),
        url = q(sandbox_url),
        ca = q(&dir.join("ca.pem").display().to_string()),
        secret = q(&dir.join("corp_secret").display().to_string()),
        corp_secret = q(&dir.join("corp_secret_20002").display().to_string()),
        queue = q(&dir.join("callbacks.db").display().to_string()),
        key = q(&dir.join("callback_key").display().to_string()),
        receiver = q(receiver),
    )
}

/// The demo's callback Key (what an org admin sets beside the URL on the platform).
const DEMO_CALLBACK_KEY: &str = "demo-callback-key";

/// The calls `demo` prints, on the platform's documented paths (PLATFORM.md section 1):
/// method, path and JSON body.
pub const DEMO_CALLS: [(&str, &str, &str); 5] = [
    (
        "GET",
        "/api/apps/v1/robot/chats?page_count=30&page_index=0",
        "",
    ),
    (
        "POST",
        "/api/apps/message/v1/push",
        r#"{"type":"text","recipients":["staff-001"],"message":{"content":"hello from a legacy app"}}"#,
    ),
    (
        "PUT",
        "/api/apps/v1/to-do/todo-001",
        r#"{"title":"Approve the invoice","status":"done"}"#,
    ),
    (
        "PUT",
        "/api/apps/v1/card/templates",
        r#"{"name":"sales-board","fields":[{"key":"total","type":"number"}]}"#,
    ),
    ("GET", "/corp/api/corp-service/v1/address-book", ""),
];

/// One printed curl line for a [`DEMO_CALLS`] entry.
fn curl_line(base: &str, (method, path, body): (&str, &str, &str)) -> String {
    match method {
        "GET" => format!("curl -s '{base}{path}'"),
        m => {
            format!("curl -s -X {m} '{base}{path}' -H 'Content-Type: application/json' -d '{body}'")
        }
    }
}

async fn demo(args: DemoArgs) -> ExitCode {
    match demo_inner(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::logging::error(format_args!("cx-proxy demo: {e}"));
            ExitCode::FAILURE
        }
    }
}

async fn demo_inner(args: DemoArgs) -> Result<(), StartupError> {
    // A folder of its own making is removed on exit (it holds the demo's secrets); one given
    // with --state-dir is kept.
    let made_here = args.state_dir.is_none();
    let dir = args.state_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("cx-proxy-demo-{}", std::process::id()))
    });
    let result = demo_in(&dir, args.listen, args.sandbox_listen).await;
    if made_here {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            crate::logging::error(format_args!(
                "cx-proxy demo: cannot remove {}: {e}",
                dir.display()
            ));
        }
    }
    result
}

/// The demo, its files in `dir`.
async fn demo_in(
    dir: &Path,
    listen: SocketAddr,
    sandbox_listen: SocketAddr,
) -> Result<(), StartupError> {
    let dir = dir.to_path_buf();
    // The folder holds the demo's secrets: its owner's only.
    crate::private::create_dir(&dir)
        .map_err(|e| StartupError::Other(format!("{}: {e}", dir.display())))?;
    let sandbox = Sandbox::start(SandboxOptions {
        listen: sandbox_listen,
        state_dir: Some(dir.clone()),
        // The demo is for trying calls again and again; `cx-proxy sandbox` keeps the
        // platform's documented limits (10 card templates an hour...).
        rate_limits: false,
        ..SandboxOptions::default()
    })
    .await?;
    let write = |name: &str, text: &str| {
        use std::io::Write as _;
        let path = dir.join(name);
        crate::private::file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| {
                // A reused folder's file keeps its old mode unless told.
                crate::private::restrict(&f)?;
                f.write_all(text.as_bytes())
            })
            .map_err(|e| StartupError::Other(format!("{}: {e}", path.display())))
    };
    write("corp_secret", &SandboxApp::demo().secret)?;
    write("corp_secret_20002", &SandboxCorp::demo().secret)?;
    write("callback_key", DEMO_CALLBACK_KEY)?;
    // The organisation's internal receiver of relayed callbacks.
    let receiver =
        crate::sandbox::receiver::Receiver::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let text = demo_config(
        listen,
        &sandbox.url(),
        &dir,
        &receiver.url("/contacts-events"),
    );
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
    if let Some(admin) = proxy.admin_addr {
        println!(
            "cx-proxy demo: admin at http://{admin} (status page: http://{admin}/status; curl -s http://{admin}/readyz, /metrics)"
        );
    }
    println!(
        "The proxy fetches the token and injects it; the calls below carry no credentials. Try:"
    );
    for call in DEMO_CALLS {
        println!("  {}", curl_line(&base, call));
    }
    println!(
        "(the last one goes through the organisation-service app \"demo-corp\", prefix /corp; \
         the proxy keeps each app under the platform's documented rates, so an 11th card \
         template within an hour gets 429 rate_limited with Retry-After)"
    );
    if let (Some(cb), Some(admin)) = (proxy.callbacks_addr, proxy.admin_addr) {
        let send = serde_json::json!({
            "url": format!("http://{cb}/cx/callback"),
            "key": DEMO_CALLBACK_KEY,
            "corpid": 10001,
            "body": {"event_type": "user_add", "user_ids": ["staff-001"]},
        });
        println!(
            "Callbacks: the sandbox calls back as the platform does; the proxy checks, keeps and \
             relays them to a receiver at {}. Make it send one:",
            receiver.url("/contacts-events")
        );
        println!(
            "  curl -sS --cacert '{}' -X POST '{}' -H 'Content-Type: application/json' -d '{send}'",
            dir.join("ca.pem").display(),
            sandbox.url().trim_end_matches('/').to_owned() + "/__sandbox/callbacks/send",
        );
        println!(
            "  (the queue: curl -sS 'http://{admin}/callbacks'; the receiver prints what arrives)"
        );
    }
    println!("Ctrl-C stops both.");
    let shown = tokio::spawn(async move {
        // Prints each callback the receiver takes (bounded by the demo's lifetime).
        let mut seen = 0;
        loop {
            let got = receiver.received();
            for r in got.iter().skip(seen) {
                println!(
                    "receiver: POST {}?{} X-CX-Callback-Id: {} X-CX-Verified: {} body: {}",
                    r.path,
                    r.query,
                    r.header("x-cx-callback-id").unwrap_or("-"),
                    r.header("x-cx-verified").unwrap_or("-"),
                    String::from_utf8_lossy(&r.body)
                );
            }
            seen = got.len();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    shutdown_signal().await;
    shown.abort();
    proxy.shutdown().await?;
    sandbox.shutdown().await;
    Ok(())
}

/// `cx-proxy corp-secret`: the one-time exchange of a `temp_corp_secret` (SPEC section 2).
async fn corp_secret(config: &Path, args: CorpSecretArgs) -> ExitCode {
    match corp_secret_inner(config, &args).await {
        Ok(()) => {
            println!(
                "wrote the permanent corp_secret of corp {} to {} (mode 0600); point the corp's \
                 [[app]] at it with corp_secret_file",
                args.corp_id,
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::logging::error(format_args!("cx-proxy corp-secret: {e}"));
            ExitCode::FAILURE
        }
    }
}

async fn corp_secret_inner(config: &Path, args: &CorpSecretArgs) -> Result<(), String> {
    if args.corp_id.trim().is_empty() {
        return Err("--corp-id is empty".into());
    }
    let upstream = Config::load_upstream(config).map_err(|e| e.to_string())?;
    let env = |var: &str, what: &str| match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(crate::secret::Secret::new(v)),
        _ => Err(format!(
            "{what}: environment variable {var} is not set or empty"
        )),
    };
    let authorization = env(&args.corp_authorization_env, "--corp-authorization-env")?;
    let temp = env(&args.temp_secret_env, "--temp-secret-env")?;
    let pool = crate::upstream::Upstream::new(&upstream, 0).map_err(|e| e.to_string())?;
    // The file is made (new, 0600) before the exchange: the temporary secret works once, so
    // the permanent one must have somewhere to go before it is asked for.
    let mut file = create_private(&args.out).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => format!(
            "{} exists; refusing to overwrite it (the temp_corp_secret was not used)",
            args.out.display()
        ),
        _ => format!(
            "cannot create {}: {e} (the temp_corp_secret was not used)",
            args.out.display()
        ),
    })?;
    let params = [
        ("corp_id", args.corp_id.as_str()),
        ("corp_authorization", authorization.expose()),
        ("temp_corp_secret", temp.expose()),
    ];
    let scrub = |text: &str| temp.scrub(&authorization.scrub(text));
    let refused = |why: String| {
        // Nothing was obtained: leave no empty file behind.
        let _ = std::fs::remove_file(&args.out);
        why
    };
    let answer = crate::auth::platform_get(&pool, platform::CORP_SECRETS_PATH, &params)
        .await
        .map_err(|e| refused(scrub(&e)))?;
    let code = answer
        .get("err_code")
        .and_then(crate::wire::as_code)
        .unwrap_or(platform::code::SUCCESS);
    if code != platform::code::SUCCESS {
        let msg = answer.get("err_msg").and_then(|m| m.as_str()).unwrap_or("");
        let hint = match code {
            platform::code::TEMP_SECRET_EXPIRED => {
                ": the temp_corp_secret is valid 24 hours; get a new one from the platform"
            }
            platform::code::PERMANENT_CODE_EXISTS => {
                ": this temp_corp_secret was exchanged before; the permanent corp_secret is \
                 where that exchange wrote it"
            }
            _ => "",
        };
        return Err(refused(format!(
            "the platform refused the exchange: err_code {code}, err_msg {:?}{hint}",
            scrub(msg)
        )));
    }
    let permanent = ["corp_secret", "permanent_code"]
        .iter()
        .find_map(|k| {
            answer
                .get(k)
                .or_else(|| answer.get("data").and_then(|d| d.get(k)))
        })
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty());
    let write = |f: &mut std::fs::File, text: &str| {
        use std::io::Write as _;
        f.write_all(text.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", args.out.display()))
    };
    match permanent {
        Some(secret) => write(&mut file, secret),
        None => {
            // The field name is assumed (PLATFORM.md section 1); the answer is kept whole
            // rather than lost with the one-time code.
            write(&mut file, &answer.to_string())?;
            Err(format!(
                "the platform's answer has no corp_secret field; it was written whole to {} \
                 (mode 0600): take the permanent secret from it",
                args.out.display()
            ))
        }
    }
}

/// Creates a new file readable by its owner only (never an existing one).
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    crate::private::file_options()
        .write(true)
        .create_new(true)
        .open(path)
}
