//! The running configuration, swappable: what SIGHUP replaces.
//!
//! Every request loads the current [`Proxy`] from an `ArcSwap` (no lock), so a reload applies
//! to every request that starts after it, on old connections too, while in-flight requests
//! finish on the state they started with. Unchanged apps keep their cached tokens, their
//! fetch gate and their fetch-cap window (see [`Proxy::reloaded`]). The listening addresses,
//! and whether the proxy port speaks TLS, are fixed at startup.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use crate::config::Config;
use crate::error::StartupError;
use crate::proxy::Proxy;

/// The swappable state shared by every connection.
#[derive(Debug)]
pub struct Gateway {
    current: ArcSwap<Proxy>,
    /// The proxy port's TLS config, replaced on reload (new handshakes use the new one).
    tls: Option<Arc<ArcSwap<ServerConfig>>>,
    /// The file SIGHUP reads again.
    config_path: Option<PathBuf>,
}

impl Gateway {
    /// Wraps a built proxy; loads its TLS material if configured.
    pub fn new(proxy: Arc<Proxy>, config_path: Option<PathBuf>) -> Result<Arc<Self>, StartupError> {
        let tls = match &proxy.config().server.tls {
            Some(files) => Some(Arc::new(ArcSwap::new(
                crate::tls::server_config_from_files(files)?,
            ))),
            None => None,
        };
        Ok(Arc::new(Gateway {
            current: ArcSwap::new(proxy),
            tls,
            config_path,
        }))
    }

    /// The proxy in force now.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.current.load_full()
    }

    /// The TLS config source of the proxy port, if it speaks TLS.
    pub fn tls(&self) -> Option<Arc<ArcSwap<ServerConfig>>> {
        self.tls.clone()
    }

    /// Reads the config file again and applies it; on any problem the running config stays
    /// and the problems are returned (`file: key: what is wrong`).
    pub async fn reload(&self) -> Result<(), Vec<String>> {
        let Some(path) = &self.config_path else {
            return Err(vec!["no config file to reload".into()]);
        };
        let loaded = Config::load(path).map_err(|e| e.problems)?;
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        self.apply(loaded.config).await
    }

    /// Applies a new configuration (see [`Gateway::reload`]).
    pub async fn apply(&self, config: Config) -> Result<(), Vec<String>> {
        let old = self.proxy();
        let file = config.source.clone();
        let tls = match (&self.tls, &config.server.tls) {
            (Some(_), Some(files)) => Some(
                crate::tls::server_config_from_files(files)
                    .map_err(|e| vec![format!("{file}: server.tls_cert: {e}")])?,
            ),
            (None, None) => None,
            _ => {
                return Err(vec![format!(
                    "{file}: server.tls_cert: switching TLS on or off needs a restart"
                )])
            }
        };
        if config.server.listen != old.config().server.listen {
            tracing::warn!("{file}: server.listen: a new address needs a restart; still listening on the old one");
        }
        if config.admin.as_ref().map(|a| a.listen) != old.config().admin.as_ref().map(|a| a.listen)
        {
            tracing::warn!("{file}: admin.listen: a new admin address needs a restart");
        }
        let new = Proxy::reloaded(config, &old)
            .await
            .map_err(|e| vec![format!("{file}: {e}")])?;
        new.tokens().start();
        self.current.store(new);
        if let (Some(slot), Some(cfg)) = (&self.tls, tls) {
            slot.store(cfg);
        }
        old.tokens().stop();
        Ok(())
    }
}
