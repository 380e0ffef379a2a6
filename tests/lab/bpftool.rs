//! Reading pinned eBPF maps with bpftool.

use super::*;

/// The per-CPU counters of the pinned array PIN, read with bpftool and summed over CPUs, by key.
pub fn percpu_sums(pin: &str) -> std::collections::BTreeMap<u64, u64> {
    bpftool_dump(pin)
        .as_array()
        .expect("bpftool prints an array")
        .iter()
        .map(|entry| {
            // With BTF, bpftool prints typed entries under "formatted".
            let e = entry.get("formatted").unwrap_or(entry);
            let sum = e["values"]
                .as_array()
                .expect("per-CPU values")
                .iter()
                .map(|v| v["value"].as_u64().unwrap_or(0))
                .sum();
            (e["key"].as_u64().expect("u32 key"), sum)
        })
        .collect()
}

/// `bpftool -j map dump pinned PIN`, parsed.
pub fn bpftool_dump(pin: &str) -> Value {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", pin])
        .output()
        .expect("bpftool is installed");
    assert!(
        out.status.success(),
        "bpftool map dump pinned {pin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool prints JSON")
}
