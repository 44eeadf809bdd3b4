//! The daemon's memory stays near its budget (`dedupfs mount --memory`) however much is
//! written, by however many writers at once (issue 5: bounded, configurable caches).

mod common;

use std::io::Write;

use common::{dedupfs, Mounted};

/// Peak resident size of a process (VmHWM), in bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

#[test]
fn peak_rss_stays_near_the_memory_budget_with_many_writers() {
    let mut m = Mounted::new();
    m.unmount();
    m.mount_with_args(&["--memory", "64M"]);
    let pid = m.daemon_pid().unwrap();
    const WRITERS: usize = 6;
    const MIB_EACH: usize = 160;
    // Incompressible data that never repeats: every chunk is new and goes through the
    // whole write path (cut, hash, compress, batch, memtable, blob file).
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let path = m.c().join(format!("big{w}"));
            std::thread::spawn(move || {
                let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ ((w as u64) << 32);
                let mut f = std::fs::File::create(path).unwrap();
                let mut buf = vec![0u8; 1 << 20];
                for _ in 0..MIB_EACH {
                    for word in buf.chunks_exact_mut(8) {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        word.copy_from_slice(&state.to_le_bytes());
                    }
                    f.write_all(&buf).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let peak = peak_rss(pid);
    let out = common::ok(dedupfs([
        "stats".as_ref(),
        "--json".as_ref(),
        "--store".as_ref(),
        m.store.as_os_str(),
    ]));
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    let logical = stats["logical_bytes"].as_u64().unwrap();
    assert_eq!(logical, ((WRITERS * MIB_EACH) as u64) << 20);
    // The budget's shares plus the code, FUSE buffers and batches in flight; glibc's
    // default arenas alone let this reach ~3x the bound.
    let bound = 192u64 << 20;
    assert!(
        peak < bound,
        "peak RSS {} MiB with a 64 MiB budget after {} MiB from {WRITERS} writers",
        peak >> 20,
        WRITERS * MIB_EACH
    );
    eprintln!("peak RSS {} MiB", peak >> 20);
    m.finish();
}
