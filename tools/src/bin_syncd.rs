//! The `syncd` binary: `syncd init --store DIR`, `syncd run --config FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use geosync_syncd::{
    config::Config,
    daemon,
    identity::{Identity, IdentityError},
};

/// geosync replication daemon: replicates images between sites over QUIC
/// (mutual TLS, pinned node ids), shipping only the blocks a peer lacks.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create this node's key pair in STORE/syncd (and the store itself if
    /// it does not exist); prints the node id as the last line.
    ///
    /// Run again, it prints the node id of the key already there. A key
    /// whose id the store does not carry (an init that stopped before
    /// recording it, or a key copied from another node) is refused, with
    /// what to do.
    Init {
        /// Store directory.
        #[arg(long, env = "GEOSYNC_STORE", default_value = "./data")]
        store: PathBuf,
        /// Record the id of the key already in STORE/syncd as the store's
        /// node id (only for a key made for this store whose init stopped
        /// before recording it: two nodes must never share a key).
        #[arg(long)]
        adopt_key: bool,
    },
    /// Run the daemon.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("syncd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Init { store, adopt_key } => {
            let st = match geosync_fs::Store::open(&store, geosync_fs::OpenMode::ReadWrite) {
                Ok(s) => s,
                Err(geosync_fs::Error::NoStore(_)) => {
                    eprintln!("syncd: creating store {}", store.display());
                    geosync_fs::Store::init(&store, &geosync_fs::InitOptions::default())?
                }
                Err(e) => return Err(e.into()),
            };
            let dir = geosync_syncd::identity::state_dir(&store);
            let id = match Identity::create(&store) {
                Ok(me) => me.id,
                Err(IdentityError::Exists(_, id)) => {
                    if st.node_id() == id {
                        eprintln!("syncd: {} has this store's key already", dir.display());
                        println!("{id}");
                        return Ok(());
                    }
                    if !adopt_key {
                        anyhow::bail!(
                            "{} has a key for node {} but the store's node id is {}: if that key was made \
                             for this store by an init that stopped before recording it, run \
                             `syncd init --store {} --adopt-key`; if it came from another node, \
                             remove {} and run `syncd init` for a key of this node's own",
                            dir.display(),
                            id,
                            st.node_id(),
                            store.display(),
                            dir.display()
                        );
                    }
                    id
                }
                Err(e) => return Err(e.into()),
            };
            st.set_node_id(id).context("recording the node id in the store")?;
            eprintln!("syncd: key in {}; give this node id to its peers:", dir.display());
            println!("{id}");
            Ok(())
        }
        Cmd::Run { config } => {
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async {
                let shutdown = async {
                    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                };
                daemon::run(cfg, shutdown).await
            })?;
            Ok(())
        }
    }
}
