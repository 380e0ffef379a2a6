//! The `ports` items of a policy rule (`tcp/443`, `udp/5000-5010`, `icmp/echo`, `any`), parsed
//! once when the file is read.

use serde::{Deserialize, Serialize};
use tunnelmesh_common::ip::ICMP_ECHO_REQUEST;

/// Transport protocol of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP for IPv4, ICMPv6 for IPv6.
    Icmp,
    Any,
}

/// Inclusive range of destination ports, or of ICMP types for [`Proto::Icmp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange { low: 0, high: u16::MAX };

    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

/// The range of `icmp/echo` (written with the IPv4 type): it means echo request in either family.
pub const ECHO_ONLY: PortRange = PortRange {
    low: ICMP_ECHO_REQUEST as u16,
    high: ICMP_ECHO_REQUEST as u16,
};

/// A `ports` item that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortsError {
    #[error("unknown protocol {proto:?} in {spec:?}: use tcp, udp, icmp or any")]
    UnknownProtocol { proto: String, spec: String },
    #[error("{spec:?}: an ICMP type is \"echo\" or a number 0-255")]
    IcmpType { spec: String },
    #[error("{spec:?}: {port:?} is not a port (0-65535)")]
    NotAPort { spec: String, port: String },
    #[error("{spec:?}: the range is backwards")]
    Backwards { spec: String },
}

/// Parse one `ports` item.
pub fn parse_ports(spec: &str) -> Result<(Proto, PortRange), PortsError> {
    let (proto, range) = spec.split_once('/').map_or((spec, None), |(p, r)| (p, Some(r)));
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        "any" if range.is_none() => return Ok((Proto::Any, PortRange::ALL)),
        other => {
            return Err(PortsError::UnknownProtocol {
                proto: other.into(),
                spec: spec.into(),
            });
        }
    };
    let Some(range) = range else {
        return Ok((proto, PortRange::ALL));
    };
    if proto == Proto::Icmp {
        return match range {
            "echo" => Ok((proto, ECHO_ONLY)),
            t => t
                .parse::<u8>()
                .map(|t| {
                    (
                        proto,
                        PortRange {
                            low: t as u16,
                            high: t as u16,
                        },
                    )
                })
                .map_err(|_| PortsError::IcmpType { spec: spec.into() }),
        };
    }
    let port = |p: &str| {
        p.parse::<u16>().map_err(|_| PortsError::NotAPort {
            spec: spec.into(),
            port: p.into(),
        })
    };
    let (low, high) = match range.split_once('-') {
        Some((l, h)) => (port(l)?, port(h)?),
        None => (port(range)?, port(range)?),
    };
    if low > high {
        return Err(PortsError::Backwards { spec: spec.into() });
    }
    Ok((proto, PortRange { low, high }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse_into_protocol_and_range() {
        assert_eq!(
            parse_ports("tcp/443"),
            Ok((Proto::Tcp, PortRange { low: 443, high: 443 }))
        );
        assert_eq!(
            parse_ports("udp/5000-5010"),
            Ok((Proto::Udp, PortRange { low: 5000, high: 5010 }))
        );
        assert_eq!(parse_ports("tcp"), Ok((Proto::Tcp, PortRange::ALL)));
        assert_eq!(
            parse_ports("icmp/echo"),
            Ok((Proto::Icmp, PortRange { low: 8, high: 8 }))
        );
        assert_eq!(parse_ports("any"), Ok((Proto::Any, PortRange::ALL)));
        assert!(parse_ports("tcp/10-1").unwrap_err().to_string().contains("backwards"));
        assert!(parse_ports("icmp/300").is_err() && parse_ports("any/1").is_err());
    }
}
