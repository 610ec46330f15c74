//! The destination side: `ferry receive`. Listens, authenticates the
//! source, builds the VM as memory, state and devices arrive, captures
//! frames for it from the moment the source asks, and hands back a VM
//! ready to run (plus the connection, to confirm once it runs).

use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use super::{Error, Key, Msg, PROTOCOL_VERSION, decode_pages, expect, nonce, recv, same, send};
use crate::devices::console::Console;
use crate::memory;
use crate::snapshot::ConfigState;
use crate::vm::{Incoming, Vm};

/// A VM that arrived, ready to run, and the connection to confirm on.
pub struct Arrived {
    /// The VM (paused; `Vm::run` resumes it).
    pub vm: Vm,
    /// The source's connection: send Committed on it once the VM runs.
    pub conn: TcpStream,
    /// When the source's Commit arrived (the rest of the downtime is
    /// this side's, from here to the VM running).
    pub committed_at: std::time::Instant,
}

impl std::fmt::Debug for Arrived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arrived").field("vm", &self.vm).finish()
    }
}

fn fail<T>(w: &mut impl Write, e: Error) -> Result<T, Error> {
    let _ = send(w, Msg::Error, e.to_string().as_bytes());
    let _ = w.flush();
    Err(e)
}

/// Accepts connections on `listener` until one migrates a VM here; peers
/// that fail authentication are turned away and the wait goes on.
/// `status` gets one line per event.
pub fn receive(
    listener: &TcpListener,
    tap: Option<&str>,
    key: &Key,
    capture: bool,
    console: impl Fn() -> Console,
    status: &dyn Fn(&str),
) -> Result<Arrived, Error> {
    loop {
        let (conn, peer) = listener.accept()?;
        conn.set_nodelay(true).ok();
        conn.set_read_timeout(Some(Duration::from_secs(60))).ok();
        match authenticate(&conn, key) {
            Ok(()) => status(&format!("authenticated {peer}")),
            Err(e) => {
                status(&format!("turned away {peer}: {e}"));
                continue;
            }
        }
        return take_vm(conn, tap, capture, console(), status);
    }
}

fn authenticate(conn: &TcpStream, key: &Key) -> Result<(), Error> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = BufWriter::new(conn.try_clone()?);
    let hello = expect(&mut r, Msg::Hello)?;
    if hello.len() != 36 {
        return fail(&mut w, Error::Protocol("Hello of the wrong size".into()));
    }
    let version = u32::from_le_bytes(hello[..4].try_into().expect("4"));
    if version != PROTOCOL_VERSION {
        return fail(&mut w, Error::Version(version));
    }
    let ns = &hello[4..36];
    let nd = nonce();
    let mut ch = PROTOCOL_VERSION.to_le_bytes().to_vec();
    ch.extend_from_slice(&nd);
    ch.extend_from_slice(&key.proof(b"dst", ns, &nd));
    send(&mut w, Msg::Challenge, &ch)?;
    w.flush()?;
    let proof = expect(&mut r, Msg::Auth)?;
    if !same(&proof, &key.proof(b"src", &nd, ns)) {
        return fail(&mut w, Error::Auth);
    }
    send(&mut w, Msg::AuthOk, b"")?;
    w.flush()?;
    Ok(())
}

fn take_vm(
    conn: TcpStream,
    tap: Option<&str>,
    capture: bool,
    console: Console,
    status: &dyn Fn(&str),
) -> Result<Arrived, Error> {
    let mut r = BufReader::with_capacity(1 << 20, conn.try_clone()?);
    let mut w = BufWriter::new(conn.try_clone()?);
    let config = expect(&mut r, Msg::Config)?;
    let config: ConfigState = match parse_config(&config) {
        Ok(c) => c,
        Err(e) => return fail(&mut w, e),
    };
    let mem = match memory::create(config.memory) {
        Ok(m) => m,
        Err(e) => {
            return fail(
                &mut w,
                Error::Local(format!("cannot give the VM its memory here: {e}")),
            );
        }
    };
    let mut incoming = match Incoming::new(&config, mem, tap) {
        Ok(i) => i,
        Err(e) => {
            return fail(
                &mut w,
                Error::Local(format!("cannot set the VM up here: {e}")),
            );
        }
    };
    send(&mut w, Msg::Ready, b"")?;
    w.flush()?;
    status(&format!(
        "receiving a VM with {} MiB of memory",
        config.memory >> 20
    ));
    let mut pages = 0u64;
    // Pre-copy rounds arrive while the VM still runs on the source (maybe
    // on this machine's other core): receive them in the background.
    let mut background = Some(crate::sched::Background::enter());
    let mut urgent = None;
    loop {
        let (t, p) = recv(&mut r)?;
        match t {
            Msg::Pages => {
                let list = match decode_pages(&p) {
                    Ok(l) => l,
                    Err(e) => return fail(&mut w, e),
                };
                for (gpa, data) in list {
                    if let Err(e) = memory::write(incoming.memory(), gpa, data) {
                        return fail(
                            &mut w,
                            Error::Protocol(format!("page outside guest memory: {e}")),
                        );
                    }
                }
                pages += 1;
            }
            Msg::StartCapture => {
                // The source stops the VM next: the rest is downtime.
                drop(background.take());
                // Until this returns (the VM then runs on this thread at
                // its normal priority).
                urgent = Some(crate::sched::Urgent::enter());
                if capture {
                    incoming.start_capture();
                }
                send(&mut w, Msg::CaptureOn, b"")?;
                w.flush()?;
            }
            Msg::State => {
                let state = match crate::snapshot::decode_state("migration stream", &p) {
                    Ok(s) => s,
                    Err(e) => return fail(&mut w, Error::Protocol(e.to_string())),
                };
                let vm = match incoming.finish(&state, console) {
                    Ok(vm) => vm,
                    Err(e) => {
                        return fail(
                            &mut w,
                            Error::Local(format!("cannot load the VM's state: {e}")),
                        );
                    }
                };
                send(&mut w, Msg::StateOk, b"")?;
                w.flush()?;
                // Nothing runs until the source commits; if it goes away
                // instead, the VM is discarded here.
                expect(&mut r, Msg::Commit)?;
                let committed_at = std::time::Instant::now();
                drop(urgent.take());
                let mut vm = vm;
                if !capture {
                    // What queued in the tap meanwhile is not the VM's.
                    vm.discard_waiting_frames();
                }
                status(&format!("committed after {pages} page messages"));
                return Ok(Arrived {
                    vm,
                    conn,
                    committed_at,
                });
            }
            other => return fail(&mut w, Error::Protocol(format!("unexpected {other:?}"))),
        }
    }
}

fn parse_config(p: &[u8]) -> Result<ConfigState, Error> {
    let v: serde_json::Value =
        serde_json::from_slice(p).map_err(|e| Error::Protocol(format!("Config: {e}")))?;
    let bad = |m: &str| Error::Protocol(format!("Config: {m}"));
    let memory = v["memory"].as_u64().ok_or_else(|| bad("no memory size"))?;
    let cpus = v["cpus"].as_u64().ok_or_else(|| bad("no vCPU count"))? as u32;
    let image = v["image"]
        .as_str()
        .unwrap_or("")
        .chars()
        .take(4096)
        .collect();
    let net = match &v["net"] {
        serde_json::Value::Null => None,
        n => {
            let s = |i: usize| n[i].as_str().map(str::to_string);
            Some((
                s(0).ok_or_else(|| bad("net MAC"))?,
                s(1).ok_or_else(|| bad("net IP"))?,
                s(2),
            ))
        }
    };
    Ok(ConfigState {
        memory,
        cpus,
        image,
        net,
    })
}

/// Confirms to the source that the VM runs here.
pub fn confirm(conn: &TcpStream, info: &serde_json::Value) {
    let mut w = conn;
    let _ = send(&mut w, Msg::Committed, info.to_string().as_bytes());
}
