//! The operator's network policy: which addresses plugins (and the host on a tenant's behalf)
//! may connect to, whatever a grant says.
//!
//! By default only public addresses are reachable: loopback, private (RFC 1918, unique local),
//! link-local (with the cloud metadata address 169.254.169.254), carrier-grade NAT, multicast,
//! unspecified, broadcast, documentation and reserved ranges are refused. An operator opens
//! what really is internal (a registry, an upstream on the LAN) with `[network] allow`:
//! addresses or CIDR ranges (`10.1.2.3`, `10.0.0.0/8`, `[::1]:8080`, `127.0.0.1:5000`) and host
//! names (`registry.internal`, `llm.lan:8000`); an entry without a port allows every port.
//!
//! The check runs on the addresses a connection really goes to, after resolution, at connect
//! time, so a name that resolves to an internal address (DNS rebinding included) is refused like
//! the address itself. A name with any refused address is refused as a whole.

use qlayer_manifest::HostPattern;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Which non-public destinations the operator allows.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    allow: Vec<Allow>,
}

#[derive(Debug, Clone)]
enum Allow {
    /// An address range, with a port or all ports.
    Net { net: IpAddr, prefix: u8, port: Option<u16> },
    /// A host name, with a port or all ports.
    Host { host: String, port: Option<u16> },
}

/// A destination the policy refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The host as the request named it.
    pub host: String,
    /// The address it is (or resolved to).
    pub addr: IpAddr,
    /// The kind of range the address is in.
    pub range: &'static str,
}

/// "an unspecified", "a loopback": the range with its article.
fn with_article(range: &str) -> String {
    let article = if range.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {range}")
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.trim_start_matches('[').trim_end_matches(']') == self.addr.to_string() {
            write!(f, "{} is {} address", self.addr, with_article(self.range))?;
        } else {
            write!(f, "`{}` resolves to {}, {} address", self.host, self.addr, with_article(self.range))?;
        }
        write!(
            f,
            ", which the operator's network policy does not allow (the operator can allow it with `[network] allow`)"
        )
    }
}

impl std::error::Error for Refused {}

/// The kind of non-public range `ip` is in, or `None` for a public address.
pub fn non_public_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_range(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_range(v4);
            }
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else if s[0] == 0x0064 && s[1] == 0xff9b {
                // NAT64: the IPv4 address it embeds decides.
                v4_range(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8))
            } else if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
                // IPv4-compatible (deprecated) and other addresses under ::/96.
                Some("reserved")
            } else {
                None
            }
        }
    }
}

fn v4_range(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("carrier-grade NAT")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || o[0] >= 240 {
        Some("reserved")
    } else if ip.is_documentation() {
        Some("documentation")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix as u32) };
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix as u32) };
            u128::from(ip) & mask == u128::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V4(_)) => ip.to_ipv4_mapped().is_some_and(|v4| in_net(IpAddr::V4(v4), net, prefix)),
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    }
}

fn split_port(s: &str) -> Result<(&str, Option<u16>), String> {
    let bad_port = |p: &str| format!("`{s}`: `{p}` is not a port");
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| format!("`{s}`: missing `]`"))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, Some(p.parse().map_err(|_| bad_port(p))?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(format!("`{s}` is not an address")),
        };
    }
    match s.rsplit_once(':') {
        // One colon: host:port. More: a bare IPv6 address.
        Some((host, p)) if !host.contains(':') => Ok((host, Some(p.parse().map_err(|_| bad_port(p))?))),
        _ => Ok((s, None)),
    }
}

impl NetworkPolicy {
    /// A policy allowing, besides public addresses, the `[network] allow` entries. An entry that
    /// cannot be read is an error naming it.
    pub fn new<S: AsRef<str>>(allow: &[S]) -> Result<Self, String> {
        let mut out = Vec::new();
        for entry in allow {
            let entry = entry.as_ref().trim();
            if entry == "*" || entry.contains("://") {
                return Err(format!(
                    "network allow entry `{entry}`: give an address, a CIDR range or a host name, optionally with :port"
                ));
            }
            let (addr, prefix) = match entry.split_once('/') {
                Some((addr, prefix)) => (addr, Some(prefix)),
                None => (entry, None),
            };
            let (host, port) = split_port(addr).map_err(|e| format!("network allow entry {e}"))?;
            if let Ok(ip) = host.parse::<IpAddr>() {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let prefix = match prefix {
                    Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                        format!("network allow entry `{entry}`: `/{p}` is not a prefix length of {ip}")
                    })?,
                    None => max,
                };
                out.push(Allow::Net { net: ip, prefix, port });
            } else if prefix.is_none() && HostPattern::parse(host).is_ok_and(|p| matches!(p, HostPattern::Exact { .. }))
            {
                out.push(Allow::Host { host: host.to_ascii_lowercase(), port });
            } else {
                return Err(format!("network allow entry `{entry}` is not an address, a CIDR range or a host name"));
            }
        }
        Ok(NetworkPolicy { allow: out })
    }

    /// A policy that allows every address: for tests and tools that talk only to servers they
    /// started themselves. Never the service's default.
    pub fn allow_everything() -> Self {
        NetworkPolicy {
            allow: vec![
                Allow::Net { net: IpAddr::V4(Ipv4Addr::UNSPECIFIED), prefix: 0, port: None },
                Allow::Net { net: IpAddr::V6(Ipv6Addr::UNSPECIFIED), prefix: 0, port: None },
            ],
        }
    }

    fn allows(&self, host: &str, addr: SocketAddr) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.allow.iter().any(|a| match a {
            Allow::Net { net, prefix, port } => {
                in_net(addr.ip(), *net, *prefix) && port.is_none_or(|p| p == addr.port())
            }
            Allow::Host { host: h, port } => h.eq_ignore_ascii_case(host) && port.is_none_or(|p| p == addr.port()),
        })
    }

    /// Whether a connection to `addr`, reached as `host`, may be made.
    pub fn check(&self, host: &str, addr: SocketAddr) -> Result<(), Refused> {
        match non_public_range(addr.ip()) {
            Some(range) if !self.allows(host, addr) => Err(Refused { host: host.to_string(), addr: addr.ip(), range }),
            _ => Ok(()),
        }
    }

    /// Resolves `host:port` and checks every address; the addresses to connect to, in order.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map_err(|e| ResolveError::Lookup(format!("`{bare}` could not be resolved: {e}")))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(ResolveError::Lookup(format!("`{bare}` has no addresses")));
        }
        for addr in &addrs {
            self.check(bare, *addr).map_err(ResolveError::Refused)?;
        }
        Ok(addrs)
    }

    /// Checks a grant before it is recorded: a grant of an address that the policy refuses is
    /// refused at install, naming it. Host names (`localhost` too) are checked when connecting,
    /// on what they resolve to.
    pub fn check_grant(&self, grant: &HostPattern) -> Result<(), Refused> {
        let HostPattern::Exact { host, port } = grant else { return Ok(()) };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let Ok(ip) = bare.parse::<IpAddr>() else { return Ok(()) };
        let ports: &[u16] = match port {
            Some(p) => &[*p],
            None => &[80, 443],
        };
        for p in ports {
            self.check(bare, SocketAddr::new(ip, *p))?;
        }
        Ok(())
    }
}

/// Why a destination could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// The network policy refuses it.
    Refused(Refused),
    /// The name did not resolve.
    Lookup(String),
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::Refused(r) => r.fmt(f),
            ResolveError::Lookup(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ResolveError {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_public_addresses_pass_by_default() {
        let policy = NetworkPolicy::default();
        for refused in [
            "127.0.0.1:8080",
            "10.0.0.1:80",
            "172.16.5.4:80",
            "192.168.1.1:80",
            "169.254.169.254:80",
            "100.64.0.1:80",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[::1]:5432",
            "[::]:80",
            "[fd00::1]:80",
            "[fe80::1]:80",
            "[::ffff:127.0.0.1]:6379",
            "[::ffff:169.254.169.254]:80",
            "[64:ff9b::a00:1]:80",
            "[::127.0.0.1]:80",
        ] {
            assert!(policy.check("h", addr(refused)).is_err(), "{refused} must be refused");
        }
        for allowed in ["1.1.1.1:443", "8.8.8.8:53", "[2606:4700::1111]:443", "[64:ff9b::808:808]:443"] {
            assert!(policy.check("h", addr(allowed)).is_ok(), "{allowed} is public");
        }
        let err = policy.check("169.254.169.254", addr("169.254.169.254:80")).unwrap_err();
        assert_eq!(err.range, "link-local");
        assert!(err.to_string().contains("169.254.169.254 is a link-local address"), "{err}");
        let err = policy.check("evil.example", addr("127.0.0.1:80")).unwrap_err();
        assert!(err.to_string().contains("`evil.example` resolves to 127.0.0.1, a loopback address"), "{err}");
        let err = policy.check("0.0", addr("0.0.0.0:443")).unwrap_err();
        assert!(err.to_string().contains("`0.0` resolves to 0.0.0.0, an unspecified address"), "{err}");
    }

    #[test]
    fn the_operator_allow_list_opens_addresses_ranges_names_and_ports() {
        let policy =
            NetworkPolicy::new(&["10.0.0.0/8", "127.0.0.1:5000", "[::1]", "registry.internal", "llm.lan:8000"])
                .unwrap();
        assert!(policy.check("x", addr("10.20.30.40:1")).is_ok());
        assert!(policy.check("x", addr("127.0.0.1:5000")).is_ok());
        assert!(policy.check("x", addr("127.0.0.1:5001")).is_err());
        assert!(policy.check("x", addr("[::1]:9")).is_ok());
        assert!(policy.check("registry.internal", addr("192.168.0.9:443")).is_ok());
        assert!(policy.check("llm.lan", addr("192.168.0.9:8000")).is_ok());
        assert!(policy.check("llm.lan", addr("192.168.0.9:22")).is_err());
        assert!(policy.check("x", addr("192.168.0.9:443")).is_err());
        for bad in ["*", "http://x", "10.0.0.0/33", "1.2.3.4:http", "a b"] {
            let err = NetworkPolicy::new(&[bad]).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn grants_of_internal_addresses_are_refused_at_install() {
        let policy = NetworkPolicy::default();
        for grant in ["127.0.0.1:8080", "169.254.169.254", "10.0.0.1", "[::1]:5432", "127.0.0.1:6379", "0.0.0.0:80"] {
            assert!(policy.check_grant(&HostPattern::parse(grant).unwrap()).is_err(), "{grant}");
        }
        assert!(policy.check_grant(&HostPattern::parse("api.openai.com").unwrap()).is_ok());
        assert!(policy.check_grant(&HostPattern::parse("1.1.1.1:443").unwrap()).is_ok());
        let open = NetworkPolicy::new(&["127.0.0.1:8080"]).unwrap();
        assert!(open.check_grant(&HostPattern::parse("127.0.0.1:8080").unwrap()).is_ok());
        assert!(open.check_grant(&HostPattern::parse("127.0.0.1:8081").unwrap()).is_err());
    }

    #[tokio::test]
    async fn names_are_checked_on_what_they_resolve_to() {
        let policy = NetworkPolicy::default();
        let err = policy.resolve("localhost", 80).await.unwrap_err();
        assert!(matches!(err, ResolveError::Refused(Refused { range: "loopback", .. })), "{err}");
        let open = NetworkPolicy::new(&["localhost"]).unwrap();
        assert!(open.resolve("localhost", 80).await.is_ok());
    }
}
