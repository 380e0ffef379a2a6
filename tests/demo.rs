//! `cargo xtask demo`: two peers in network namespaces, ping and a TCP transfer through the
//! encrypted tunnel, then everything torn down.

use tunnelmesh_tests::{Lab, NodeOptions};

fn main() {
    println!("== TunnelMesh demo: two nodes, each in its own network namespace, joined by a veth ==");
    let (lab, a, b) = Lab::pair(100, &NodeOptions::default(), &NodeOptions::default());
    let (na, nb) = (&lab.nodes[a], &lab.nodes[b]);
    println!("node a: underlay {}, mesh {} / {}", na.underlay, na.mesh4, na.mesh6);
    println!("node b: underlay {}, mesh {} / {}", nb.underlay, nb.mesh4, nb.mesh6);
    println!("\n$ ping {} (from a, through the tunnel)", nb.mesh4);
    let out = lab.sh(&na.ns, &format!("ping -n -c 3 -i 0.2 {}", nb.mesh4));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("\n$ ping -6 {} (from b)", na.mesh6);
    let out = lab.sh(&nb.ns, &format!("ping -n -c 3 -i 0.2 {}", na.mesh6));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let bytes = 64 << 20;
    println!("\n$ TCP transfer of {} MiB from a to b", bytes >> 20);
    let (sent, received, secs) = lab.tcp_transfer(a, b, bytes);
    let hex = |h: &[u8; 32]| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
    println!("sent     sha256 {}", hex(&sent));
    println!("received sha256 {}", hex(&received));
    println!(
        "{:.1} MiB/s ({:.2} s), checksums {}",
        (bytes >> 20) as f64 / secs,
        secs,
        if sent == received { "match" } else { "DIFFER" }
    );
    println!("\n$ tunnelmesh status --interface {}", na.iface);
    let out = std::process::Command::new(tunnelmesh_tests::bin())
        .args(["status", "--interface", &na.iface])
        .output()
        .expect("status");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(sent, received, "the transfer was corrupted");
    drop(lab);
    println!("\n== torn down: daemons stopped, namespaces, veths and pins removed ==");
}
