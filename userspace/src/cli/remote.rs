//! `tunmeter reset` and `tunmeter sessions`: requests to the running daemon over its control
//! socket, with the daemon's error message when it refuses.

use anyhow::Context as _;

use super::{args::SettingsArgs, report, runtime};
use crate::{api::params::parse_client, control};

/// The message of an API error body, or the raw body.
fn api_error_message(status: u16, body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .map_or_else(|| format!("HTTP {status}: {body}"), |m| format!("{m} (HTTP {status})"))
}

/// GET or POST `path` on the daemon; the body of a 200, else the daemon's error.
fn call(settings: &SettingsArgs, method: hyper::Method, path: &str) -> anyhow::Result<String> {
    let cfg = settings.load()?;
    let (status, body) = runtime()?.block_on(control::request(&cfg.state_dir, method, path, 30))?;
    if status != 200 {
        anyhow::bail!("{}", api_error_message(status, &body));
    }
    Ok(body)
}

fn client_ip(text: &str) -> anyhow::Result<std::net::IpAddr> {
    parse_client(text).map_err(|e| anyhow::anyhow!(e.message))
}

pub fn reset(client: &str, settings: &SettingsArgs) -> anyhow::Result<()> {
    let ip = client_ip(client)?;
    println!("{}", call(settings, hyper::Method::POST, &format!("/api/v1/clients/{ip}/reset"))?);
    Ok(())
}

pub fn sessions(
    all: bool,
    client: Option<&str>,
    limit: u32,
    json: bool,
    settings: &SettingsArgs,
) -> anyhow::Result<()> {
    let mut path = format!("/api/v1/sessions?limit={limit}");
    if !all {
        path.push_str("&active=true");
    }
    if let Some(c) = client {
        path.push_str(&format!("&client={}", client_ip(c)?));
    }
    let body = call(settings, hyper::Method::GET, &path)?;
    if json {
        println!("{body}");
    } else {
        let v: serde_json::Value = serde_json::from_str(&body).context("the daemon's answer is not JSON")?;
        print!("{}", report::sessions_table(v["sessions"].as_array().map(Vec::as_slice).unwrap_or_default()));
    }
    Ok(())
}
