//! `tunmeter clients` and `tunmeter stats`: the pinned counter maps read directly, so they
//! work with or without a running daemon.

use std::{io::IsTerminal as _, path::Path, time::Duration};

use anyhow::Context as _;

use super::report;
use crate::bpf::{clock, counters, loader::PinnedMaps};

fn no_pins_hint(pin_dir: &Path) -> String {
    format!("reading pinned maps under {} (is `tunmeter run` started with this --pin-dir?)", pin_dir.display())
}

/// The outcome counters: why packets were or were not counted.
pub fn stats(pin_dir: &Path, json: bool) -> anyhow::Result<()> {
    let rows = counters::read_stats(&PinnedMaps::new(pin_dir)).with_context(|| no_pins_hint(pin_dir))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "outcomes": rows }))?);
    } else {
        print!("{}", report::stats_table(&rows));
    }
    Ok(())
}

/// The per-client counters, once or every `watch` seconds with rates.
pub fn clients(pin_dir: &Path, json: bool, watch: Option<f64>, count: Option<u64>) -> anyhow::Result<()> {
    let maps = PinnedMaps::new(pin_dir);
    // Last-seen needs the kernel clock; counters are shown without it if it is unavailable.
    let kclock = clock::KernelClock::open(pin_dir).and_then(|k| k.calibrate().map(|c| (k, c.hz)));
    if let Err(e) = &kclock {
        tracing::warn!(%e, "last-seen times unavailable");
    }
    let read = || {
        let cal = kclock.as_ref().ok().and_then(|(k, hz)| k.recalibrate(*hz).ok());
        counters::read_clients(&maps, cal.as_ref()).with_context(|| no_pins_hint(pin_dir))
    };
    let Some(secs) = watch else {
        let snap = read()?;
        if json {
            println!("{}", serde_json::to_string_pretty(&snap)?);
        } else {
            print!("{}", report::clients_table(&snap, None));
        }
        return Ok(());
    };
    anyhow::ensure!(secs >= 0.1 && secs.is_finite(), "--watch needs at least 0.1 seconds");
    let mut before = read()?;
    let mut n = 0;
    loop {
        std::thread::sleep(Duration::from_secs_f64(secs));
        let now = read()?;
        let rates = report::rates(&now, &before);
        if json {
            let rates: Vec<_> = rates
                .iter()
                .map(
                    |(ip, r)| serde_json::json!({"ip": ip, "upload_bps": r.upload_bps, "download_bps": r.download_bps}),
                )
                .collect();
            println!("{}", serde_json::to_string(&serde_json::json!({"snapshot": now, "rates": rates}))?);
        } else {
            // Clear the screen between refreshes on a terminal; plain tables when piped.
            let clear = if std::io::stdout().is_terminal() { "\x1b[2J\x1b[H" } else { "" };
            print!("{clear}{}", report::clients_table(&now, Some(&rates)));
        }
        before = now;
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(());
        }
    }
}
