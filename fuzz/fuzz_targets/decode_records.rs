//! Every decoder of on-disk records takes arbitrary bytes without panicking, and what
//! decodes re-encodes to the same record.
#![no_main]

use dedupfs::format::{self, key, DirentRecord, ExtentRecord, InodeRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(r) = InodeRecord::decode(data) {
        assert_eq!(InodeRecord::decode(&r.encode()), Some(r));
    }
    if let Some(r) = DirentRecord::decode(data) {
        assert_eq!(DirentRecord::decode(&r.encode()), Some(r));
    }
    if let Some(r) = ExtentRecord::decode(data) {
        assert_eq!(ExtentRecord::decode(&r.encode()), Some(r));
    }
    let _ = format::decode_count(data);
    let _ = format::is_tombstone(data);
    let _ = key::split_versioned(data);
    let _ = key::parse_inode(data);
    let _ = key::parse_named(data);
    let _ = key::parse_extent(data);
    let _ = key::parse_deadlist(data);
    let _ = key::parse_orphan(data);
    let _ = key::parse_quarantine(data);
    let _ = dedupfs::chunking::stored_raw_len(data);
    let _ = dedupfs::chunking::decode(data);
    let _ = serde_json::from_slice::<dedupfs::namespace::ContainerRecord>(data);
    let _ = serde_json::from_slice::<dedupfs::namespace::SnapshotRecord>(data);
    let _ = serde_json::from_slice::<dedupfs::namespace::Counters>(data);
    let _ = serde_json::from_slice::<dedupfs::store::StoreConfig>(data);
});
