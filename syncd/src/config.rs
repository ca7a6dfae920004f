//! `syncd.toml`: strict (unknown keys are errors), validated at load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use geosync_proto::sync::Policy;
use geosync_proto::NodeId;
use serde::Deserialize;

/// Why a config did not load.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Cannot read the file.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown / mistyped key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The daemon's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Store directory (`geosync init`; `syncd init` creates the key in it).
    pub store: PathBuf,
    /// UDP address to listen on for peers.
    pub listen: SocketAddr,
    /// Prometheus endpoint (`http://ADDR/metrics`), if any.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Control socket path (default `STORE/syncd/control.sock`).
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Bytes per second this node sends to each peer ("100M", "1G";
    /// default unlimited).
    #[serde(default)]
    pub bandwidth: Option<String>,
    /// Pacing: an image whose last pull took k seconds is not pulled again
    /// for `pacing_factor × k` seconds unless forced (default 2).
    #[serde(default = "default_pacing")]
    pub pacing_factor: f64,
    /// How often each peer's catalog is polled, in milliseconds (default 2000).
    #[serde(default = "default_catalog_interval")]
    pub catalog_interval_ms: u64,
    /// Seconds a peer may take to send its request on a stream, and to make
    /// room for each frame of our reply (default 60). A peer that reads
    /// nothing for that long (stalled, or buggy) loses the stream: it does
    /// not keep a serving thread and the reply's memory forever.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_secs: f64,
    /// The peers.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
}

fn default_pacing() -> f64 {
    2.0
}
fn default_catalog_interval() -> u64 {
    2000
}
fn default_stall_timeout() -> f64 {
    60.0
}

/// One peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node id (printed by its `syncd init`).
    pub id: String,
    /// Where it listens.
    pub address: SocketAddr,
    /// Image name globs this peer may pull from us.
    #[serde(default)]
    pub pull: Vec<String>,
    /// Image name globs this peer may push to us.
    #[serde(default)]
    pub push: Vec<String>,
}

/// A peer, validated.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Node id.
    pub id: NodeId,
    /// Address.
    pub address: SocketAddr,
    /// What it may do.
    pub policy: Policy,
}

impl Config {
    /// Load and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }

    /// Parse and validate config text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.into(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.into(),
            message,
        };
        if !(cfg.pacing_factor >= 0.0 && cfg.pacing_factor.is_finite()) {
            return Err(invalid(format!(
                "pacing_factor must be a number ≥ 0, not {}",
                cfg.pacing_factor
            )));
        }
        if !(0.1..=86400.0).contains(&cfg.stall_timeout_secs) {
            return Err(invalid(format!(
                "stall_timeout_secs must be 0.1 to 86400, not {}",
                cfg.stall_timeout_secs
            )));
        }
        if let Some(b) = &cfg.bandwidth {
            parse_rate(b).map_err(invalid)?;
        }
        cfg.peer_list().map_err(invalid)?;
        Ok(cfg)
    }

    /// The peers, validated (ids parse, no duplicates, globs valid).
    pub fn peer_list(&self) -> Result<Vec<Peer>, String> {
        let mut out: Vec<Peer> = Vec::new();
        for p in &self.peers {
            let id = NodeId::from_hex(&p.id).map_err(|e| format!("peer {}: {e}", p.id))?;
            if out.iter().any(|q| q.id == id) {
                return Err(format!("peer {} is listed twice", p.id));
            }
            for g in p.pull.iter().chain(&p.push) {
                if g.is_empty()
                    || !g
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"._-*?".contains(&c))
                {
                    return Err(format!(
                        "peer {}: {g:?} is not a glob over image names (letters, digits, . _ - * ?)",
                        p.id
                    ));
                }
            }
            out.push(Peer {
                id,
                address: p.address,
                policy: Policy {
                    pull: p.pull.clone(),
                    push: p.push.clone(),
                },
            });
        }
        Ok(out)
    }

    /// Bytes per second to each peer, if limited.
    pub fn bandwidth_bytes(&self) -> Option<u64> {
        self.bandwidth.as_deref().and_then(|b| parse_rate(b).ok())
    }

    /// The control socket path.
    pub fn control_path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| crate::identity::state_dir(&self.store).join("control.sock"))
    }
}

/// "100M" (bytes per second, K/M/G powers of 1024; a "bit" suffix means bits).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, bits) = match t.strip_suffix("bit") {
        Some(n) => (n, true),
        None => (t.strip_suffix("B").unwrap_or(t), false),
    };
    let (digits, mult) = match num.chars().last() {
        Some('K' | 'k') => (&num[..num.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&num[..num.len() - 1], 1 << 20),
        Some('G' | 'g') => (&num[..num.len() - 1], 1 << 30),
        _ => (num, 1),
    };
    let v: f64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("bandwidth {s:?}: expected a rate like 100M (bytes/s) or 1Gbit"))?;
    let bytes = v * mult as f64 / if bits { 8.0 } else { 1.0 };
    if !(bytes >= 1.0 && bytes.is_finite()) {
        return Err(format!("bandwidth {s:?} must be at least 1 byte per second"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
store = "/var/lib/geosync"
listen = "127.0.0.1:7400"
metrics = "127.0.0.1:9400"
bandwidth = "1Gbit"
pacing_factor = 3
[[peer]]
id = "0123456789abcdef0123456789abcdef"
address = "127.0.0.1:7401"
pull = ["*"]
push = ["vm-*"]
"#;

    #[test]
    fn parses_and_validates() {
        let c = Config::parse(GOOD, "t").unwrap();
        assert_eq!(c.bandwidth_bytes(), Some((1u64 << 30) / 8));
        assert_eq!(c.pacing_factor, 3.0);
        let peers = c.peer_list().unwrap();
        assert!(peers[0].policy.may_push("vm-1") && !peers[0].policy.may_push("db"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = Config::parse(&GOOD.replace("pacing_factor", "pacing_factr"), "t").unwrap_err();
        assert!(e.to_string().contains("pacing_factr"), "{e}");
        let e = Config::parse(&GOOD.replace("0123456789abcdef0123456789abcdef", "nope"), "t").unwrap_err();
        assert!(e.to_string().contains("node id"), "{e}");
        let e = Config::parse(&format!("stall_timeout_secs = 0\n{GOOD}"), "t").unwrap_err();
        assert!(e.to_string().contains("stall_timeout_secs"), "{e}");
        let e = Config::parse(&GOOD.replace("1Gbit", "fast"), "t").unwrap_err();
        assert!(e.to_string().contains("bandwidth"), "{e}");
        let e = Config::parse(&GOOD.replace("vm-*", "../x"), "t").unwrap_err();
        assert!(e.to_string().contains("glob"), "{e}");
        let twice = format!(
            "{GOOD}\n[[peer]]\nid = \"0123456789abcdef0123456789abcdef\"\naddress = \"127.0.0.1:1\"\n"
        );
        assert!(Config::parse(&twice, "t")
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100M").unwrap(), 100 << 20);
        assert_eq!(parse_rate("512K").unwrap(), 512 << 10);
        assert_eq!(parse_rate("8bit").unwrap(), 1);
        assert!(parse_rate("0").is_err() && parse_rate("-5M").is_err());
    }
}
