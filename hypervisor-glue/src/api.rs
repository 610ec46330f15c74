//! The control socket: a running VM answers requests on a Unix socket
//! (`--api PATH`), one JSON object per line each way. JSON lives here
//! only; inside, requests are the typed [`crate::control::Command`]s.
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"state":"running","id":"8f0c...","generation":0,...}
//! -> {"cmd":"snapshot","path":"/tmp/vm.snap","then":"stop"}
//! <- {"ok":true,"bytes":67112960,"paused_us":9410,"write_us":9100}
//! -> {"cmd":"migrate","to":"10.77.2.2:7000","key":"<64 hex digits>"}
//! <- {"progress":{...}}            (any number of these)
//! <- {"ok":true,"downtime_ms":1.4,...}
//! ```
//!
//! Commands: `status`, `pause`, `resume`, `snapshot` (`path`, and `then`:
//! `resume` (default), `pause` or `stop`), `stop`, `migrate`, `resolve`.
//! The socket is made mode 0600, and a connection from another user (but
//! root) is refused (`SO_PEERCRED`). A request line is at most 64 KiB.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::control::{After, Command, Mailbox, Reply};

/// Largest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// A request, as it comes over the socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// How the VM is.
    Status,
    /// Stop the vCPU and the devices; guest time stops with them.
    Pause,
    /// Run again; guest time goes on by the real time that passed.
    Resume,
    /// Write a snapshot (pausing if running), then do `then`.
    Snapshot {
        /// Where to write it.
        path: PathBuf,
        /// What after.
        #[serde(default)]
        then: After,
    },
    /// End the VM.
    Stop,
    /// Live-migrate the VM to a `ferry receive` (progress lines come
    /// before the final answer).
    Migrate(MigrateRequest),
    /// Settle a migration whose end is in doubt (see `ferry resolve`).
    Resolve {
        /// Resume the VM here if the destination does not run it.
        #[serde(default)]
        resume_here: bool,
        /// The operator confirms the destination host is down (lets
        /// `resume_here` act when the destination cannot be asked).
        #[serde(default)]
        destination_down: bool,
    },
}

/// A migration's parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination's address (`host:port`).
    pub to: String,
    /// The pre-shared key, 64 hex digits (read from its file by the CLI).
    #[serde(default)]
    pub key: Option<String>,
    /// No key: plain text, no authentication (both sides must agree).
    #[serde(default)]
    pub insecure: bool,
    /// Downtime budget in milliseconds.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// How far past the budget the pause may run before the source gives
    /// up and resumes, in milliseconds.
    #[serde(default = "default_margin_ms")]
    pub margin_ms: u64,
}

fn default_downtime_ms() -> u64 {
    1
}

/// Default margin of the stop-and-copy's deadline over the budget.
pub const DEFAULT_MARGIN_MS: u64 = 500;

fn default_margin_ms() -> u64 {
    DEFAULT_MARGIN_MS
}

/// An error answer.
pub fn error(msg: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": msg.to_string()})
}

fn ok(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.insert("ok".into(), Value::Bool(true));
    }
    v
}

/// The JSON answer for a reply.
fn answer(reply: Option<Reply>) -> Value {
    match reply {
        None => error("the VM ended before answering"),
        Some(Reply::Done) => json!({"ok": true}),
        Some(Reply::Status(s)) => ok(serde_json::to_value(*s).expect("status serializes")),
        Some(Reply::Snapshot(r)) => ok(serde_json::to_value(r).expect("report serializes")),
        Some(Reply::Refused(e)) => error(e),
        Some(Reply::Migration(_)) | Some(Reply::State(_)) => {
            error("internal: a migration reply on the socket")
        }
    }
}

/// What the socket needs besides the mailbox: how to migrate and resolve
/// (the migration module's; passed in so that this module does not
/// depend on it).
pub trait Migrator: Send + Sync {
    /// Runs a migration, sending progress objects to `progress`, which
    /// answers false once the one who asked has gone (Ctrl-C on `ferry
    /// migrate`): a migration still copying then stops. The final answer.
    fn migrate(
        self: Arc<Self>,
        req: &MigrateRequest,
        progress: &mut dyn FnMut(Value) -> bool,
    ) -> Value;
    /// Settles a migration in doubt; the answer.
    fn resolve(self: Arc<Self>, resume_here: bool, destination_down: bool) -> Value;
}

struct Server {
    mailbox: Arc<Mailbox>,
    migrator: Arc<dyn Migrator>,
    inflight: AtomicUsize,
}

impl Server {
    fn handle(&self, conn: UnixStream) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.answer(conn);
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }

    fn answer(&self, conn: UnixStream) {
        if let Err(e) = check_peer(&conn) {
            let _ = writeln!(&conn, "{}", error(e));
            return;
        }
        let mut line = String::new();
        let mut reader = BufReader::new(std::io::Read::take(&conn, MAX_REQUEST));
        let answer = match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST => {
                error("request too long")
            }
            Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
                Ok(Request::Migrate(m)) => {
                    let mut w = &conn;
                    let mut progress = |p: Value| {
                        let _ = writeln!(w, "{}", json!({ "progress": p }));
                        !peer_hung_up(&conn)
                    };
                    self.migrator.clone().migrate(&m, &mut progress)
                }
                Ok(Request::Resolve {
                    resume_here,
                    destination_down,
                }) => self.migrator.clone().resolve(resume_here, destination_down),
                Ok(req) => answer(self.mailbox.call(command(req))),
                Err(e) => error(format!("bad request: {e}")),
            },
            Err(e) => error(format!("reading the request: {e}")),
        };
        let _ = writeln!(&conn, "{answer}");
    }
}

fn command(req: Request) -> Command {
    match req {
        Request::Status => Command::Status,
        Request::Pause => Command::Pause,
        Request::Resume => Command::Resume,
        Request::Stop => Command::Stop,
        Request::Snapshot { path, then } => Command::Snapshot { path, then },
        Request::Migrate(_) | Request::Resolve { .. } => unreachable!("served apart"),
    }
}

/// Whether the one who asked closed its end (it half-closes to cancel).
fn peer_hung_up(conn: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    use std::os::fd::AsRawFd;
    // SAFETY: a non-blocking peek of at most one byte into `b`.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// Refuses a peer that is neither this process's user nor root.
fn check_peer(conn: &UnixStream) -> Result<(), String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    use std::os::fd::AsRawFd;
    // SAFETY: SO_PEERCRED fills a `ucred` of the given length.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if r != 0 {
        return Err("cannot tell who is connecting".into());
    }
    if cred.uid != me && cred.uid != 0 {
        return Err(format!(
            "uid {} may not control this VM (it belongs to uid {me})",
            cred.uid
        ));
    }
    Ok(())
}

/// A bound control socket; [`Api::serve`] starts answering on it.
#[derive(Debug)]
pub struct Api {
    listener: UnixListener,
    path: PathBuf,
}

impl Api {
    /// Binds `path` with mode 0600. An existing socket nobody listens on is
    /// replaced; a live one, or anything that is not a socket, is an error.
    pub fn bind(path: &Path) -> std::io::Result<Api> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("{} is the control socket of a running VM", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // The socket file takes its mode from the umask at bind time.
        // SAFETY: umask only swaps the process's file mode mask.
        let old = unsafe { libc::umask(0o177) };
        let r = UnixListener::bind(path);
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        Ok(Api {
            listener: r?,
            path: path.to_path_buf(),
        })
    }

    /// Answers requests on a thread, for the VM behind `mailbox`. The
    /// returned handle removes the socket when dropped, after waiting (a
    /// little) for answers being written.
    pub fn serve(
        self,
        mailbox: Arc<Mailbox>,
        migrator: Arc<dyn Migrator>,
    ) -> std::io::Result<ApiHandle> {
        let server = Arc::new(Server {
            mailbox,
            migrator,
            inflight: AtomicUsize::new(0),
        });
        let s = server.clone();
        let listener = self.listener;
        std::thread::Builder::new()
            .name("ferry-api".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
                    let s = s.clone();
                    // A migration holds its connection for its whole run:
                    // each connection gets its own thread.
                    let _ = std::thread::Builder::new()
                        .name("ferry-api-conn".into())
                        .spawn(move || s.handle(conn));
                }
            })?;
        Ok(ApiHandle {
            server,
            path: self.path,
        })
    }
}

/// A socket being served.
pub struct ApiHandle {
    server: Arc<Server>,
    path: PathBuf,
}

impl std::fmt::Debug for ApiHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiHandle")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        let t = std::time::Instant::now();
        while self.server.inflight.load(Ordering::Acquire) > 0
            && t.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to a VM's control socket and returns its answer.
pub fn call(path: &Path, req: &Request) -> Result<Value, String> {
    call_with_progress(path, req, &mut |_| {})
}

/// Like [`call`], passing progress lines (a migration's) to `progress`.
pub fn call_with_progress(
    path: &Path,
    req: &Request,
    progress: &mut dyn FnMut(&Value),
) -> Result<Value, String> {
    call_cancellable(path, req, progress, &mut |_| {})
}

/// [`call_with_progress`], giving `on_conn` a handle on the connection
/// first: shutting its write side down asks the VM to cancel.
pub fn call_cancellable(
    path: &Path,
    req: &Request,
    progress: &mut dyn FnMut(&Value),
    on_conn: &mut dyn FnMut(UnixStream),
) -> Result<Value, String> {
    let conn = UnixStream::connect(path)
        .map_err(|e| format!("cannot reach the VM at {}: {e}", path.display()))?;
    if let Ok(c) = conn.try_clone() {
        on_conn(c);
    }
    conn.set_read_timeout(Some(Duration::from_secs(3600))).ok();
    writeln!(
        &conn,
        "{}",
        serde_json::to_string(req).expect("requests serialize")
    )
    .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(&conn);
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err("the VM closed the control connection without answering".into());
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| format!("bad answer {line:?}: {e}"))?;
        match v.get("progress") {
            Some(p) => progress(p),
            None => return Ok(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"snapshot","path":"/x","then":"stop"}"#)
                .unwrap(),
            Request::Snapshot {
                path: "/x".into(),
                then: After::Stop
            }
        );
        let m = serde_json::from_str::<Request>(r#"{"cmd":"migrate","to":"a:1","insecure":true}"#)
            .unwrap();
        let Request::Migrate(m) = m else { panic!() };
        assert!(m.insecure && m.key.is_none());
        assert_eq!(m.downtime_ms, 1);
        for bad in [
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"snapshot"}"#,
            "nope",
            r#"{"cmd":"snapshot","path":"/x","then":"later"}"#,
            r#"{"cmd":"migrate","to":"a:1","typo":1}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    struct NoMigrations;
    impl Migrator for NoMigrations {
        fn migrate(self: Arc<Self>, _: &MigrateRequest, _: &mut dyn FnMut(Value) -> bool) -> Value {
            error("no")
        }
        fn resolve(self: Arc<Self>, _: bool, _: bool) -> Value {
            error("no")
        }
    }

    #[test]
    fn the_socket_is_private_and_relays_to_the_vcpu_thread() {
        let dir = std::env::temp_dir().join(format!("ferry-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let mailbox = Mailbox::new();
        let handle = Api::bind(&sock)
            .unwrap()
            .serve(mailbox.clone(), Arc::new(NoMigrations))
            .unwrap();
        assert_eq!(
            std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let m2 = mailbox.clone();
        let vcpu = std::thread::spawn(move || {
            loop {
                if let Some((cmd, r)) = m2.next(Duration::from_millis(50)) {
                    assert!(matches!(cmd, Command::Pause));
                    r.send(Reply::Done);
                    return;
                }
            }
        });
        let v = call(&sock, &Request::Pause).unwrap();
        assert_eq!(v["ok"], true);
        vcpu.join().unwrap();
        // A second VM cannot take over a live socket, and a file that is
        // not a socket is never removed.
        assert!(Api::bind(&sock).is_err());
        let plain = dir.join("plain");
        std::fs::write(&plain, b"keep me").unwrap();
        assert!(Api::bind(&plain).is_err());
        assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
        drop(handle);
        assert!(!sock.exists());
        std::fs::remove_dir_all(dir).ok();
    }
}
