//! OpenVPN: the management interface (`mgmt`: a client per instance, reading `status 3` and
//! live client notifications, parsed by `status` and `notify`) and what the `client-connect` /
//! `client-disconnect` hook sends (`hook`).

pub mod hook;
pub mod mgmt;
pub mod notify;
pub mod status;
