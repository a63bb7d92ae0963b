//! `Lease`: at most one writer per export, across processes and hosts.
//!
//! Two nbdkit processes writing one export would each cache and write back blocks the other
//! cannot see, and the device would silently become a mix of both. So the first writable open of
//! an export takes its lease, a small object `leases/{export}` naming the holder and when the
//! lease expires, and renews it while it runs; another writer is refused with the holder's name.
//! Taking and renewing are compare-and-swaps (S3 `If-None-Match: *` to create, `If-Match: ETag`
//! to renew or take over), so two writers can never both believe they hold the lease. Read-only
//! opens (`nbdkit -r`) never take it.
//!
//! | phase    | how it gets there                                       | writes to storage        |
//! |----------|---------------------------------------------------------|--------------------------|
//! | Free     | created; only read-only or refused connections so far   | refused                  |
//! | Held     | taken; renewed every `window / 3`                        | allowed until `valid_until` |
//! | Lost     | a renewal found another writer's lease                  | refused (EIO)            |
//! | Released | nbdkit is shutting down, after the last write-back      | refused                  |
//!
//! `valid_until` is when the last successful renewal *started* plus `window`, which is
//! `lease-time` minus `s3-timeout`: the holder stops writing early enough that a PUT it started
//! in time has landed, or failed, before anyone else may take the lease over. "Started in time"
//! is made exact by [`Lease::deadline`]: a write allowed at `t <= valid_until` carries the
//! deadline `t + s3-timeout <= valid_until + s3-timeout` (the renewal's start plus `lease-time`,
//! when others may take over), and the store sends none of its bytes, on any attempt, after that
//! deadline (see [`FencedStorage`](crate::storage::FencedStorage)). A holder that
//! cannot renew (S3 unreachable) therefore fails writes with EIO once its window is over, and
//! resumes when a renewal succeeds (which proves nobody took over in between). The window runs
//! on the monotonic clock, which runs on while a process is frozen (SIGSTOP, a paused VM): a
//! holder frozen past its window wakes with its writes already refused, before its renewal
//! thread has even run and found its successor (`tests/failover.rs`).
//!
//! Another writer may take the lease over when it has expired (by the wall clock: hosts' clocks
//! must agree to within a few seconds), when its holder released it, when its holder was a
//! process of this very host and boot that no longer exists (a `kill -9` and restart needs no
//! waiting), or when the user says so with `lease-takeover=true`.
//!
//! A host is what the lease names it: `host-id=` (or `$NBDS3_HOST_ID`), else the hostname. Only a
//! holder with the same host id is looked up by pid, so the id must name one machine, or one
//! container with its own pid namespace: where hostnames repeat (containers on the host's
//! network, pods of a StatefulSet), each nbdkit needs a host id of its own, or it could take a
//! live writer's lease for a dead process that merely has the same pid.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::export_name::ExportName;
use crate::storage::{Backend, Expect, WriteWindow};
use crate::{background, lock, unix_nanos, Error, Result};

/// How leases are taken and kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal, in the eyes of other writers.
    pub time: Duration,
    /// Take the lease even from a live holder.
    pub takeover: bool,
    /// The bound on one storage request: the holder stops writing this long before its lease
    /// could expire.
    pub request_timeout: Duration,
}

impl LeaseConfig {
    /// How long after a renewal starts writes stay allowed.
    fn window(&self) -> Duration {
        self.time.saturating_sub(self.request_timeout)
    }
}

/// Says, once per process, that the S3 server behind `store` ignores conditional writes and what
/// that means for the lease.
pub fn warn_without_conditional_writes(store: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "{store}: the S3 server ignores conditional writes (If-None-Match, If-Match), so the export lease \
             cannot stop two writers that start at the same moment; it still refuses a writer that starts \
             while another holds the export. See \"One writer per export\" in docs/DURABILITY.md."
        );
    }
}

/// Now, in whole Unix seconds, the unit of a lease's expiry.
pub(crate) fn unix_seconds() -> u64 {
    (unix_nanos() / 1_000_000_000) as u64
}

/// The host named in the leases this process takes, when not its hostname.
static HOST_ID: OnceLock<String> = OnceLock::new();

/// Names this process's host `id` in the leases it takes from now on (`host-id=`, or
/// `$NBDS3_HOST_ID`), instead of its hostname; the first call wins.
pub fn set_host_id(id: &str) {
    if HOST_ID.set(id.to_string()).is_err() {
        log::debug!("host id already set; ignoring {id}");
    }
}

/// This process, as a lease names it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holder {
    host: String,
    /// The kernel's boot id: a pid means something only within one boot of one host.
    boot: String,
    pid: u32,
}

impl Holder {
    fn this_process() -> Holder {
        let host = HOST_ID.get().cloned().unwrap_or_else(hostname);
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string();
        Holder { host, boot, pid: std::process::id() }
    }

    /// Whether this holder is a process of this host's current boot that has exited. A holder
    /// with another host id is never looked up by pid, even when it runs on this very machine:
    /// its pid may mean another process (another container's pid namespace).
    fn is_gone(&self, me: &Holder) -> bool {
        if self.host != me.host || self.boot.is_empty() {
            return false;
        }
        if self.boot != me.boot {
            return true;
        }
        let Ok(pid) = libc::pid_t::try_from(self.pid) else { return false };
        // SAFETY: signal 0 only asks whether the process exists.
        pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }
}

fn hostname() -> String {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `name.len()` bytes into the buffer we own.
    if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0 {
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        String::from_utf8_lossy(name.get(..end).unwrap_or_default()).into_owned()
    } else {
        "unknown-host".into()
    }
}

/// What a lease object says: `key=value` lines, readable by a person with `aws s3 cp`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LeaseRecord {
    holder: Holder,
    /// Unique to one taking of the lease, so a renewal can tell its own lease from a successor's.
    token: String,
    /// Unix seconds after which others may take the lease; 0 once released.
    expires: u64,
}

impl LeaseRecord {
    fn to_text(&self) -> String {
        let Holder { host, boot, pid } = &self.holder;
        format!(
            "holder=nbds3 {} pid {pid} on {host}\nhost={host}\nboot={boot}\npid={pid}\ntoken={}\nexpires={}\n",
            env!("CARGO_PKG_VERSION"),
            self.token,
            self.expires
        )
    }

    /// The longest field read (host names are at most 255 bytes).
    const MAX_FIELD: usize = 255;

    /// 9999-12-31T23:59:59Z in Unix seconds: the latest expiry a record may hold.
    const MAX_EXPIRES: u64 = 253_402_300_799;

    /// The record in `text`, or `None` if it is not one this version wrote: a field missing, a
    /// number that is not one, a name too long or with control characters for a message to show,
    /// or an expiry past the year 9999 (no lease runs that long; waiting for it would overflow).
    fn parse(text: &str) -> Option<LeaseRecord> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
                .filter(|v| v.len() <= Self::MAX_FIELD && !v.contains(char::is_control))
                .map(str::to_string)
        };
        Some(LeaseRecord {
            holder: Holder { host: field("host")?, boot: field("boot")?, pid: field("pid")?.parse().ok()? },
            token: field("token")?,
            expires: field("expires")?.parse().ok().filter(|&e| e <= Self::MAX_EXPIRES)?,
        })
    }

    /// `pid 123 on host-a`, for messages.
    fn describe(&self) -> String {
        format!("pid {} on {}", self.holder.pid, self.holder.host)
    }
}

/// Who holds an export's lease, as its lease object says: what `nbds3ctl list` and `info` show,
/// so that an operator of many hosts sees where each export is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseHolder {
    /// Process `pid` on `host` (an nbdkit, or `nbds3ctl delete`), whose lease lasts until
    /// `expires` (Unix seconds) unless renewed; 0 once it released the lease.
    Writer {
        /// The holder's host id (`host-id=`, else its hostname).
        host: String,
        /// The holder's process id on that host.
        pid: u32,
        /// Unix seconds; 0 when released.
        expires: u64,
    },
    /// A lease object this version cannot read.
    Unreadable,
}

impl LeaseHolder {
    /// The holder of `export`'s lease, or `None` if no writer ever took it.
    ///
    /// # Errors
    /// Backend failures.
    pub fn read(backend: &dyn Backend, export: &ExportName) -> Result<Option<LeaseHolder>> {
        Ok(backend.read_lease(export)?.map(|v| match LeaseRecord::parse(&v.text) {
            Some(r) => LeaseHolder::Writer { host: r.holder.host, pid: r.holder.pid, expires: r.expires },
            None => LeaseHolder::Unreadable,
        }))
    }

    /// One line for a person, as of `now` (Unix seconds): `pid 12 on host-a until 2026-12-02
    /// 01:02:03 UTC`, `released by pid 12 on host-a`, `expired at ... (pid 12 on host-a)`.
    pub fn describe(&self, now: u64) -> String {
        match self {
            LeaseHolder::Writer { host, pid, expires: 0 } => format!("released by pid {pid} on {host}"),
            LeaseHolder::Writer { host, pid, expires } if *expires < now => {
                format!("expired at {} (pid {pid} on {host})", utc(*expires))
            }
            LeaseHolder::Writer { host, pid, expires } => format!("pid {pid} on {host} until {}", utc(*expires)),
            LeaseHolder::Unreadable => "unreadable (written by another version of nbds3?)".into(),
        }
    }
}

/// Unix seconds as `2026-12-02 01:02:03 UTC`.
fn utc(seconds: u64) -> String {
    let Ok(t) = libc::time_t::try_from(seconds) else { return format!("{seconds} s after 1970") };
    // SAFETY: gmtime_r fills the `tm` we own from the `time_t` we own, and returns NULL on failure.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::gmtime_r(&t, &mut tm) }.is_null() {
        return format!("{seconds} s after 1970");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[derive(Debug)]
enum Phase {
    Free,
    Held { version: String, token: String },
    Lost(String),
    Released,
}

/// The phase, and whether a request about the lease is in flight.
#[derive(Debug)]
struct State {
    phase: Phase,
    /// Set while a take, a renewal or the release talks to the backend, with the lock let go (a
    /// request may take `s3-timeout`, a takeover waits out the old lease): the others wait for
    /// it on [`Lease::changed`] rather than send a request of their own from a version that is
    /// about to change, so the release never loses to a renewal of the version it replaces, two
    /// opens never both take the lease, and [`Lease::deadline`] never waits at all.
    busy: bool,
}

/// A request about the lease in flight (see [`State::busy`]); over when dropped, even by a panic.
struct InFlight<'a>(&'a Lease);

impl InFlight<'_> {
    /// Ends the request, applying its outcome to the phase.
    fn finish(self, outcome: impl FnOnce(&mut Phase)) {
        outcome(&mut lock(&self.0.state).phase);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).busy = false;
        self.0.changed.notify_all();
    }
}

/// The lease of one export, shared by its volume's storage and its writable connections.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<dyn Backend>,
    export: ExportName,
    config: LeaseConfig,
    me: Holder,
    /// Never held across a backend request or a sleep.
    state: Mutex<State>,
    /// Signalled when a request about the lease ends, and at release (which wakes the renewal
    /// thread early).
    changed: Condvar,
    /// Writes are allowed while `epoch.elapsed()` is below this many nanoseconds; 0 when not
    /// held. Read without the lock on every write.
    valid_until: AtomicU64,
    epoch: Instant,
}

impl Lease {
    /// The lease of `export` in `backend`, not yet taken.
    pub fn new(backend: Arc<dyn Backend>, export: ExportName, config: LeaseConfig) -> Arc<Lease> {
        Arc::new(Lease {
            backend,
            export,
            config,
            me: Holder::this_process(),
            state: Mutex::new(State { phase: Phase::Free, busy: false }),
            changed: Condvar::new(),
            valid_until: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Takes the lease unless this process already holds it, and keeps renewing it.
    ///
    /// # Errors
    /// [`Error::Lease`] naming the holder when another writer holds it, or when this process
    /// lost it; backend failures while reading or writing the lease.
    pub fn hold(self: &Arc<Self>) -> Result<()> {
        // Only another open taking the lease is waited for: a renewal in flight means it is held.
        let state = lock(&self.state);
        let state = self
            .changed
            .wait_while(state, |s| s.busy && matches!(s.phase, Phase::Free))
            .unwrap_or_else(PoisonError::into_inner);
        match &state.phase {
            Phase::Held { .. } => Ok(()),
            Phase::Lost(why) => Err(self.error(why.clone())),
            Phase::Released => Err(self.error("the lease was released at shutdown")),
            Phase::Free => {
                let request = self.start_request(state);
                let (version, token) = self.take()?;
                request.finish(|phase| *phase = Phase::Held { version, token });
                self.spawn_renewer();
                Ok(())
            }
        }
    }

    /// Marks a request about the lease in flight and lets `state`'s lock go; the request is over
    /// when the returned guard is finished or dropped.
    fn start_request(&self, mut state: MutexGuard<'_, State>) -> InFlight<'_> {
        state.busy = true;
        InFlight(self)
    }

    /// The state, locked, once no request about the lease is in flight.
    fn idle_state(&self) -> MutexGuard<'_, State> {
        let state = lock(&self.state);
        self.changed.wait_while(state, |s| s.busy).unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether writes are allowed now: the lease is held and renewed within its window.
    ///
    /// # Errors
    /// [`Error::Lease`] saying why not.
    pub fn check(&self) -> Result<()> {
        self.deadline().map(drop)
    }

    /// When a write allowed now must be sent by: `s3-timeout` from now, which is no later than
    /// when another writer may take the lease over. A request (or a retry) sent after it could
    /// land over a successor's blocks, so the store refuses to send it then.
    ///
    /// # Errors
    /// As [`check`](Self::check).
    pub fn deadline(&self) -> Result<Instant> {
        let now = Instant::now();
        let elapsed = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        if elapsed < self.valid_until.load(Ordering::Acquire) {
            return Ok(now + self.config.request_timeout);
        }
        Err(self.error(match &lock(&self.state).phase {
            Phase::Free => "this process does not hold the lease (no writable connection has taken it)".to_string(),
            Phase::Held { .. } => format!(
                "the lease could not be renewed within {} s (is S3 reachable?); writes fail until it is",
                self.config.window().as_secs()
            ),
            Phase::Lost(why) => why.clone(),
            Phase::Released => "the lease was released at shutdown".to_string(),
        }))
    }

    /// Gives the lease up so that another writer can take it at once (at unload, after the last
    /// write-back).
    pub fn release(&self) {
        // A renewal in flight ends first, so the release replaces the version it wrote.
        let mut state = self.idle_state();
        let Phase::Held { version, token } = std::mem::replace(&mut state.phase, Phase::Released) else { return };
        self.valid_until.store(0, Ordering::Release);
        let _request = self.start_request(state);
        self.changed.notify_all();
        let record = LeaseRecord { holder: self.me.clone(), token, expires: 0 };
        match self.backend.replace_lease(&self.export, Expect::Version(&version), &record.to_text()) {
            Ok(Some(_)) => log::info!("export {}: lease released", self.export),
            Ok(None) => log::warn!("export {}: the lease had been taken over by another writer", self.export),
            Err(e) => log::warn!("export {}: could not release the lease, it expires by itself: {e}", self.export),
        }
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Lease { export: self.export.to_string(), message: message.into() }
    }

    /// Allows writes until `window` after `started`.
    fn extend_from(&self, started: Instant) {
        let until = started.saturating_duration_since(self.epoch) + self.config.window();
        self.valid_until.store(u64::try_from(until.as_nanos()).unwrap_or(u64::MAX), Ordering::Release);
    }

    fn new_record(&self, token: &str) -> LeaseRecord {
        LeaseRecord {
            holder: self.me.clone(),
            token: token.to_string(),
            expires: unix_seconds() + self.config.time.as_secs(),
        }
    }

    /// Why the lease `current` may be taken over, and until when (Unix seconds) its holder may
    /// still be writing; `None` if it may not be taken.
    fn may_take(&self, current: Option<&LeaseRecord>) -> Option<(String, u64)> {
        let now = unix_seconds();
        match current {
            Some(r) if r.expires == 0 => Some((format!("{} released it", r.describe()), 0)),
            Some(r) if r.expires < now => {
                Some((format!("the lease of {} expired {} s ago", r.describe(), now - r.expires), 0))
            }
            Some(r) if r.holder.is_gone(&self.me) => Some((format!("{} no longer runs", r.describe()), 0)),
            // A live holder stops writing when it fails to renew, which is at the latest when
            // its lease expires: until then the new holder must not write.
            Some(r) if self.config.takeover => Some((format!("lease-takeover=true, from {}", r.describe()), r.expires)),
            None if self.config.takeover => Some(("lease-takeover=true".into(), now + self.config.time.as_secs())),
            _ => None,
        }
    }

    /// Takes the lease: creates it if there is none, or replaces one that may be taken over.
    fn take(&self) -> Result<(String, String)> {
        if !self.backend.atomic_leases()? {
            warn_without_conditional_writes(&self.backend.to_string());
        }
        let token = format!("{:x}-{:x}", self.me.pid, unix_nanos());
        // A lost race means another writer changed the lease between our read and our write:
        // read it again, and refuse if that writer now holds it.
        for _ in 0..3 {
            let current = self.backend.read_lease(&self.export)?;
            let started = Instant::now();
            let text = self.new_record(&token).to_text();
            let (written, previous_until) = match &current {
                None => (self.backend.replace_lease(&self.export, Expect::Absent, &text)?, 0),
                Some(v) => {
                    let record = LeaseRecord::parse(&v.text);
                    let Some((why, until)) = self.may_take(record.as_ref()) else {
                        return Err(self.refusal(record.as_ref()));
                    };
                    // Taking a released lease is the normal restart; anything else is worth a warning.
                    if record.as_ref().is_some_and(|r| r.expires == 0) {
                        log::info!("export {}: taking the lease: {why}", self.export);
                    } else {
                        log::warn!("export {}: taking over the lease: {why}", self.export);
                    }
                    (self.backend.replace_lease(&self.export, Expect::Version(&v.version), &text)?, until)
                }
            };
            let Some(mut version) = written else { continue };
            if previous_until == 0 {
                self.extend_from(started);
            } else {
                version = self.outwait(previous_until, &version, &token)?;
            }
            log::info!("export {}: lease taken (renewed every {} s)", self.export, self.renew_interval().as_secs());
            return Ok((version, token));
        }
        Err(self.error("another writer kept changing the lease; try again"))
    }

    /// Waits until `until` (Unix seconds, plus a second for clock skew), when the previous holder
    /// has stopped writing, then renews the lease it took at `version`; returns the new version.
    fn outwait(&self, until: u64, version: &str, token: &str) -> Result<String> {
        let wait = Duration::from_secs((until + 1).saturating_sub(unix_seconds()));
        log::warn!("export {}: waiting {} s for the previous writer's lease to run out", self.export, wait.as_secs());
        std::thread::sleep(wait);
        let started = Instant::now();
        let renewed =
            self.backend.replace_lease(&self.export, Expect::Version(version), &self.new_record(token).to_text())?;
        let version =
            renewed.ok_or_else(|| self.error("another writer took the lease while this one waited for it"))?;
        self.extend_from(started);
        Ok(version)
    }

    fn refusal(&self, holder: Option<&LeaseRecord>) -> Error {
        let who = match holder {
            Some(r) => {
                let left = r.expires.saturating_sub(unix_seconds());
                format!("is held by another writer, nbds3 {}, for {left} s more unless renewed", r.describe())
            }
            None => format!("has a lease object ({}) this version cannot read", self.export.lease_key()),
        };
        self.error(format!(
            "{who}; open it read-only (nbdkit -r), stop that writer, or take the lease with lease-takeover=true"
        ))
    }

    fn renew_interval(&self) -> Duration {
        (self.config.window() / 3).max(Duration::from_millis(100))
    }

    /// Starts the renewal thread. Should it panic, the lease is as good as lost (nothing renews
    /// it): writes fail at once, saying which thread died, rather than when the window runs out.
    fn spawn_renewer(self: &Arc<Self>) {
        let (lease, failing) = (self.clone(), self.clone());
        let spawned = background::spawn(
            "nbds3-lease",
            move || lease.renew_loop(),
            move |what| {
                let mut state = lock(&failing.state);
                if matches!(state.phase, Phase::Held { .. }) {
                    failing.lose(
                        &mut state.phase,
                        format!(
                            "{what}; the lease is no longer renewed, so this process no longer writes to the export"
                        ),
                    );
                }
            },
        );
        if let Err(e) = spawned {
            log::error!("export {}: cannot start the lease renewal thread, writes will stop: {e}", self.export);
        }
    }

    /// Refuses writes from now on, for `why`, said once at error level.
    fn lose(&self, phase: &mut Phase, why: String) {
        self.valid_until.store(0, Ordering::Release);
        log::error!("export {}: {why}", self.export);
        *phase = Phase::Lost(why);
    }

    fn renew_loop(&self) {
        let mut pause = self.renew_interval();
        loop {
            let state = lock(&self.state);
            // Until the pause is over, or the release (which leaves the phase) wakes it early.
            let (state, _) = self
                .changed
                .wait_timeout_while(state, pause, |s| matches!(s.phase, Phase::Held { .. }))
                .unwrap_or_else(PoisonError::into_inner);
            let Phase::Held { version, token } = &state.phase else { return };
            let (version, token) = (version.clone(), token.clone());
            let request = self.start_request(state);
            pause = match self.renew(&version, &token, request) {
                Ok(()) => self.renew_interval(),
                Err(e) => {
                    log::warn!("export {}: could not renew the lease, retrying: {e}", self.export);
                    Duration::from_secs(1).min(self.renew_interval())
                }
            };
        }
    }

    /// Renews the lease at `version` as `request`; marks it lost when another writer has
    /// replaced it.
    fn renew(&self, version: &str, token: &str, request: InFlight<'_>) -> Result<()> {
        let started = Instant::now();
        // A server that ignores If-Match cannot refuse a renewal over a successor's lease, so
        // look first (this narrows the race; it cannot close it).
        let successor = if self.backend.atomic_leases()? {
            None
        } else {
            let current = self.backend.read_lease(&self.export)?;
            current.map(|v| LeaseRecord::parse(&v.text)).filter(|r| r.as_ref().is_none_or(|r| r.token != token))
        };
        // The new version, or who took the lease over.
        let renewed = match successor {
            Some(holder) => Err(holder),
            None => match self.backend.replace_lease(
                &self.export,
                Expect::Version(version),
                &self.new_record(token).to_text(),
            )? {
                Some(new_version) => Ok(new_version),
                None => {
                    Err(self.backend.read_lease(&self.export).ok().flatten().and_then(|v| LeaseRecord::parse(&v.text)))
                }
            },
        };
        request.finish(|phase| {
            let Phase::Held { version: held, .. } = phase else { return };
            match renewed {
                Ok(new_version) => {
                    *held = new_version;
                    self.extend_from(started);
                }
                Err(holder) => {
                    let who = holder.map_or_else(|| "another writer".into(), |r| format!("nbds3 {}", r.describe()));
                    self.lose(
                        phase,
                        format!("the lease was taken over by {who}; this process no longer writes to the export"),
                    );
                }
            }
        });
        Ok(())
    }
}

impl WriteWindow for Lease {
    fn deadline(&self) -> Result<Instant> {
        Lease::deadline(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryBackend;

    fn config(takeover: bool) -> LeaseConfig {
        LeaseConfig { time: Duration::from_secs(6), takeover, request_timeout: Duration::from_secs(2) }
    }

    /// Renewed every 0.5 s, writes allowed for 1.5 s after a renewal.
    fn short_config(takeover: bool) -> LeaseConfig {
        LeaseConfig { time: Duration::from_secs(2), takeover, request_timeout: Duration::from_millis(500) }
    }

    #[test]
    fn records_round_trip_and_junk_is_not_a_record() {
        let r = LeaseRecord { holder: Holder::this_process(), token: "t1".into(), expires: 123 };
        assert_eq!(LeaseRecord::parse(&r.to_text()), Some(r));
        assert_eq!(LeaseRecord::parse("hello"), None);
        assert_eq!(LeaseRecord::parse("host=a\nboot=b\npid=x\ntoken=t\nexpires=1\n"), None);
    }

    #[test]
    fn only_a_holder_with_this_host_id_is_looked_up_by_pid() {
        let me = Holder::this_process();
        let dead = u32::MAX >> 2;
        let same_host = |pid, boot: &str| Holder { pid, boot: boot.into(), ..me.clone() };
        assert!(same_host(dead, &me.boot).is_gone(&me), "a dead process of this host and boot");
        assert!(!same_host(me.pid, &me.boot).is_gone(&me), "this very process");
        assert!(same_host(me.pid, "another-boot").is_gone(&me), "a process of a boot before this one");
        // Another host id on this very machine and boot (two containers, or two test hosts): its
        // pid means nothing here, dead or alive, and neither does its boot.
        let other_host = |pid, boot: &str| Holder { host: format!("{}-b", me.host), ..same_host(pid, boot) };
        assert!(!other_host(dead, &me.boot).is_gone(&me));
        assert!(!other_host(me.pid, &me.boot).is_gone(&me));
        assert!(!other_host(dead, "another-boot").is_gone(&me));
    }

    #[test]
    fn the_holder_is_read_and_described_for_people() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let dev = ExportName::new("dev").unwrap();
        assert_eq!(LeaseHolder::read(&*backend, &dev).unwrap(), None);
        let lease = Lease::new(backend.clone(), dev.clone(), config(false));
        lease.hold().unwrap();
        let me = Holder::this_process();
        let Some(LeaseHolder::Writer { host, pid, expires }) = LeaseHolder::read(&*backend, &dev).unwrap() else {
            panic!("no holder")
        };
        assert_eq!((host, pid), (me.host.clone(), me.pid));
        assert!(expires > unix_seconds(), "{expires}");
        lease.release();
        let released = LeaseHolder::read(&*backend, &dev).unwrap().unwrap();
        assert_eq!(released.describe(unix_seconds()), format!("released by pid {} on {}", me.pid, me.host));

        let holder = LeaseHolder::Writer { host: "host-a".into(), pid: 12, expires: 1_795_000_000 };
        assert_eq!(holder.describe(1_795_000_000), "pid 12 on host-a until 2026-11-18 11:06:40 UTC");
        assert_eq!(holder.describe(1_795_000_001), "expired at 2026-11-18 11:06:40 UTC (pid 12 on host-a)");
        backend
            .replace_lease(&dev, Expect::Version(&backend.read_lease(&dev).unwrap().unwrap().version), "junk")
            .unwrap();
        let junk = LeaseHolder::read(&*backend, &dev).unwrap().unwrap();
        assert_eq!(junk, LeaseHolder::Unreadable);
        assert!(junk.describe(0).starts_with("unreadable"));
    }

    #[test]
    fn a_second_writer_is_refused_until_the_first_releases() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let dev = ExportName::new("dev").unwrap();
        let first = Lease::new(backend.clone(), dev.clone(), config(false));
        assert!(first.check().unwrap_err().to_string().contains("no writable connection has taken it"));
        first.hold().unwrap();
        first.hold().unwrap();
        first.check().unwrap();

        let second = Lease::new(backend.clone(), dev.clone(), config(false));
        let e = second.hold().unwrap_err().to_string();
        assert!(e.starts_with("export dev: is held by another writer, nbds3 pid"), "{e}");
        assert!(e.contains("lease-takeover=true"), "{e}");

        first.release();
        assert!(first.check().unwrap_err().to_string().contains("released"));
        second.hold().unwrap();
        second.check().unwrap();
        second.release();
    }

    #[test]
    fn a_takeover_waits_out_the_old_lease_which_fences_its_holder() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let dev = ExportName::new("dev").unwrap();
        let first = Lease::new(backend.clone(), dev.clone(), short_config(false));
        first.hold().unwrap();
        let second = Lease::new(backend.clone(), dev.clone(), short_config(true));
        let started = Instant::now();
        second.hold().unwrap();
        assert!(started.elapsed() >= Duration::from_secs(1), "the takeover did not wait: {:?}", started.elapsed());
        // By then the first holder's renewal has found the successor's lease.
        let e = first.check().unwrap_err().to_string();
        assert!(e.contains("the lease was taken over by nbds3 pid"), "{e}");
        assert!(first.hold().is_err());
        second.check().unwrap();
    }

    #[test]
    fn expired_released_and_dead_holders_may_be_taken_over() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let lease = Lease::new(backend, ExportName::new("dev").unwrap(), config(false));
        let me = Holder::this_process();
        let record = |holder: Holder, expires| LeaseRecord { holder, token: "t".into(), expires };
        let far = unix_seconds() + 3600;
        let elsewhere = Holder { host: "elsewhere".into(), ..me.clone() };
        assert_eq!(lease.may_take(Some(&record(elsewhere.clone(), far))), None);
        let (why, until) = lease.may_take(Some(&record(elsewhere.clone(), 0))).unwrap();
        assert!(why.contains("released") && until == 0, "{why}");
        assert!(lease.may_take(Some(&record(elsewhere.clone(), 1))).unwrap().0.contains("expired"));
        assert_eq!(lease.may_take(Some(&record(me.clone(), far))), None, "this very process is alive");
        let dead = Holder { pid: u32::MAX >> 2, ..me.clone() };
        assert_eq!(lease.may_take(Some(&record(dead, far))).unwrap().1, 0, "no wait for a dead holder");
        let rebooted = Holder { boot: "another-boot".into(), ..me };
        assert!(lease.may_take(Some(&record(rebooted, far))).unwrap().0.contains("no longer runs"));
        assert_eq!(lease.may_take(None), None, "an unreadable lease is not taken without lease-takeover");

        let forced = Lease::new(Arc::new(MemoryBackend::default()), ExportName::new("dev").unwrap(), config(true));
        let (why, until) = forced.may_take(Some(&record(elsewhere, far))).unwrap();
        assert!(why.starts_with("lease-takeover=true, from pid"), "{why}");
        assert_eq!(until, far, "a live holder may write until its lease expires");
    }

    /// A backend whose lease writes a test can hold up, as a slow S3 server would, or make panic.
    #[derive(Debug, Default)]
    struct Gated {
        inner: MemoryBackend,
        /// While set, `replace_lease` waits.
        closed: Mutex<bool>,
        opened: Condvar,
        /// `replace_lease` calls in flight, and the most there ever were at once.
        in_flight: AtomicU64,
        most_in_flight: AtomicU64,
        /// While set, `replace_lease` panics.
        panics: AtomicBool,
    }

    impl Gated {
        fn set_closed(&self, closed: bool) {
            *lock(&self.closed) = closed;
            self.opened.notify_all();
        }

        /// Waits (at most 5 s) until `n` lease writes are held up.
        fn wait_for_held_up(&self, n: u64) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.in_flight.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "no lease write was sent");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    impl std::fmt::Display for Gated {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Gated")
        }
    }

    impl Backend for Gated {
        fn open(&self, export: &ExportName, block_size: usize) -> Result<Arc<dyn crate::Storage>> {
            self.inner.open(export, block_size)
        }
        fn read_record(&self, export: &ExportName) -> Result<Option<String>> {
            self.inner.read_record(export)
        }
        fn write_record(&self, export: &ExportName, record: &str) -> Result<()> {
            self.inner.write_record(export, record)
        }
        fn delete_record(&self, export: &ExportName) -> Result<()> {
            self.inner.delete_record(export)
        }
        fn list_exports(&self) -> Result<Vec<ExportName>> {
            self.inner.list_exports()
        }
        fn read_lease(&self, export: &ExportName) -> Result<Option<crate::storage::VersionedText>> {
            self.inner.read_lease(export)
        }
        fn replace_lease(&self, export: &ExportName, expected: Expect<'_>, text: &str) -> Result<Option<String>> {
            if self.panics.load(Ordering::SeqCst) {
                panic!("injected panic in a lease write");
            }
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            drop(self.opened.wait_while(lock(&self.closed), |closed| *closed).unwrap());
            let result = self.inner.replace_lease(export, expected, text);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            result
        }
        fn atomic_leases(&self) -> Result<bool> {
            Ok(true)
        }
        fn objects(&self) -> Arc<dyn crate::storage::ObjectStore> {
            self.inner.objects()
        }
    }

    /// `check` (asked before every write) while `lease` waits on the backend, from another thread
    /// so that a check stuck behind a lock fails the test instead of hanging it.
    fn check_meanwhile(lease: &Arc<Lease>) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let lease = lease.clone();
        std::thread::spawn(move || tx.send(lease.check()));
        rx.recv_timeout(Duration::from_secs(1)).expect("check() waited for a lease request")
    }

    /// A slow lease request (S3 taking its time, a takeover waiting out the old lease) holds up
    /// nothing but itself: writes are checked at once; a second open waits for the first's take
    /// rather than take the lease again; the release waits for a renewal in flight and replaces
    /// the version it wrote, so the lease ends up released; never two requests at once.
    #[test]
    fn slow_lease_requests_hold_up_no_check_and_never_overlap() {
        let backend = Arc::new(Gated::default());
        let lease = Lease::new(backend.clone(), ExportName::new("slow").unwrap(), short_config(false));
        backend.set_closed(true);
        let opens: Vec<_> = (0..2)
            .map(|_| {
                let lease = lease.clone();
                std::thread::spawn(move || lease.hold())
            })
            .collect();
        backend.wait_for_held_up(1);
        let e = check_meanwhile(&lease).unwrap_err().to_string();
        assert!(e.contains("does not hold the lease"), "{e}");
        backend.set_closed(false);
        for open in opens {
            open.join().unwrap().unwrap();
        }
        check_meanwhile(&lease).unwrap();

        backend.set_closed(true);
        backend.wait_for_held_up(1);
        check_meanwhile(&lease).unwrap();
        let release = {
            let lease = lease.clone();
            std::thread::spawn(move || lease.release())
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!release.is_finished(), "the release went ahead of the renewal in flight");
        backend.set_closed(false);
        release.join().unwrap();
        let holder = LeaseHolder::read(&*backend, &ExportName::new("slow").unwrap()).unwrap().unwrap();
        assert!(holder.describe(unix_seconds()).starts_with("released by"), "{holder:?}");
        assert_eq!(backend.most_in_flight.load(Ordering::SeqCst), 1);
    }

    /// The renewal thread panicking (a bug, injected here through the backend) stops writes at
    /// once with an error that names it, and says so in the log, rather than leave the lease to
    /// run out unrenewed while writes go on.
    #[test]
    fn a_panic_in_the_renewal_thread_stops_writes_at_once_naming_it() {
        crate::background::captured_log::start();
        let backend = Arc::new(Gated::default());
        let lease = Lease::new(backend.clone(), ExportName::new("renewer-panics").unwrap(), short_config(false));
        lease.hold().unwrap();
        backend.panics.store(true, Ordering::SeqCst);
        // Well within the 1.5 s window: the renewal runs every 0.5 s.
        let deadline = Instant::now() + Duration::from_secs(1);
        while lease.check().is_ok() {
            assert!(Instant::now() < deadline, "writes still allowed after the renewal thread panicked");
            std::thread::sleep(Duration::from_millis(10));
        }
        let e = lease.check().unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        let died = "thread nbds3-lease panicked: injected panic in a lease write";
        assert_eq!(
            e.to_string(),
            format!("export renewer-panics: {died}; the lease is no longer renewed, so this process no longer writes to the export")
        );
        assert!(lease.hold().is_err(), "nor does a new connection take it");
        assert_eq!(crate::background::captured_log::lines_with(died), [format!("ERROR {e}")]);
    }
}

/// [`LeaseRecord::parse`] against what a lease object may hold (someone else's object, a broken
/// or hostile server): it must refuse, never panic; see `crate::fuzz`. The corpus is in
/// `tests/corpus/lease/`: inputs named `refused-*` must not parse, `readable-*` must.
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    fn printable(max: usize) -> impl Strategy<Value = String> {
        vec(33u8..127, 1..max).prop_map(|b| String::from_utf8(b).unwrap_or_default())
    }

    fn record() -> impl Strategy<Value = LeaseRecord> {
        (printable(64), printable(40), any::<u32>(), printable(40), 0..=LeaseRecord::MAX_EXPIRES).prop_map(
            |(host, boot, pid, token, expires)| LeaseRecord { holder: Holder { host, boot, pid }, token, expires },
        )
    }

    /// A written record with its lines dropped, repeated, or given other values.
    fn mangled() -> impl Strategy<Value = String> {
        let edit = prop_oneof![
            3 => Just(None),
            1 => Just(Some(String::new())),
            1 => any::<String>().prop_map(Some),
            1 => any::<u64>().prop_map(|n| Some(n.to_string())),
            1 => Just(Some("18446744073709551616".to_string())),
        ];
        (record(), vec(edit, 7)).prop_map(|(r, edits)| {
            let text = r.to_text();
            let lines = text.lines().zip(edits).flat_map(|(line, edit)| match edit {
                None => vec![line.to_string()],
                Some(value) if value.is_empty() => vec![],
                Some(value) => {
                    let name = line.split_once('=').map_or(line, |(n, _)| n);
                    vec![format!("{name}={value}"), line.to_string()]
                }
            });
            lines.collect::<Vec<_>>().join("\n")
        })
    }

    proptest! {
        #![proptest_config(crate::fuzz::config(512))]

        #[test]
        fn fuzz_lease_records(text in prop_oneof![any::<String>(), mangled()]) {
            if let Some(r) = LeaseRecord::parse(&text) {
                prop_assert!(r.expires <= LeaseRecord::MAX_EXPIRES && r.holder.host.len() <= LeaseRecord::MAX_FIELD);
                prop_assert!(!r.describe().contains(char::is_control), "{:?}", r.describe());
            }
        }

        #[test]
        fn written_lease_records_read_back(r in record()) {
            prop_assert_eq!(LeaseRecord::parse(&r.to_text()), Some(r));
        }
    }

    #[test]
    fn corpus_of_lease_records() {
        for (name, bytes) in crate::fuzz::corpus("lease") {
            let parsed = LeaseRecord::parse(&String::from_utf8_lossy(&bytes));
            if name.starts_with("refused-") {
                assert_eq!(parsed, None, "tests/corpus/lease/{name}");
            } else if name.starts_with("readable-") {
                assert!(parsed.is_some(), "tests/corpus/lease/{name}");
            }
        }
    }
}
