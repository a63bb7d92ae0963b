//! The kernel's view of an NBD export, for the tests that put a real filesystem on one: a block
//! device (`nbd-client` and `/dev/nbdN`, or qemu-storage-daemon's FUSE export and a loop device)
//! that is always detached again, and checksums of the files mounted from it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{run, run_ok, Nbdkit};

/// Longest any qemu-storage-daemon of this test may live before it is stopped regardless.
const DAEMON_LIFETIME: Duration = Duration::from_secs(600);

/// Whether the tools and privileges these tests need are here (when not: a printed reason
/// outside CI, a panic in CI).
pub fn ready() -> bool {
    let mut tools = vec![
        "nbdkit",
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
        "blockdev",
        "fstrim",
        "fsfreeze",
        "sha256sum",
        "e2fsck",
        "resize2fs",
    ];
    tools.extend(if nbd_device_available() { &["nbd-client"][..] } else { &["qemu-storage-daemon", "losetup"] });
    tools.into_iter().all(super::have) && can_mount()
}

/// Whether this machine lets us attach block devices and mount them; panics in CI when not.
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let why = if !root {
        "the test needs root (losetup, mount)"
    } else if !nbd_device_available() && !Path::new("/dev/fuse").exists() {
        "neither /dev/nbd0 nor /dev/fuse exists"
    } else if !nbd_device_available() && !Path::new("/dev/loop-control").exists() {
        "/dev/loop-control does not exist"
    } else {
        return true;
    };
    assert!(!super::in_ci(), "{why}, and CI must run every test");
    eprintln!("SKIPPED: {why}");
    false
}

/// Whether the kernel NBD client is there (`modprobe nbd` creates /dev/nbd0..15).
pub fn nbd_device_available() -> bool {
    Path::new("/dev/nbd0").exists()
}

/// How the block device reaches the NBD export.
enum Transport {
    /// `nbd-client` connected `/dev/nbdN` (disconnect with `nbd-client -d`).
    Kernel,
    /// qemu-storage-daemon exports the NBD export as a FUSE file; a loop device sits on it.
    Fuse {
        daemon: Child,
        /// The FUSE mountpoint: a regular file the size of the device.
        file: PathBuf,
        /// Stops the watchdog (by being dropped) once the daemon is stopped by us.
        watchdog: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    },
}

/// Whether a device may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// Read-only at every layer (NBD connection, FUSE file, loop device), as a snapshot must be.
    ReadOnly,
}

/// The NBD export as a kernel block device, optionally mounted. Dropping it (even while a failed
/// assertion unwinds) unmounts, detaches the device and stops qemu-storage-daemon, so no mount,
/// loop device or daemon outlives the test.
pub struct Device {
    transport: Transport,
    /// `/dev/loopN` or `/dev/nbdN`, while attached.
    dev: Option<String>,
    /// Where the filesystem is mounted, while it is.
    mounted: Option<PathBuf>,
    /// Whether the mounted filesystem is frozen (`fsfreeze`): it must be thawed to unmount.
    frozen: bool,
    /// Holds the FUSE file, the daemon's log and the mountpoint.
    dir: PathBuf,
}

impl Device {
    /// Attaches the default export of `nbdkit` as a writable block device, using files under
    /// `dir`.
    pub fn attach(nbdkit: &Nbdkit, dir: &Path) -> Device {
        Self::attach_export(nbdkit, "", Access::ReadWrite, dir)
    }

    /// Attaches export `export` of `nbdkit` (`""`: the default one) as a block device, using
    /// files under `dir`.
    pub fn attach_export(nbdkit: &Nbdkit, export: &str, access: Access, dir: &Path) -> Device {
        std::fs::create_dir_all(dir).unwrap();
        let read_only = access == Access::ReadOnly;
        if nbd_device_available() {
            let dev = free_nbd_device();
            let mut cmd = Command::new("nbd-client");
            cmd.arg("-u").arg(&nbdkit.socket).arg(&dev).args(["-b", "4096", "-t", "60"]);
            if !export.is_empty() {
                cmd.args(["-N", export]);
            }
            if read_only {
                cmd.arg("-readonly");
            }
            run_ok(&mut cmd);
            return Device {
                transport: Transport::Kernel,
                dev: Some(dev),
                mounted: None,
                frozen: false,
                dir: dir.into(),
            };
        }
        let file = dir.join("disk");
        std::fs::File::create(&file).unwrap();
        let log = dir.join("qemu-storage-daemon.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=nbd,node-name=nbd0,server.type=unix,server.path={},export={export},read-only={}",
                nbdkit.socket.display(),
                if read_only { "on" } else { "off" }
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=exp0,node-name=nbd0,mountpoint={},writable={}",
                file.display(),
                if read_only { "off" } else { "on" }
            ))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        // The daemon gets SIGTERM (and unmounts its FUSE file) if the test thread dies.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut daemon = cmd.spawn().expect("spawn qemu-storage-daemon");
        let watchdog = watchdog(daemon.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mountpoint(&file) {
            if let Ok(Some(status)) = daemon.try_wait() {
                panic!(
                    "qemu-storage-daemon exited with {status}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = daemon.kill();
                let _ = daemon.wait();
                panic!("qemu-storage-daemon did not export {} within 30 s", file.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut device = Device {
            transport: Transport::Fuse { daemon, file: file.clone(), watchdog: Some(watchdog) },
            dev: None,
            mounted: None,
            frozen: false,
            dir: dir.into(),
        };
        // Buffered, not --direct-io=on: through qemu-storage-daemon 10.0's FUSE export, a direct-I/O
        // loop device corrupts a fresh mkfs.ext4 even on nbdkit's own memory plugin.
        let mut losetup = Command::new("losetup");
        losetup.args(["--find", "--show", "--direct-io=off"]);
        if read_only {
            losetup.arg("--read-only");
        }
        let out = run_ok(losetup.arg(&file));
        device.dev = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
        device
    }

    pub fn dev(&self) -> &str {
        self.dev.as_deref().expect("attached")
    }

    /// The device size the kernel sees, in bytes.
    pub fn size(&self) -> u64 {
        let out = run_ok(Command::new("blockdev").arg("--getsize64").arg(self.dev()));
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("blockdev --getsize64")
    }

    /// Mounts the filesystem on `{dir}/mnt` and returns that path.
    pub fn mount(&mut self) -> PathBuf {
        self.mount_with("defaults")
    }

    /// Mounts the filesystem on `{dir}/mnt` with mount `options` (`-o`) and returns that path.
    pub fn mount_with(&mut self, options: &str) -> PathBuf {
        let mnt = self.dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        run_ok(Command::new("mount").args(["-t", "ext4", "-o", options]).arg(self.dev()).arg(&mnt));
        self.mounted = Some(mnt.clone());
        mnt
    }

    /// Freezes the mounted filesystem (`fsfreeze -f`): its writes are on the device, flushed,
    /// and it is consistent there, journal included, until [`thaw`](Self::thaw).
    pub fn freeze(&mut self) {
        run_ok(Command::new("fsfreeze").arg("-f").arg(self.mounted.as_ref().expect("mounted")));
        self.frozen = true;
    }

    /// Lets the frozen filesystem be written again.
    pub fn thaw(&mut self) {
        run_ok(Command::new("fsfreeze").arg("-u").arg(self.mounted.as_ref().expect("mounted")));
        self.frozen = false;
    }

    /// Unmounts the filesystem (which flushes it to the device, and the device to nbdkit).
    pub fn umount(&mut self) {
        let mnt = self.mounted.take().expect("mounted");
        run_ok(Command::new("umount").arg(&mnt));
    }

    /// Detaches the device and stops qemu-storage-daemon cleanly, asserting each step worked.
    pub fn detach(mut self) {
        assert!(self.mounted.is_none(), "detach while mounted");
        let dev = self.dev.take().expect("attached");
        match &mut self.transport {
            Transport::Kernel => {
                run_ok(Command::new("nbd-client").arg("-d").arg(&dev));
            }
            Transport::Fuse { daemon, file, watchdog } => {
                run_ok(Command::new("losetup").arg("-d").arg(&dev));
                wait_until_detached(&dev);
                stop_watchdog(watchdog);
                let status = terminate(daemon, Duration::from_secs(30));
                assert!(status.is_some_and(|s| s.success()), "qemu-storage-daemon exited with {status:?}");
                assert!(!is_mountpoint(file), "{} is still mounted", file.display());
            }
        }
    }

    /// Tears the device down after its nbdkit died, when every I/O fails: lazy unmount (the
    /// kernel lets go of the filesystem once nothing uses it), detach, stop qemu-storage-daemon,
    /// every wait bounded; then asserts that no mount, loop device or daemon is left.
    pub fn abandon(mut self) {
        let dev = self.dev.clone().expect("attached");
        let mnt = self.mounted.clone();
        self.release(true);
        if let Some(mnt) = mnt {
            assert!(!is_mountpoint(&mnt), "{} is still mounted", mnt.display());
        }
        if let Transport::Fuse { daemon, file, .. } = &mut self.transport {
            assert!(matches!(daemon.try_wait(), Ok(Some(_))), "qemu-storage-daemon is still running");
            assert!(!is_mountpoint(file), "{} is still mounted", file.display());
            wait_until_detached(&dev);
            assert!(!loop_attached(&dev), "{dev} is still attached");
        }
    }

    /// Unmounts (lazily if `lazy`, else lazily only when a plain umount fails), detaches and
    /// stops qemu-storage-daemon, as far as each is still to be done; never panics, every wait
    /// bounded.
    fn release(&mut self, lazy: bool) {
        if std::mem::take(&mut self.frozen) {
            if let Some(mnt) = &self.mounted {
                let _ = run(Command::new("fsfreeze").arg("-u").arg(mnt));
            }
        }
        if let Some(mnt) = self.mounted.take() {
            if lazy || !run(Command::new("umount").arg(&mnt)).status.success() {
                let _ = run(Command::new("umount").arg("-l").arg(&mnt));
            }
        }
        let dev = self.dev.take();
        match &mut self.transport {
            Transport::Kernel => {
                if let Some(dev) = dev {
                    let _ = run(Command::new("nbd-client").arg("-d").arg(&dev));
                }
            }
            Transport::Fuse { daemon, file, watchdog } => {
                if let Some(dev) = dev {
                    let _ = run(Command::new("losetup").arg("-d").arg(&dev));
                    wait_until_detached(&dev);
                }
                stop_watchdog(watchdog);
                if let Ok(None) = daemon.try_wait() {
                    if terminate(daemon, Duration::from_secs(10)).is_none() {
                        let _ = daemon.kill();
                        let _ = daemon.wait();
                    }
                }
                if is_mountpoint(file) {
                    let _ = run(Command::new("umount").arg("-l").arg(&*file));
                }
            }
        }
    }
}

impl Drop for Device {
    /// Best-effort clean-up after a failure; `detach` or `abandon` has done it all otherwise.
    fn drop(&mut self) {
        self.release(false);
    }
}

/// A thread that sends SIGKILL to `pid` after `DAEMON_LIFETIME` unless told to stop first.
fn watchdog(pid: u32) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(DAEMON_LIFETIME) {
            eprintln!("qemu-storage-daemon {pid} outlived {DAEMON_LIFETIME:?}: killing it");
            // SAFETY: the owner has not reaped the process yet (it stops us first).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    (tx, handle)
}

/// Stops the watchdog before its process is reaped, so it never signals a reused PID.
fn stop_watchdog(watchdog: &mut Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>) {
    if let Some((tx, handle)) = watchdog.take() {
        drop(tx);
        let _ = handle.join();
    }
}

/// Sends qemu-storage-daemon SIGTERM, again every half second, until it exits or `limit` passes.
///
/// Why again: qemu-storage-daemon 10.0's handler only sets a flag its main loop checks before
/// it sleeps in `ppoll`, and wakes nothing; a signal that lands between the check and the sleep
/// leaves it asleep until its next event (seen in CI: idle 30 s after one SIGTERM). The next
/// signal interrupts the sleep.
fn terminate(daemon: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    let mut next_signal = Instant::now();
    loop {
        if let Ok(Some(status)) = daemon.try_wait() {
            return Some(status);
        }
        let now = Instant::now();
        if now > deadline {
            return None;
        }
        if now >= next_signal {
            // SAFETY: signalling the daemon we started and have not reaped yet.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            next_signal = now + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `path` is a mountpoint (the FUSE file, while qemu-storage-daemon exports it).
fn is_mountpoint(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*path))
}

/// Whether loop device `dev` still has a backing file.
fn loop_attached(dev: &str) -> bool {
    Path::new(&format!("/sys/block/{}/loop/backing_file", dev.trim_start_matches("/dev/"))).exists()
}

/// `losetup -d` detaches lazily while something (udev, blkid, a lazily unmounted filesystem)
/// still has the device open: waits up to 10 s for that.
fn wait_until_detached(dev: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while loop_attached(dev) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first `/dev/nbdN` no client is connected to.
fn free_nbd_device() -> String {
    (0..16)
        .find(|n| Path::new(&format!("/dev/nbd{n}")).exists() && !Path::new(&format!("/sys/block/nbd{n}/pid")).exists())
        .map(|n| format!("/dev/nbd{n}"))
        .expect("a free /dev/nbdN")
}

/// `sha256sum` of every regular file under `root`, sorted by path (relative to `root`).
pub fn checksums(root: &Path) -> String {
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("find . -type f -print0 | xargs -0 -n 16 -P 32 sha256sum | LC_ALL=C sort -k 2")
            .current_dir(root),
    );
    String::from_utf8(out.stdout).unwrap()
}
