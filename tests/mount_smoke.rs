mod common;

use common::Mounted;

#[test]
fn write_read_remount() {
    let mut m = Mounted::new();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i * 7 + i / 1000) as u8)
        .collect();
    std::fs::write(m.c().join("f"), &data).unwrap();
    assert_eq!(std::fs::read(m.c().join("f")).unwrap(), data);
    m.remount();
    assert_eq!(std::fs::read(m.c().join("f")).unwrap(), data);
    m.finish();
}

/// Unique chunk bytes of the store, from `dedupfs stats --json` (served by the mount).
fn unique_bytes(m: &Mounted) -> u64 {
    let out = common::ok(common::dedupfs([
        "stats".as_ref(),
        "--json".as_ref(),
        "--store".as_ref(),
        m.store.as_os_str(),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["unique_bytes"].as_u64().unwrap()
}

#[test]
fn changing_one_byte_of_a_100_mib_file_stores_less_than_1_mib() {
    use rand::{RngCore, SeedableRng};
    use std::os::unix::fs::FileExt;
    let m = Mounted::new();
    let path = m.c().join("big");
    let mut data = vec![0u8; 100 << 20];
    rand::rngs::StdRng::seed_from_u64(100).fill_bytes(&mut data);
    std::fs::write(&path, &data).unwrap();
    // A second copy keeps the original chunks referenced, so the growth of unique bytes is
    // exactly the new chunk data the change caused.
    std::fs::write(m.c().join("copy"), &data).unwrap();
    let before = unique_bytes(&m);
    assert!(before >= 100 << 20, "random data stores in full: {before}");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[data[50 << 20] ^ 0xff], 50 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let added = unique_bytes(&m) - before;
    assert!(added > 0, "the changed chunk is new");
    assert!(added < 1 << 20, "one changed byte stored {added} new bytes");
    data[50 << 20] ^= 0xff;
    assert!(std::fs::read(&path).unwrap() == data);
    m.finish();
}

#[test]
fn cp_a_keeps_modes_through_acl_xattrs() {
    use std::os::unix::fs::PermissionsExt;
    let m = Mounted::new();
    let src = m.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for (name, mode) in [("a", 0o755), ("b", 0o640), ("c", 0o604)] {
        let p = src.join(name);
        std::fs::write(&p, name).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    // cp -a sets the access ACL xattr, which the filesystem turns into the mode.
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(m.c().join("dst"))
        .status()
        .unwrap();
    assert!(status.success());
    for (name, mode) in [("a", 0o755), ("b", 0o640), ("c", 0o604)] {
        let meta = std::fs::metadata(m.c().join("dst").join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{name}");
    }
    m.finish();
}
