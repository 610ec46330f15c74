//! The control socket: a running VM answers requests on a Unix socket
//! (`--api PATH`), one JSON object per line each way.
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"state":"running","guest_time_ns":123,...}
//! -> {"cmd":"snapshot","path":"/tmp/vm.snap","then":"stop"}
//! <- {"ok":true,"bytes":67112960,"pause_us":410,"write_us":5200}
//! ```
//!
//! Commands: `status`, `pause`, `resume`, `snapshot` (`path`, and `then`:
//! `resume` (default), `pause` or `stop`), `stop`. The API thread hands
//! each request to the vCPU thread, kicking it out of KVM_RUN, and waits
//! for its answer: VM state is only ever touched by the vCPU thread, and
//! only while the vCPU is stopped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Largest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// What to do after a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum After {
    /// Run on.
    #[default]
    Resume,
    /// Stay paused.
    Pause,
    /// End the VM (the snapshot is now the VM).
    Stop,
}

/// A request.
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
    /// Live-migrate the VM to a `ferry receive` (served by the API thread;
    /// progress lines come before the final answer).
    Migrate {
        /// The destination's address (`host:port`).
        to: String,
        /// File with the pre-shared key (none: both sides have none).
        #[serde(default)]
        key: Option<PathBuf>,
        /// Downtime budget in milliseconds.
        #[serde(default = "default_downtime_ms")]
        downtime_ms: u64,
    },
}

fn default_downtime_ms() -> u64 {
    5
}

/// Work for the vCPU thread.
#[derive(Debug)]
pub enum Job {
    /// A request from the socket.
    Api(Request, mpsc::Sender<Value>),
    /// The paused VM's state, for a migration.
    Save(mpsc::Sender<Result<crate::snapshot::VmState, String>>),
    /// The VM has moved away: it stays paused and may not resume.
    Gone(mpsc::Sender<()>),
    /// Start (true) or stop recording the frames the card reads, for a
    /// migration's capture overlap.
    Record(bool, mpsc::Sender<()>),
}

/// The queue between the API thread and the vCPU thread.
#[derive(Debug, Default)]
pub struct Control {
    queue: Mutex<VecDeque<Job>>,
    cv: Condvar,
    pending: AtomicBool,
    context: Mutex<Option<crate::migration::source::Context>>,
    /// The VM has ended: nothing serves the queue any more.
    closed: AtomicBool,
    /// Connections being answered.
    inflight: std::sync::atomic::AtomicUsize,
}

impl Control {
    /// Whether a request waits (checked by the vCPU loop after every exit).
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Gives the API thread what a migration needs (the vCPU thread does,
    /// when the VM starts).
    pub fn set_context(&self, ctx: crate::migration::source::Context) {
        *self.context.lock().expect("control context") = Some(ctx);
    }

    /// Takes the next job, waiting up to `wait` for one.
    pub fn take(&self, wait: Duration) -> Option<Job> {
        let mut q = self.queue.lock().expect("control queue");
        if q.is_empty() && !wait.is_zero() {
            q = self.cv.wait_timeout(q, wait).expect("control queue").0;
        }
        let r = q.pop_front();
        self.pending.store(!q.is_empty(), Ordering::Release);
        r
    }

    /// Marks the VM ended and waits (a little) for answers being written.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.queue.lock().expect("control queue").clear();
        let t = std::time::Instant::now();
        while self.inflight.load(Ordering::Acquire) > 0 && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn push<T>(&self, job: Job, rx: mpsc::Receiver<T>) -> Option<T> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        self.queue.lock().expect("control queue").push_back(job);
        self.pending.store(true, Ordering::Release);
        self.cv.notify_all();
        loop {
            crate::stop::kick_vcpu();
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(v) => return Some(v),
                Err(mpsc::RecvTimeoutError::Timeout) if self.closed.load(Ordering::Acquire) => {
                    return None;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Hands `req` to the vCPU thread and waits for its answer.
    pub fn submit(&self, req: Request) -> Value {
        let (tx, rx) = mpsc::channel();
        self.push(Job::Api(req, tx), rx)
            .unwrap_or_else(|| json!({"ok": false, "error": "the VM ended before answering"}))
    }

    fn ok(v: Value) -> Result<(), String> {
        if v["ok"] == true {
            Ok(())
        } else {
            Err(v["error"].as_str().unwrap_or("refused").to_string())
        }
    }

    fn migrate(
        &self,
        to: String,
        key: Option<PathBuf>,
        downtime_ms: u64,
        progress: &mut dyn FnMut(Value),
    ) -> Value {
        use crate::migration::{Key, source};
        let Some(ctx) = self.context.lock().expect("control context").clone() else {
            return error("this VM cannot migrate yet");
        };
        let key = match key {
            Some(p) => match Key::from_file(&p) {
                Ok(k) => k,
                Err(e) => return error(e),
            },
            None => Key::none(),
        };
        if !(1..=60_000).contains(&downtime_ms) {
            return error("downtime_ms must be 1 to 60000");
        }
        let params = source::Params {
            to,
            key,
            downtime: Duration::from_millis(downtime_ms),
        };
        match source::migrate(&ctx, self, &params, progress) {
            Ok(report) => report,
            Err(e) => error(format!("migration failed, the VM runs on here: {e}")),
        }
    }
}

/// An error answer.
pub fn error(msg: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": msg.to_string()})
}

fn handle(conn: UnixStream, control: &Control) {
    control.inflight.fetch_add(1, Ordering::AcqRel);
    answer(conn, control);
    control.inflight.fetch_sub(1, Ordering::AcqRel);
}

fn answer(conn: UnixStream, control: &Control) {
    let mut line = String::new();
    let mut reader = BufReader::new((&conn).take_limited());
    let mut moved = false;
    let answer = match reader.read_line(&mut line) {
        Ok(0) => return,
        Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST => {
            error("request too long")
        }
        Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Migrate {
                to,
                key,
                downtime_ms,
            }) => {
                let mut w = &conn;
                let mut progress = |p: Value| {
                    let _ = writeln!(w, "{}", json!({ "progress": p }));
                };
                let a = control.migrate(to, key, downtime_ms, &mut progress);
                moved = a["ok"] == true;
                a
            }
            Ok(req) => control.submit(req),
            Err(e) => error(format!("bad request: {e}")),
        },
        Err(e) => error(format!("reading the request: {e}")),
    };
    let mut w = &conn;
    let _ = writeln!(w, "{answer}");
    if moved {
        // The report is out: now the VM may end here.
        control.submit(Request::Stop);
    }
}

trait TakeLimited {
    fn take_limited(self) -> std::io::Take<Self>
    where
        Self: Sized;
}

impl<T: std::io::Read> TakeLimited for T {
    fn take_limited(self) -> std::io::Take<Self> {
        std::io::Read::take(self, MAX_REQUEST)
    }
}

/// Binds the socket (replacing a stale one nobody listens on) and serves
/// it on a thread.
pub fn serve(path: &Path, control: Arc<Control>) -> std::io::Result<()> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is the control socket of a running VM", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("ferry-api".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
                handle(conn, &control);
            }
        })?;
    Ok(())
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
    let conn = UnixStream::connect(path)
        .map_err(|e| format!("cannot reach the VM at {}: {e}", path.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(600))).ok();
    let mut w = &conn;
    writeln!(
        w,
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

impl crate::migration::source::VmControl for Control {
    fn pause(&self) -> Result<(), String> {
        Control::ok(self.submit(Request::Pause))
    }
    fn resume(&self) -> Result<(), String> {
        Control::ok(self.submit(Request::Resume))
    }
    fn save(&self) -> Result<crate::snapshot::VmState, String> {
        let (tx, rx) = mpsc::channel();
        self.push(Job::Save(tx), rx)
            .unwrap_or_else(|| Err("the VM ended".into()))
    }
    fn finish(&self) {
        let (tx, rx) = mpsc::channel();
        let _ = self.push(Job::Gone(tx), rx);
    }
    fn record(&self, on: bool) {
        let (tx, rx) = mpsc::channel();
        let _ = self.push(Job::Record(on, tx), rx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"snapshot","path":"/x"}"#).unwrap(),
            Request::Snapshot {
                path: "/x".into(),
                then: After::Resume
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"snapshot","path":"/x","then":"stop"}"#)
                .unwrap(),
            Request::Snapshot {
                path: "/x".into(),
                then: After::Stop
            }
        );
        for bad in [
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"snapshot"}"#,
            "nope",
            r#"{"cmd":"snapshot","path":"/x","then":"later"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_api_thread_relays_to_whoever_serves_the_queue() {
        let dir = std::env::temp_dir().join(format!("ferry-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let control = Arc::new(Control::default());
        serve(&sock, control.clone()).unwrap();
        let c2 = control.clone();
        let vcpu = std::thread::spawn(move || {
            let job = loop {
                if let Some(r) = c2.take(Duration::from_millis(50)) {
                    break r;
                }
            };
            let Job::Api(req, tx) = job else {
                panic!("not an API job")
            };
            tx.send(json!({"ok": true, "echo": format!("{req:?}")}))
                .unwrap();
        });
        let v = call(&sock, &Request::Pause).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["echo"], "Pause");
        vcpu.join().unwrap();
        // A second VM cannot take over a live socket.
        assert!(serve(&sock, control).is_err());
        std::fs::remove_dir_all(dir).ok();
    }
}
