//! How `tunnelmesh status` reads to a person: the status document rendered through `Display`.

use std::fmt;

use crate::node::status::Status;

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "interface: {} (port {}, mtu {}, up {} s)",
            self.interface, self.listen_port, self.mtu, self.uptime_secs
        )?;
        writeln!(f, "  offloads: {}", self.offloads)?;
        writeln!(f, "  identity: {}", self.fingerprint)?;
        writeln!(f, "  addresses: {}", self.addresses.join(", "))?;
        if !self.ipv6 {
            writeln!(f, "  ipv6: disabled on this host (the mesh runs over IPv4 only)")?;
        }
        if let Some(c) = &self.coordinator {
            writeln!(f, "  coordinator: {} ({})", c.url, c.state)?;
            if let Some(e) = &c.last_error {
                writeln!(f, "    last error: {e}")?;
            }
        }
        writeln!(f, "  public key: {}", self.noise_public_key)?;
        let endpoints: Vec<String> = self.nat.endpoints().iter().map(|e| e.to_string()).collect();
        writeln!(
            f,
            "  nat: {} (reflexive {}, STUN RTT {}); candidates: {}",
            self.nat.nat.name(),
            self.nat.reflexive.map_or("unknown".into(), |r| r.to_string()),
            self.nat.stun_rtt_ms.map_or("-".into(), |ms| format!("{ms:.2} ms")),
            if endpoints.is_empty() {
                "(none)".into()
            } else {
                endpoints.join(", ")
            }
        )?;
        if let Some(m) = &self.port_mapping {
            writeln!(
                f,
                "  port mapping: {} via {} (lifetime {} s, renewed {} times)",
                m.external,
                m.protocol.name(),
                m.lifetime_secs,
                m.renewals
            )?;
        }
        match &self.policy {
            Some(p) => {
                writeln!(
                    f,
                    "  policy: default deny, {} inbound rules, enforcement: {}",
                    p.rules.len(),
                    p.enforcement
                )?;
                if let Some(reason) = &p.userspace_reason {
                    writeln!(f, "    (not in the kernel: {reason})")?;
                }
                for r in &p.rules {
                    writeln!(
                        f,
                        "    rule {}: {} {} from {} ({} allowed)",
                        r.id,
                        r.proto,
                        r.ports,
                        r.sources.join(", "),
                        p.rule_hits.get(&r.id).copied().unwrap_or(0)
                    )?;
                }
                let counters: Vec<String> = p.counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
                writeln!(f, "    {}", counters.join(", "))?;
            }
            None => writeln!(f, "  policy: none (static mesh: configured peers may connect)")?,
        }
        writeln!(f, "  shield: {}", self.fastpath.enforcement)?;
        if !self.fastpath.shield_on.is_empty() {
            let on: Vec<String> = self
                .fastpath
                .shield_on
                .iter()
                .map(|s| format!("{} ({})", s.interface, s.hook.name()))
                .collect();
            writeln!(f, "  shield on: {}", on.join(", "))?;
            for (reason, n) in &self.fastpath.shield {
                writeln!(f, "    {reason}: {n}")?;
            }
        }
        if let Some(e) = &self.fastpath.error {
            writeln!(f, "  fast path: {e}")?;
        }
        for (name, n) in self.counters.iter().filter(|(_, n)| **n > 0) {
            writeln!(f, "  {name}: {n}")?;
        }
        for p in &self.peers {
            writeln!(f, "\npeer: {} ({})", p.name, p.fingerprint)?;
            writeln!(f, "  endpoint: {}", p.endpoint.as_deref().unwrap_or("(none)"))?;
            let paths: Vec<String> = p
                .paths
                .iter()
                .filter(|c| c.available)
                .map(|c| {
                    let state = if c.proven { "works" } else { "untested" };
                    match c.rtt_ms {
                        Some(ms) => format!("{} {state}, {ms:.2} ms", c.kind.name()),
                        None => format!("{} {state}", c.kind.name()),
                    }
                })
                .collect();
            writeln!(f, "  path: {} (candidates: {})", p.path, paths.join("; "))?;
            if let Some(n) = &p.nat {
                writeln!(
                    f,
                    "  nat: {}; udp candidates: {}; punches: {} started, {} direct",
                    n.kind.name(),
                    if n.candidates.is_empty() {
                        "(none)".into()
                    } else {
                        n.candidates.join(", ")
                    },
                    n.punches_started,
                    n.punches_succeeded
                )?;
            }
            writeln!(f, "  allowed ips: {}", p.allowed_ips.join(", "))?;
            match p.last_handshake_secs {
                Some(s) => writeln!(f, "  latest handshake: {s} s ago")?,
                None => writeln!(f, "  latest handshake: never")?,
            }
            writeln!(f, "  transfer: {} B received, {} B sent", p.rx_bytes, p.tx_bytes)?;
        }
        Ok(())
    }
}
