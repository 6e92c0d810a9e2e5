//! `[listeners.NAME]` and `[admin]`: their addresses, a listener's TLS material (loaded by
//! `tls`), and the check that no two of them share an address.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Validator, raw, tls};

const ADMIN_ADDRESS_DEFAULT: &str = "127.0.0.1:9090";

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// The `listener` metric label.
    pub name: String,
    pub address: SocketAddr,
    /// Serve h2c with prior knowledge beside HTTP/1.1 (cleartext listeners only; TLS listeners
    /// pick h2 by ALPN).
    pub http2: bool,
    pub tls: Option<TlsConfig>,
}

#[derive(Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Loaded at validation, so `check` proves the files are usable.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// Bearer token for `/publish` and `/-/reload`; required unless the address is loopback.
    pub publish_token: Option<String>,
    /// Whether `POST /-/reload` reloads the configuration (as SIGHUP does).
    pub reload: bool,
}

impl Validator<'_, '_> {
    pub(super) fn admin(&mut self, raw: raw::Admin) -> Option<AdminConfig> {
        let text = raw
            .address
            .map_or(ADMIN_ADDRESS_DEFAULT.to_owned(), |s| s.0);
        let address = self.socket_addr(&["admin", "address"], &text)?;
        let publish_token = raw.publish_token.map(|s| s.0).filter(|t| !t.is_empty());
        if publish_token.is_none() && !address.ip().is_loopback() {
            self.err(
                &["admin", "publish_token"],
                "required when the admin listener is not bound to loopback",
            );
        }
        Some(AdminConfig {
            address,
            publish_token,
            reload: raw.reload.unwrap_or(false),
        })
    }

    fn socket_addr(&mut self, path: &[&str], text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    path,
                    format!("{text:?} is not an IP:port address (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")"),
                );
                None
            }
        }
    }

    pub(super) fn listener(&mut self, name: String, raw: raw::Listener) -> Option<ListenerConfig> {
        let address = self.socket_addr(&["listeners", &name, "address"], &raw.address.0);
        let tls = match raw.tls {
            None => None,
            Some(t) => {
                let cert_file = self.base_dir.join(&t.cert_file.0);
                let key_file = self.base_dir.join(&t.key_file.0);
                match tls::load_server_config(&cert_file, &key_file) {
                    Ok(server_config) => Some(TlsConfig {
                        cert_file,
                        key_file,
                        server_config,
                    }),
                    Err(e) => {
                        self.err(&["listeners", &name, "tls", e.key()], e.to_string());
                        None
                    }
                }
            }
        };
        Some(ListenerConfig {
            name,
            address: address?,
            http2: raw.http2,
            tls,
        })
    }

    pub(super) fn distinct_addresses(
        &mut self,
        listeners: &[ListenerConfig],
        admin: Option<&AdminConfig>,
    ) {
        let mut seen: BTreeMap<SocketAddr, String> = BTreeMap::new();
        if let Some(a) = admin {
            seen.insert(a.address, "admin".into());
        }
        for l in listeners {
            if l.address.port() == 0 {
                continue;
            }
            if let Some(other) = seen.insert(l.address, l.name.clone()) {
                self.err(
                    &["listeners", &l.name, "address"],
                    format!("{} is already used by {other}", l.address),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

    #[test]
    fn public_admin_needs_a_token() {
        let text = "[listeners.p]\naddress = \"127.0.0.1:1\"\n[admin]\naddress = \"0.0.0.0:9\"\n";
        let errs = parse(text).unwrap_err().to_string();
        assert!(errs.contains("admin.publish_token"), "{errs}");
    }
}
