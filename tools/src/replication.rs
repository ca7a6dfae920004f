//! `geosync move` and `geosync sync status`: clients of the local syncd's
//! control socket (never the network port).

use std::path::Path;
use std::time::UNIX_EPOCH;

use anyhow::{bail, Result};
use geosync_syncd::control::Client;

use crate::cli::progress_bar;
use crate::units::format_size;

/// Forced transfer of `image` to peer `to`, with a progress bar.
pub fn move_image(control: &Path, image: &str, to: &str) -> Result<()> {
    let mut c = Client::connect(control)?;
    c.start_move(image, to)?;
    let pb = progress_bar(0, &format!("moving {image}"));
    loop {
        let Some(ev) = c.next_event()? else {
            pb.abandon();
            bail!("syncd closed the control connection before the move finished");
        };
        pb.set_length(ev.total.max(ev.bytes));
        pb.set_position(ev.bytes);
        match ev.state.as_str() {
            "done" => {
                pb.finish_and_clear();
                println!(
                    "moved {image} to {to}: {} sent; its home is now {to}",
                    format_size(ev.bytes)
                );
                return Ok(());
            }
            "error" => {
                pb.abandon();
                bail!("move failed: {}", ev.message.unwrap_or_default());
            }
            _ => {}
        }
    }
}

fn ago(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if ms >= now {
        format!("in {}s", (ms - now).div_ceil(1000))
    } else {
        format!("{}s ago", (now - ms) / 1000)
    }
}

/// Print the daemon's view of every image and peer.
pub fn status(control: &Path, json: bool) -> Result<()> {
    let st = Client::connect(control)?.status()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!("node {}", st.node);
    for p in &st.peers {
        println!(
            "peer {} at {}: {}",
            p.id,
            p.address,
            if p.up { "connected" } else { "DISCONNECTED" }
        );
    }
    println!(
        "{:<24} {:<10} {:<12} {:<14} {:<22} NEXT ALLOWED",
        "IMAGE", "PEER", "STATE", "BEHIND", "LAST TRANSFER"
    );
    for i in &st.images {
        for p in &i.peers {
            let behind = match (p.behind_blocks, p.behind_bytes) {
                (Some(b), Some(n)) => format!("{b} blk/{}", format_size(n)),
                _ => "-".into(),
            };
            let last = p
                .last_transfer
                .as_ref()
                .map(|t| format!("{} {}", format_size(t.bytes), ago(t.at_ms)))
                .unwrap_or_else(|| "-".into());
            let next = p.next_allowed_ms.map(ago).unwrap_or_else(|| "now".into());
            let state = if p.transferring {
                format!("{} (pulling)", p.state)
            } else {
                p.state.clone()
            };
            println!(
                "{:<24} {:<10} {:<12} {:<14} {:<22} {}{}",
                i.image,
                &p.peer[..8],
                state,
                behind,
                last,
                next,
                i.home
                    .as_ref()
                    .map(|h| format!("  (home: {})", &h[..8]))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
