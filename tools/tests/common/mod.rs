//! Helpers shared by the binary-level tests: running `geosync`, mounts,
//! loop devices and inner filesystems that always come down, with bounded
//! waits so a stuck unmount fails a test instead of hanging CI.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_geosync");

pub fn gs(store: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[track_caller]
pub fn ok(store: &Path, args: &[&str]) -> String {
    let o = gs(store, args);
    assert!(
        o.status.success(),
        "geosync {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs a command that must succeed; its stdout.
#[track_caller]
pub fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Unmounts `at`, retrying while it is busy (a process of a parallel test
/// may hold a reference for a moment), then detaches it lazily so nothing
/// above it can hang. True if the plain unmount worked.
pub fn umount(at: &Path) -> bool {
    for _ in 0..100 {
        let o = Command::new("umount").arg(at).output();
        match o {
            Ok(o) if o.status.success() => return true,
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("busy") => {
                std::thread::sleep(Duration::from_millis(100))
            }
            _ => break,
        }
    }
    let _ = Command::new("umount").arg("-l").arg(at).status();
    false
}

/// Waits for a child to exit, at most `limit`.
pub fn wait_for(c: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return Some(st);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `geosync mount` (foreground child process).
pub struct Mount {
    pub store: PathBuf,
    pub mnt: PathBuf,
    child: Option<Child>,
}

impl Mount {
    pub fn new(store: &Path, mnt: &Path, extra: &[&str]) -> Mount {
        fs::create_dir_all(mnt).unwrap();
        let child = Command::new(BIN)
            .arg("--store")
            .arg(store)
            .arg("mount")
            .arg(mnt)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let m = Mount {
            store: store.into(),
            mnt: mnt.into(),
            child: Some(child),
        };
        let start = Instant::now();
        while !geosync_tools::mount::is_mounted(mnt) {
            assert!(start.elapsed() < Duration::from_secs(10), "mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// Clean unmount: SIGTERM, wait for the daemon to commit and exit. A
    /// daemon that stays busy (it refuses to unmount under a loop device)
    /// is signalled again for a minute, then killed and the test fails.
    pub fn stop(self) {
        self.stop_with("TERM");
    }

    /// [`Mount::stop`] with another signal (`"HUP"`, `"INT"`).
    pub fn stop_with(mut self, signal: &str) {
        let mut c = self.child.take().unwrap();
        let start = Instant::now();
        let st = loop {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(c.id().to_string())
                .status();
            if let Some(st) = wait_for(&mut c, Duration::from_secs(5)) {
                break st;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                let _ = c.wait();
                umount(&self.mnt);
                panic!("mount daemon on {} did not exit within 60 s", self.mnt.display());
            }
        };
        assert!(st.success(), "mount exited with {st}");
        assert!(!geosync_tools::mount::is_mounted(&self.mnt));
    }

    /// `kill -9` the daemon and clean up the dead mount.
    pub fn kill9(mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            if wait_for(&mut c, Duration::from_secs(20)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if geosync_tools::mount::is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Loop device over a file, detached on drop.
pub struct Loop(pub String);
impl Loop {
    pub fn new(file: &Path) -> Loop {
        let dev = sh(Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file));
        Loop(dev.trim().to_string())
    }
}
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A mounted filesystem, unmounted on drop (retrying while busy).
pub struct FsMount(pub PathBuf);
impl FsMount {
    pub fn new(dev: &str, at: &Path, opts: &str) -> FsMount {
        fs::create_dir_all(at).unwrap();
        sh(Command::new("mount").args(["-o", opts]).arg(dev).arg(at));
        FsMount(at.into())
    }
}
impl Drop for FsMount {
    fn drop(&mut self) {
        if !umount(&self.0) {
            eprintln!("{} stayed busy; detached lazily", self.0.display());
        }
    }
}

pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}
