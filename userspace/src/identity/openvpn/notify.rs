//! Parsing the management interface's real-time `>CLIENT:` notifications: ESTABLISHED and
//! DISCONNECT with their ENV blocks, incrementally, with limits on runaway blocks.

use super::status::Skipped;

/// A real-time notification from the management interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// `>CLIENT:ESTABLISHED,{cid}` (+ its ENV block): a client finished connecting.
    Established { client_id: u64, env: Vec<(String, String)> },
    /// `>CLIENT:DISCONNECT,{cid}` (+ ENV block).
    Disconnect { client_id: u64, env: Vec<(String, String)> },
    /// Any other `>` line (CONNECT, REAUTH, LOG, HOLD, INFO, ...), not used.
    Other(String),
}

impl Notification {
    /// A value of the ENV block (ESTABLISHED / DISCONNECT).
    pub fn env(&self, key: &str) -> Option<&str> {
        match self {
            Notification::Established { env, .. } | Notification::Disconnect { env, .. } => {
                env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
            }
            Notification::Other(_) => None,
        }
    }
}

/// What a `>CLIENT:` block that is being collected will become.
#[derive(Debug)]
enum BlockKind {
    Established(u64),
    Disconnect(u64),
    /// CONNECT, REAUTH, CR_RESPONSE...: reported as Other once its ENV block ends.
    Other,
    /// The header did not parse: reported as Skipped once its ENV block ends.
    Broken(String),
}

#[derive(Debug)]
struct Block {
    header: String,
    kind: BlockKind,
    env: Vec<(String, String)>,
    /// Bytes of the ENV lines so far (keys and values).
    bytes: usize,
    /// Over a limit: reported once, the rest of the block is swallowed up to its END.
    dropped: bool,
}

/// Incremental parser for `>` lines: feed every line that starts with `>` (CR stripped or
/// not), get complete notifications. `>CLIENT:` headers other than ADDRESS and ENV open a
/// block that ends at `>CLIENT:ENV,END`.
#[derive(Debug, Default)]
pub struct NotificationParser {
    block: Option<Block>,
}

/// Longest ENV block accepted (OpenVPN sends ~60 variables, ~4 KiB; a runaway block is
/// dropped): at most this many lines ...
const MAX_ENV: usize = 4096;
/// ... and this many bytes of keys and values (each line may be up to 1 MiB long).
const MAX_ENV_BYTES: usize = 256 * 1024;

impl NotificationParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// True while an ENV block is open (more `>CLIENT:ENV` lines expected).
    pub fn in_block(&self) -> bool {
        self.block.is_some()
    }

    /// Feed one line. Usually returns zero or one item; two when a new block starts while an
    /// old one was never ended (the old one comes back as Skipped).
    pub fn feed(&mut self, raw: &str) -> Vec<Result<Notification, Skipped>> {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let mut out = Vec::new();
        let Some(body) = line.strip_prefix('>') else {
            out.push(Err(Skipped::new(line, "not a notification (does not start with '>')")));
            return out;
        };
        if let Some(env) = body.strip_prefix("CLIENT:ENV,") {
            match self.block.as_mut() {
                None => out.push(Err(Skipped::new(line, "ENV line outside a >CLIENT: block"))),
                Some(_) if env == "END" => {
                    let b = self.block.take().expect("checked");
                    if b.dropped {
                        // Already reported when it went over the limit.
                        return out;
                    }
                    out.push(match b.kind {
                        BlockKind::Established(client_id) => Ok(Notification::Established { client_id, env: b.env }),
                        BlockKind::Disconnect(client_id) => Ok(Notification::Disconnect { client_id, env: b.env }),
                        BlockKind::Other => Ok(Notification::Other(b.header)),
                        BlockKind::Broken(reason) => Err(Skipped { line: b.header, reason }),
                    });
                }
                Some(b) if b.dropped => {}
                Some(b) => {
                    let too_long = if b.env.len() >= MAX_ENV {
                        Some(format!("ENV block longer than {MAX_ENV} lines: dropped"))
                    } else if b.bytes + env.len() > MAX_ENV_BYTES {
                        Some(format!("ENV block larger than {} KiB: dropped", MAX_ENV_BYTES / 1024))
                    } else {
                        None
                    };
                    if let Some(reason) = too_long {
                        b.dropped = true;
                        b.env = Vec::new();
                        out.push(Err(Skipped { line: b.header.clone(), reason }));
                    } else {
                        b.bytes += env.len();
                        let (k, v) = env.split_once('=').unwrap_or((env, ""));
                        b.env.push((k.to_string(), v.to_string()));
                    }
                }
            }
            return out;
        }
        if let Some(b) = self.block.take()
            && !b.dropped
        {
            out.push(Err(Skipped { line: b.header, reason: format!("ENV block not ended before {line:?}") }));
        }
        if let Some(rest) = body.strip_prefix("CLIENT:") {
            let (what, args) = rest.split_once(',').unwrap_or((rest, ""));
            let kind = match what {
                // One-line notifications without an ENV block.
                "ADDRESS" => {
                    out.push(Ok(Notification::Other(line.to_string())));
                    return out;
                }
                "ESTABLISHED" | "DISCONNECT" => match args.parse::<u64>() {
                    Ok(cid) if what == "ESTABLISHED" => BlockKind::Established(cid),
                    Ok(cid) => BlockKind::Disconnect(cid),
                    Err(_) => BlockKind::Broken(format!("client id {args:?} is not a number")),
                },
                _ => BlockKind::Other,
            };
            self.block = Some(Block { header: line.to_string(), kind, env: Vec::new(), bytes: 0, dropped: false });
        } else {
            out.push(Ok(Notification::Other(line.to_string())));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESTABLISHED: &str = include_str!("testdata/notify-established-udp.txt");
    const DISCONNECT: &str = include_str!("testdata/notify-disconnect-mca.txt");
    const CLIENT_AUTH_SESSION: &str = include_str!("testdata/mgmt-client-auth-session.txt");

    fn feed_all(p: &mut NotificationParser, text: &str) -> Vec<Result<Notification, Skipped>> {
        text.lines().flat_map(|l| p.feed(l)).collect()
    }

    #[test]
    fn real_established_block() {
        let mut p = NotificationParser::new();
        let out = feed_all(&mut p, ESTABLISHED);
        assert_eq!(out.len(), 1, "{out:?}");
        let n = out[0].clone().unwrap();
        let Notification::Established { client_id, env } = &n else { panic!("{n:?}") };
        assert_eq!(*client_id, 0);
        assert!(env.len() > 40);
        assert_eq!(n.env("common_name"), Some("client1"));
        assert_eq!(n.env("ifconfig_pool_remote_ip"), Some("10.8.0.2"));
        assert_eq!(n.env("trusted_port"), Some("38937"));
        assert_eq!(n.env("script_type"), Some("client-connect"));
        // A value containing '=' keeps it.
        assert_eq!(n.env("tls_id_0"), Some("CN=client1"));
        assert!(!p.in_block());
    }

    #[test]
    fn real_disconnect_block() {
        let mut p = NotificationParser::new();
        let out = feed_all(&mut p, DISCONNECT);
        assert_eq!(out.len(), 1, "{out:?}");
        let n = out[0].clone().unwrap();
        assert!(matches!(n, Notification::Disconnect { client_id: 5, .. }), "{n:?}");
        assert_eq!(n.env("bytes_received"), Some("2104"));
        assert_eq!(n.env("script_type"), Some("client-disconnect"));
    }

    #[test]
    fn real_client_auth_session() {
        // CONNECT (with an ENV block), ADDRESS lines, ESTABLISHED, DISCONNECT, from a server
        // with management-client-auth; the SUCCESS reply line is not a notification.
        let mut p = NotificationParser::new();
        let out: Vec<_> = CLIENT_AUTH_SESSION.lines().filter(|l| l.starts_with('>')).flat_map(|l| p.feed(l)).collect();
        let kinds: Vec<String> = out
            .iter()
            .map(|r| match r {
                Ok(Notification::Established { client_id, .. }) => format!("E{client_id}"),
                Ok(Notification::Disconnect { client_id, .. }) => format!("D{client_id}"),
                Ok(Notification::Other(l)) => l.split(',').next().unwrap().to_string(),
                Err(s) => format!("skipped {s:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info",
                ">CLIENT:CONNECT",
                ">CLIENT:ADDRESS",
                ">CLIENT:ADDRESS",
                "E5",
                "D5"
            ]
        );
    }

    #[test]
    fn broken_blocks() {
        let mut p = NotificationParser::new();
        // ENV without a block.
        assert!(p.feed(">CLIENT:ENV,a=b").pop().unwrap().is_err());
        // Bad client id: the block is consumed and reported once, at END.
        assert!(p.feed(">CLIENT:ESTABLISHED,x").is_empty());
        assert!(p.feed(">CLIENT:ENV,a=b").is_empty());
        let r = p.feed(">CLIENT:ENV,END\r").pop().unwrap().unwrap_err();
        assert!(r.reason.contains("client id"), "{r:?}");
        // A block interrupted by another notification: the old one is skipped, the new one kept.
        assert!(p.feed(">CLIENT:DISCONNECT,3").is_empty());
        let out = p.feed(">LOG:1,I,hello");
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].as_ref().unwrap_err().reason.contains("not ended"));
        assert_eq!(out[1], Ok(Notification::Other(">LOG:1,I,hello".into())));
        // A non-notification line.
        assert!(p.feed("SUCCESS: x").pop().unwrap().is_err());
        // An over-long block is dropped with one message; the rest of it up to END is
        // swallowed, and the next block parses again.
        p.feed(">CLIENT:ESTABLISHED,1");
        let mut out = Vec::new();
        for i in 0..MAX_ENV + 10 {
            out.extend(p.feed(&format!(">CLIENT:ENV,k{i}=v")));
        }
        out.extend(p.feed(">CLIENT:ENV,END"));
        assert_eq!(out.len(), 1, "{out:?}");
        let s = out[0].as_ref().unwrap_err();
        assert!(s.reason.contains("lines") && s.line == ">CLIENT:ESTABLISHED,1", "{s:?}");
        assert!(!p.in_block());
        assert!(p.feed(">CLIENT:ESTABLISHED,2").is_empty());
        assert!(matches!(p.feed(">CLIENT:ENV,END").pop(), Some(Ok(Notification::Established { client_id: 2, .. }))));
    }

    #[test]
    fn an_env_block_over_the_byte_limit_is_dropped_once() {
        let mut p = NotificationParser::new();
        assert!(p.feed(">CLIENT:ESTABLISHED,7").is_empty());
        // 100 lines of ~4 KiB: well under the line limit, over 256 KiB.
        let value = "x".repeat(4000);
        let mut out = Vec::new();
        for i in 0..100 {
            out.extend(p.feed(&format!(">CLIENT:ENV,k{i}={value}\r")));
        }
        assert!(p.in_block(), "the rest of the block is swallowed up to its END");
        // An interrupted dropped block is not reported a second time either.
        out.extend(p.feed(">LOG:1,I,hello"));
        assert_eq!(out.len(), 2, "{out:?}");
        let s = out[0].as_ref().unwrap_err();
        assert_eq!(s.line, ">CLIENT:ESTABLISHED,7");
        assert!(s.reason.contains("256 KiB"), "{s:?}");
        assert_eq!(out[1], Ok(Notification::Other(">LOG:1,I,hello".into())));
        assert!(!p.in_block());

        // Just under the limit is accepted.
        p.feed(">CLIENT:ESTABLISHED,8");
        let line = "y".repeat(1000);
        let n = MAX_ENV_BYTES / (line.len() + 2);
        for i in 0..n {
            assert!(p.feed(&format!(">CLIENT:ENV,{:02}{}", i % 100, line)).is_empty());
        }
        let n8 = p.feed(">CLIENT:ENV,END").pop().unwrap().unwrap();
        assert!(matches!(&n8, Notification::Established { client_id: 8, env } if env.len() == n), "{}", n);
    }

    #[test]
    fn never_panics_on_odd_input() {
        for text in ["", "\n\n", "\t\t\t", ",,,", ">", ">CLIENT:", ">CLIENT:ENV,END", "\u{0}\u{ff}\r"] {
            let mut p = NotificationParser::new();
            let _ = p.feed(text);
        }
    }
}
