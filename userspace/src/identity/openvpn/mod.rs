//! OpenVPN: the management interface (`status 3` and live client notifications) and the
//! `client-connect` / `client-disconnect` hook.
//!
//! CONTRACT (skeleton; helper A fills in the bodies, keeps these signatures).

pub mod hook;
pub mod mgmt;
pub mod status;
