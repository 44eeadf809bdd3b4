//! Test harness: a store in a temp dir, mounted through the real `dedupfs` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_dedupfs");

/// Runs `dedupfs ARGS` and returns its output.
pub fn dedupfs<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(BIN).args(args).output().expect("run dedupfs")
}

/// Asserts success and returns stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "dedupfs failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic, incompressible bytes (xorshift from `seed`).
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Runs `dedupfs ARGS --store STORE`.
pub fn run(store: &Path, args: &[&str]) -> Output {
    let mut all: Vec<std::ffi::OsString> = args.iter().map(|a| a.into()).collect();
    all.push("--store".into());
    all.push(store.into());
    dedupfs(all)
}

/// Asserts a one-line error naming `needle`, and a non-zero exit.
pub fn refused(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure for {needle:?}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A store in a temp dir, mounted, with one container named "c".
pub struct Mounted {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub mnt: PathBuf,
    mounted: bool,
}

impl Mounted {
    pub fn new() -> Mounted {
        Self::with_options(&[])
    }

    /// Mounts with extra `-o` options (e.g. "allow_other").
    pub fn with_options(options: &[&str]) -> Mounted {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: FUSE mount tests cannot run (this is a failure, not a skip)"
        );
        let dir = tempfile::Builder::new()
            .prefix("dedupfs-test")
            .tempdir()
            .expect("tempdir");
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        ok(dedupfs([
            "init".as_ref(),
            store.as_os_str(),
            "--compression".as_ref(),
            "zstd:1".as_ref(),
        ]));
        let mut m = Mounted {
            dir,
            store,
            mnt,
            mounted: false,
        };
        m.mount_with(options);
        ok(dedupfs([
            "container".as_ref(),
            "create".as_ref(),
            "c".as_ref(),
            "--store".as_ref(),
            m.store.as_os_str(),
        ]));
        m
    }

    /// The container "c" in the mount.
    pub fn c(&self) -> PathBuf {
        self.mnt.join("c")
    }

    pub fn mount(&mut self) {
        self.mount_with(&[]);
    }

    pub fn mount_with(&mut self, options: &[&str]) {
        let args: Vec<String> = options
            .iter()
            .flat_map(|o| ["-o".to_string(), o.to_string()])
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.mount_with_args(&args);
    }

    /// Mounts with extra arguments of `dedupfs mount` (e.g. "--memory", "64M").
    pub fn mount_with_args(&mut self, extra: &[&str]) {
        let mut args: Vec<std::ffi::OsString> = vec![
            "mount".into(),
            self.store.clone().into(),
            self.mnt.clone().into(),
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        ok(dedupfs(&args));
        self.mounted = true;
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            ok(dedupfs(["umount".as_ref(), self.mnt.as_os_str()]));
            self.mounted = false;
        }
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    /// Runs fsck on the unmounted store and returns its output; panics unless clean.
    pub fn fsck_clean(&mut self) -> String {
        self.unmount();
        let out = dedupfs(["fsck".as_ref(), self.store.as_os_str()]);
        ok(out)
    }

    /// Ends the test: unmount, fsck must be clean.
    pub fn finish(mut self) {
        self.fsck_clean();
    }

    /// Pid of the mount daemon (from the store's lock file).
    pub fn daemon_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.store.join("lock")).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// Marks the mount as gone after the daemon was killed; clears the dead mount.
    pub fn forget_killed_mount(&mut self) {
        // The kernel may have dropped the dead mount already: then fusermount3 complains.
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mnt)
            .stderr(std::process::Stdio::null())
            .status();
        // Wait for the kernel to drop the connection and the lock to be free.
        for _ in 0..100 {
            if !is_mounted(&self.mnt) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let out = dedupfs(["umount".as_ref(), self.mnt.as_os_str()]);
            if !out.status.success() {
                let _ = Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&self.mnt)
                    .status();
            }
        }
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(canon.to_str().unwrap_or("")))
}
