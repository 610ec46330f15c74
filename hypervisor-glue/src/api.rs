//! The control socket: a running VM answers requests on a Unix socket
//! (`--api PATH`), one JSON object per line each way. JSON lives here
//! only; inside, requests are the typed [`crate::control::Command`]s.
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"state":"running","id":"8f0c...","generation":0,...}
//! -> {"cmd":"snapshot","then":"stop"}      (the file's fd rides along)
//! <- {"ok":true,"bytes":67112960,"paused_us":9410,"write_us":9100}
//! -> {"cmd":"migrate","to":"10.77.2.2:7000","key":"<64 hex digits>"}
//! <- {"progress":{...}}            (any number of these)
//! <- {"ok":true,"downtime_ms":1.4,...}
//! ```
//!
//! Commands: `status`, `pause`, `resume`, `snapshot` (`then`: `resume`
//! (default), `pause` or `stop`; `key`: 64 hex digits to sign it with),
//! `stop`, `migrate`, `resolve`. A snapshot is written into a file the
//! caller opened and passed with the request (`SCM_RIGHTS`): the VMM never
//! opens a path a request names, so it can run jailed and cannot be made
//! to write where its caller may not.
//! The socket is made mode 0600, and a connection from another user (but
//! root) is refused (`SO_PEERCRED`). A request line is at most 64 KiB.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
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

/// The longest path a Unix socket address holds (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;

/// A socket's path in a form `bind` and `connect` accept. A path longer
/// than `sun_path` (deep directories: a checkout's `target/`, an agent's
/// directory) is reached through its directory, held open, as
/// `/proc/self/fd/N/NAME`; the socket's name stays the one asked for.
struct Reachable {
    _dir: Option<OwnedFd>,
    path: PathBuf,
}

impl Reachable {
    fn new(path: &Path) -> std::io::Result<Reachable> {
        use std::os::unix::ffi::OsStrExt;
        if path.as_os_str().as_bytes().len() <= SUN_PATH_MAX {
            return Ok(Reachable {
                _dir: None,
                path: path.to_path_buf(),
            });
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a socket's path", path.display()),
            ));
        };
        let dir: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })?
            .into();
        let short = Path::new("/proc/self/fd")
            .join(dir.as_raw_fd().to_string())
            .join(name);
        if short.as_os_str().as_bytes().len() > SUN_PATH_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the socket name {:?} is longer than a Unix socket address holds ({SUN_PATH_MAX} bytes)",
                    name
                ),
            ));
        }
        Ok(Reachable {
            _dir: Some(dir),
            path: short,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Connects to the control socket at `path`, however long the path.
pub fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let p = Reachable::new(path)?;
    UnixStream::connect(p.path())
}

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
    /// Write a snapshot (pausing if running) into the file passed with
    /// the request, then do `then`.
    Snapshot {
        /// What after.
        #[serde(default)]
        then: After,
        /// The migration key (64 hex digits) to sign the snapshot with.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
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
    /// The destination's address (`ip:port`; the CLI resolves names).
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
        Some(Reply::Migration(_)) | Some(Reply::Paused { .. }) | Some(Reply::Rest(_)) => {
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
    /// A group whose members may control the VM too (`--api-group`).
    group: Option<u32>,
}

impl Server {
    fn handle(&self, conn: UnixStream) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.answer(conn);
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }

    fn answer(&self, conn: UnixStream) {
        crate::failpoint::hit("api-request");
        if let Err(e) = check_peer(&conn, self.group) {
            let _ = writeln!(&conn, "{}", error(e));
            return;
        }
        let answer = match read_request(&conn) {
            Ok(None) => return,
            Ok(Some((line, fds))) => match parse(&line) {
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
                Ok(req) => match into_command(req, fds) {
                    Ok(cmd) => answer(self.mailbox.call(cmd)),
                    Err(e) => error(e),
                },
                Err(e) => error(e),
            },
            Err(e) => error(format!("reading the request: {e}")),
        };
        let _ = writeln!(&conn, "{answer}");
    }
}

/// Parses one request line.
pub fn parse(line: &str) -> Result<Request, String> {
    serde_json::from_str::<Request>(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// The typed command for the vCPU thread of a request, with the files
/// passed along with it (`migrate` and `resolve` are not for it).
pub fn into_command(req: Request, mut fds: Vec<OwnedFd>) -> Result<Command, String> {
    let takes_file = matches!(req, Request::Snapshot { .. });
    if fds.len() != usize::from(takes_file) {
        return Err(if takes_file {
            "a snapshot request must carry exactly one open file (ferry snapshot opens it)".into()
        } else {
            "this request takes no files".into()
        });
    }
    Ok(match req {
        Request::Status => Command::Status,
        Request::Pause => Command::Pause,
        Request::Resume => Command::Resume,
        Request::Stop => Command::Stop,
        Request::Snapshot { then, key } => {
            let key = match key {
                None => None,
                Some(hex) => Some(
                    crate::migration::key::Psk::from_hex(&hex)
                        .ok_or("the snapshot key is not 64 hex digits")?,
                ),
            };
            let file = std::fs::File::from(fds.pop().expect("counted above"));
            check_snapshot_file(&file)?;
            Command::Snapshot { file, then, key }
        }
        Request::Migrate(_) | Request::Resolve { .. } => {
            return Err("migrate and resolve are not vCPU commands".into());
        }
    })
}

/// A snapshot goes only into an empty regular file open for writing.
fn check_snapshot_file(file: &std::fs::File) -> Result<(), String> {
    let meta = file
        .metadata()
        .map_err(|e| format!("the passed file: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("the passed file is not a regular file".into());
    }
    if meta.len() != 0 {
        return Err("the passed file is not empty".into());
    }
    // SAFETY: F_GETFL reads the open file's status flags; no memory.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || flags & libc::O_ACCMODE == libc::O_RDONLY {
        return Err("the passed file is not open for writing".into());
    }
    Ok(())
}

/// Most files one request may carry.
const MAX_FDS: usize = 2;

/// Reads one request line and the files passed with it. `None`: the peer
/// closed without asking anything.
fn read_request(conn: &UnixStream) -> std::io::Result<Option<(String, Vec<OwnedFd>)>> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    // Room for MAX_FDS descriptors (CMSG_SPACE, u64-aligned).
    let mut cmsg = [0u64; 8];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid; its pointers are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        // SAFETY: `msg` points at `buf` and `cmsg`, both live and of the
        // lengths given; descriptors arrive close-on-exec.
        let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: walking the control messages recvmsg filled in, within
        // msg_controllen; each SCM_RIGHTS payload is whole descriptors,
        // now owned by this process (taken into OwnedFd once each).
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                    let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
            return Err(std::io::Error::other(
                "too many files passed with the request",
            ));
        }
        let n = n as usize;
        if n == 0 {
            return Ok(if line.is_empty() && fds.is_empty() {
                None
            } else {
                Some((String::from_utf8_lossy(&line).into_owned(), fds))
            });
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            let text = String::from_utf8(line)
                .map_err(|_| std::io::Error::other("the request is not UTF-8"))?;
            return Ok(Some((text, fds)));
        }
        if line.len() as u64 >= MAX_REQUEST {
            return Err(std::io::Error::other("request too long"));
        }
    }
}

/// Writes all of `data` to `conn`, passing `fds` with its first bytes.
fn send_with_fds(conn: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    assert!(fds.len() <= MAX_FDS);
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds) as u32;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a length.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as usize;
        // SAFETY: `cmsg` has room for one header and MAX_FDS descriptors
        // (msg_controllen says how much); the header is written in place.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload) as usize;
            let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `data` and `cmsg`, live for the call; the
    // kernel only reads them. MSG_NOSIGNAL: a gone peer is an error.
    let n = unsafe { libc::sendmsg(conn.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut w = conn;
    w.write_all(&data[n as usize..])
}

/// Whether the one who asked closed its end (it half-closes to cancel).
fn peer_hung_up(conn: &UnixStream) -> bool {
    let mut b = [0u8; 1];
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

/// Refuses a peer that is neither this process's user nor root, nor (with
/// `--api-group`) a member of that group.
fn check_peer(conn: &UnixStream, group: Option<u32>) -> Result<(), String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
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
    if cred.uid == me || cred.uid == 0 {
        return Ok(());
    }
    if let Some(g) = group
        && (cred.gid == g || peer_groups(conn).contains(&g))
    {
        return Ok(());
    }
    Err(format!(
        "uid {} may not control this VM (it belongs to uid {me}{})",
        cred.uid,
        group.map(|g| format!(" and group {g}")).unwrap_or_default()
    ))
}

/// The peer's supplementary groups (SO_PEERGROUPS).
fn peer_groups(conn: &UnixStream) -> Vec<u32> {
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * 4) as libc::socklen_t;
    // SAFETY: SO_PEERGROUPS fills at most `len` bytes of `groups`.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / 4);
    groups
}

/// A bound control socket; [`Api::serve`] starts answering on it.
#[derive(Debug)]
pub struct Api {
    listener: UnixListener,
    path: PathBuf,
    dir: OwnedFd,
    group: Option<u32>,
}

impl Api {
    /// Binds `path` with mode 0600, or 0660 and owned by `group` if given
    /// (its members may then control the VM too). An existing socket
    /// nobody listens on is replaced; a live one, or anything that is not
    /// a socket, is an error.
    pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<Api> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if connect(path).is_ok() {
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
        let r = Reachable::new(path).and_then(|p| UnixListener::bind(p.path()));
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let listener = r?;
        if let Some(g) = group {
            use std::os::unix::fs::PermissionsExt;
            std::os::unix::fs::chown(path, None, Some(g))
                .and_then(|()| {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                })
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(path);
                })?;
        }
        // The directory, held open: the socket's name is removed through
        // it at the end, whatever the process's root is by then.
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)?;
        Ok(Api {
            listener,
            path: path.to_path_buf(),
            dir: dir.into(),
            group,
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
            group: self.group,
        });
        let s = server.clone();
        let listener = self.listener;
        crate::lockdown::spawn(crate::lockdown::Role::Api, "ferry-api", move || {
            for conn in listener.incoming().flatten() {
                conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let s = s.clone();
                // A migration holds its connection for its whole run:
                // each connection gets its own thread.
                let _ = std::thread::Builder::new()
                    .name("ferry-api-conn".into())
                    .spawn(move || {
                        crate::lockdown::enter(crate::lockdown::Role::Api);
                        s.handle(conn)
                    });
            }
        })?;
        Ok(ApiHandle {
            server,
            path: self.path,
            dir: self.dir,
        })
    }
}

/// A socket being served.
pub struct ApiHandle {
    server: Arc<Server>,
    path: PathBuf,
    dir: OwnedFd,
}

impl ApiHandle {
    /// The descriptor of the socket's directory (the only one the vCPU
    /// thread may remove a name from, at the end).
    pub fn dir_fd(&self) -> i32 {
        self.dir.as_raw_fd()
    }
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
        use std::os::unix::ffi::OsStrExt;
        let Some(name) = self.path.file_name() else {
            return;
        };
        let Ok(name) = std::ffi::CString::new(name.as_bytes()) else {
            return;
        };
        // SAFETY: unlinkat on a directory descriptor this handle owns and a
        // NUL-terminated name.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), name.as_ptr(), 0) };
    }
}

/// Sends one request to a VM's control socket and returns its answer.
pub fn call(path: &Path, req: &Request) -> Result<Value, String> {
    call_with_progress(path, req, &mut |_| {})
}

/// Like [`call`], passing `file` along with the request (a snapshot's).
pub fn call_with_file(path: &Path, req: &Request, file: &std::fs::File) -> Result<Value, String> {
    use std::os::fd::AsFd;
    call_inner(path, req, &[file.as_fd()], &mut |_| {}, &mut |_| {})
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
    call_inner(path, req, &[], progress, on_conn)
}

fn call_inner(
    path: &Path,
    req: &Request,
    fds: &[BorrowedFd<'_>],
    progress: &mut dyn FnMut(&Value),
    on_conn: &mut dyn FnMut(UnixStream),
) -> Result<Value, String> {
    let conn =
        connect(path).map_err(|e| format!("cannot reach the VM at {}: {e}", path.display()))?;
    if let Ok(c) = conn.try_clone() {
        on_conn(c);
    }
    conn.set_read_timeout(Some(Duration::from_secs(3600))).ok();
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    send_with_fds(&conn, line.as_bytes(), fds).map_err(|e| format!("sending the request: {e}"))?;
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
            serde_json::from_str::<Request>(r#"{"cmd":"snapshot","then":"stop"}"#).unwrap(),
            Request::Snapshot {
                then: After::Stop,
                key: None
            }
        );
        let m = serde_json::from_str::<Request>(r#"{"cmd":"migrate","to":"a:1","insecure":true}"#)
            .unwrap();
        let Request::Migrate(m) = m else { panic!() };
        assert!(m.insecure && m.key.is_none());
        assert_eq!(m.downtime_ms, 1);
        for bad in [
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"snapshot","path":"/x"}"#,
            "nope",
            r#"{"cmd":"snapshot","then":"later"}"#,
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
    fn a_socket_deeper_than_sun_path_binds_answers_and_goes() {
        let mut dir = std::env::temp_dir().join(format!("ferry-api-deep-{}", std::process::id()));
        while dir.as_os_str().len() < 150 {
            dir.push("a-rather-long-directory-name");
        }
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("8f0c1c9e-3d4b-4f7a-9a55-0123456789ab.sock");
        assert!(sock.as_os_str().len() > SUN_PATH_MAX);
        // Rust's own bind refuses it, which is the case handled here.
        assert!(UnixListener::bind(&sock).is_err());
        let handle = Api::bind(&sock, None)
            .unwrap()
            .serve(Mailbox::new(), Arc::new(NoMigrations))
            .unwrap();
        assert!(
            std::fs::symlink_metadata(&sock)
                .unwrap()
                .file_type()
                .is_socket()
        );
        // A second VMM on the same path sees the live one.
        let again = Api::bind(&sock, None).err().unwrap();
        assert_eq!(again.kind(), std::io::ErrorKind::AddrInUse, "{again}");
        assert!(connect(&sock).is_ok());
        drop(handle);
        assert!(!sock.exists());
        let top = std::env::temp_dir().join(format!("ferry-api-deep-{}", std::process::id()));
        std::fs::remove_dir_all(top).unwrap();
    }

    #[test]
    fn the_socket_is_private_and_relays_to_the_vcpu_thread() {
        let dir = std::env::temp_dir().join(format!("ferry-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let mailbox = Mailbox::new();
        let handle = Api::bind(&sock, None)
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
        // A snapshot goes into the file passed along, never a named path:
        // without one, or with one not open for writing, it is refused
        // before the vCPU thread hears of it.
        let snap = Request::Snapshot {
            then: After::Resume,
            key: None,
        };
        let v = call(&sock, &snap).unwrap();
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("exactly one open file"),
            "{v}"
        );
        let target = dir.join("snap");
        std::fs::write(&target, b"").unwrap();
        let ro = std::fs::File::open(&target).unwrap();
        let v = call_with_file(&sock, &snap, &ro).unwrap();
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("not open for writing"),
            "{v}"
        );
        let v = call_with_file(&sock, &Request::Status, &ro).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("takes no files"),
            "{v}"
        );
        let m2 = mailbox.clone();
        let vcpu = std::thread::spawn(move || {
            loop {
                if let Some((cmd, r)) = m2.next(Duration::from_millis(50)) {
                    let Command::Snapshot {
                        mut file,
                        then,
                        key,
                    } = cmd
                    else {
                        panic!("{cmd:?}")
                    };
                    assert_eq!((then, key), (After::Resume, None));
                    file.write_all(b"written through the passed fd").unwrap();
                    r.send(Reply::Done);
                    return;
                }
            }
        });
        let rw = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        let v = call_with_file(&sock, &snap, &rw).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        vcpu.join().unwrap();
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"written through the passed fd"
        );
        // A second VM cannot take over a live socket, and a file that is
        // not a socket is never removed.
        assert!(Api::bind(&sock, None).is_err());
        let plain = dir.join("plain");
        std::fs::write(&plain, b"keep me").unwrap();
        assert!(Api::bind(&plain, None).is_err());
        assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
        drop(handle);
        assert!(!sock.exists());
        std::fs::remove_dir_all(dir).ok();
    }
}
