//! What the daemon tells the kernel programs about a device and how it attaches them: the
//! device layer (where the IP header starts), the attach mode, and the mark, table and priority
//! of the policy route that delivers redirected packets locally.

use serde::{Deserialize, Serialize};

/// `skb->mark` of redirected packets (the programs' `REDIRECT_MARK` global).
pub const DEFAULT_REDIRECT_MARK: u32 = 0x746d_0001;
/// Routing table of the redirect policy route.
pub const DEFAULT_REDIRECT_TABLE: u32 = 29549;
/// Priority of the redirect policy rule.
pub const DEFAULT_RULE_PRIORITY: u32 = 29549;

/// Layer of a device: where the IP header starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// tun / wg devices: the packet starts at the IP header.
    L3,
    /// Ethernet devices: 14-byte header first.
    L2,
}

impl Layer {
    /// The programs' `L3_OFFSET` global for this layer.
    pub fn l3_offset(self) -> u32 {
        match self {
            Layer::L3 => 0,
            Layer::L2 => tunmeter_common::ETH_HLEN,
        }
    }
}

/// How programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX links (pinned; kernel >= 6.6) when available, else a clsact qdisc.
    #[default]
    Auto,
    /// TCX links only.
    Tcx,
    /// clsact qdisc + cls_bpf filter through netlink (kernels before 6.6).
    Netlink,
}

/// Mark, table and priority of the redirect policy route (`ip rule fwmark MARK lookup TABLE`
/// and `local default dev lo` in TABLE). Installed and removed by `steer::host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRoute {
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
}

impl Default for PolicyRoute {
    fn default() -> Self {
        PolicyRoute { mark: DEFAULT_REDIRECT_MARK, table: DEFAULT_REDIRECT_TABLE, priority: DEFAULT_RULE_PRIORITY }
    }
}
