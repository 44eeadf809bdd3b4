//! The control socket answers malformed requests with an error and changes nothing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use common::Mounted;

fn ask(stream: &mut UnixStream, line: &[u8]) -> serde_json::Value {
    stream.write_all(line).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut reply = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut reply)
        .unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"))
}

#[test]
fn malformed_requests_get_errors_and_change_nothing() {
    let m = Mounted::new();
    let socket = m.store.join("control.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the socket is for its owner only");
    let mut s = UnixStream::connect(&socket).unwrap();
    for (request, expect) in [
        (&b"not json"[..], "malformed"),
        (br#"{"v":1,"op":"no-such-op"}"#, "malformed"),
        (br#"{"v":99,"op":"ping"}"#, "version"),
        (
            br#"{"v":1,"op":"container-create","name":"../escape"}"#,
            "invalid",
        ),
        (br#"{"v":1,"op":"container-create","name":""}"#, "invalid"),
        (
            br#"{"v":1,"op":"container-delete","name":"nope","force":true}"#,
            "does not exist",
        ),
    ] {
        let reply = ask(&mut s, request);
        assert_eq!(reply["ok"], false, "{}", String::from_utf8_lossy(request));
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(expect),
            "{error:?} for {}",
            String::from_utf8_lossy(request)
        );
    }
    // The connection still works for a good request.
    let reply = ask(&mut s, br#"{"v":1,"op":"container-list"}"#);
    assert_eq!(reply["ok"], true);
    let names: Vec<&str> = reply["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c"], "nothing was created or deleted");
    // An over-long request is refused and the connection closed; the daemon goes on.
    let mut long = UnixStream::connect(&socket).unwrap();
    let reply = ask(&mut long, &vec![b'x'; 100_000]);
    assert_eq!(reply["ok"], false);
    let mut again = UnixStream::connect(&socket).unwrap();
    assert_eq!(ask(&mut again, br#"{"v":1,"op":"ping"}"#)["ok"], true);
    assert!(m.c().is_dir());
    m.finish();
}
