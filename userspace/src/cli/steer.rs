//! `tunmeter steer add|del|list`: forward and redirect rules in the pinned maps; a change
//! applies at once and needs no daemon (docs/steering.md).

use clap::Subcommand;

use super::{
    args::{JsonArg, PinArgs},
    report,
};
use crate::{
    steer::{Origin, SteerMaps, guard, host},
    types::{
        Allow, ForwardSpec, Proto, RedirectSpec, Unparsed,
        rules::{parse_net, parse_port},
    },
};

#[derive(Subcommand)]
pub enum SteerCmd {
    /// Add a rule.
    Add {
        #[command(subcommand)]
        rule: AddRule,
    },
    /// Delete a rule (flows of a deleted forward rule stop at once; see docs/steering.md).
    Del {
        #[command(subcommand)]
        rule: DelRule,
    },
    /// List rules with their counters, the bypass set and the steering events.
    List {
        #[command(flatten)]
        pins: PinArgs,
        #[command(flatten)]
        out: JsonArg,
    },
}

#[derive(Subcommand)]
pub enum AddRule {
    /// (protocol, public port) on the egress interfaces -> a device's VPN address and port.
    Forward {
        #[arg(long, value_enum, ignore_case = true)]
        proto: Proto,
        #[arg(long, value_parser = parse_port)]
        public_port: u16,
        /// The device's VPN IPv4 address and port, e.g. 10.8.0.2:3128.
        #[arg(long)]
        device: String,
        /// Only traffic to this address of the host (default: any).
        #[arg(long)]
        public_address: Option<String>,
        /// Add it even if the device is not in a client subnet (of the pinned subnet map) or is
        /// loopback, or if this host listens on the public port.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// TCP and UDP from a VPN client address or subnet -> the local transparent proxy.
    Redirect {
        /// Client address or subnet, e.g. 10.8.0.5 or 10.8.0.0/24 (IPv6 too).
        #[arg(long, value_parser = parse_net)]
        source: ipnet::IpNet,
        /// The transparent proxy's port (it listens with IP_TRANSPARENT on the wildcard address).
        #[arg(long, value_parser = parse_port)]
        proxy_port: u16,
        /// Fragments, IPv4 options, IPv6 extension headers and protocols not allowed: dropped
        /// (default) or passed around the proxy.
        #[arg(long, value_enum, ignore_case = true, default_value_t = Unparsed::Drop)]
        unparsed: Unparsed,
        /// A protocol besides TCP and UDP that passes untouched (repeatable): icmp, gre, esp, ah,
        /// sctp, ipip, ipv6.
        #[arg(long)]
        allow: Vec<String>,
        /// Add it even if the source is every address (0.0.0.0/0, ::/0).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        pins: PinArgs,
    },
}

#[derive(Subcommand)]
pub enum DelRule {
    Forward {
        #[arg(long, value_enum, ignore_case = true)]
        proto: Proto,
        #[arg(long, value_parser = parse_port)]
        public_port: u16,
        #[command(flatten)]
        pins: PinArgs,
    },
    Redirect {
        #[arg(long, value_parser = parse_net)]
        source: ipnet::IpNet,
        #[command(flatten)]
        pins: PinArgs,
    },
}

pub fn steer(cmd: SteerCmd) -> anyhow::Result<()> {
    match cmd {
        SteerCmd::Add { rule: AddRule::Forward { proto, public_port, device, public_address, force, pins } } => {
            let spec =
                ForwardSpec::parse(&proto.to_string(), &public_port.to_string(), &device, public_address.as_deref())?;
            // No config here: the device must be in a subnet the daemon pinned.
            let subnets = if force { None } else { Some(guard::pinned_subnets(&pins.pin_dir)?) };
            guard::check_forward(&spec, subnets.as_deref(), force)?;
            let id = SteerMaps::new(&pins.pin_dir).add_forward(&spec, Origin::Runtime)?;
            host::reserve_ports(&[spec.public_port].into_iter().collect())?;
            if !host::ipv4_forwarding() {
                eprintln!("warning: net.ipv4.ip_forward is 0: forwarded traffic cannot reach the device");
            }
            eprintln!("forward rule {id}: {}/{} -> {}", spec.proto, spec.public_port, spec.device);
        }
        SteerCmd::Add { rule: AddRule::Redirect { source, proxy_port, unparsed, allow, force, pins } } => {
            let spec = RedirectSpec { unparsed, allow: Allow::parse(&allow)?, ..RedirectSpec::new(source, proxy_port) };
            guard::check_redirect(&spec, force)?;
            let id = SteerMaps::new(&pins.pin_dir).add_redirect(&spec, Origin::Runtime)?;
            eprintln!("redirect rule {id}: {} -> proxy port {}", spec.source, spec.proxy_port);
        }
        SteerCmd::Del { rule: DelRule::Forward { proto, public_port, pins } } => {
            SteerMaps::new(&pins.pin_dir).del_forward(proto, public_port)?;
            eprintln!("forward rule {proto}/{public_port} deleted");
        }
        SteerCmd::Del { rule: DelRule::Redirect { source, pins } } => {
            SteerMaps::new(&pins.pin_dir).del_redirect(source)?;
            eprintln!("redirect rule {source} deleted");
        }
        SteerCmd::List { pins, out } => {
            let list = SteerMaps::new(&pins.pin_dir).list()?;
            if out.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", report::steer_table(&list));
            }
        }
    }
    Ok(())
}
