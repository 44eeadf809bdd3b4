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
