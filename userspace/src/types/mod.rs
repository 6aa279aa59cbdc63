//! The vocabulary every layer shares: device layers and attach modes, steering rule specs,
//! webhook event kinds and the identity enums (session protocols, sources, close reasons).
//! Plain data and parsing only: nothing here touches the kernel, the database or the network.

mod named;

pub mod dataplane;
pub mod events;
pub mod identity;
pub mod rules;

pub use dataplane::{
    AttachMode, DEFAULT_REDIRECT_MARK, DEFAULT_REDIRECT_TABLE, DEFAULT_RULE_PRIORITY, Layer, PolicyRoute,
};
pub use events::EventKind;
pub use identity::{CloseReason, ConnectionProtocol, SessionProtocol, SessionSource};
pub use rules::{Allow, ForwardSpec, Proto, RedirectSpec, RuleError, Unparsed};
