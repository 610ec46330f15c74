//! A minimal QMP client, for benchmarks that drive QEMU beside Ferry.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;

/// A QMP connection (capabilities negotiated).
#[derive(Debug)]
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    /// Connects to QEMU's `-qmp unix:SOCK,server,nowait`, waiting up to
    /// 30 s for the socket.
    pub fn connect(sock: &Path) -> Result<Qmp> {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => bail!("QMP {}: {e}", sock.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.cmd(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    /// Polls `query-migrate` until the migration completed (its status
    /// then) or failed, was cancelled or took longer than `limit`.
    pub fn wait_migration(&mut self, limit: Duration) -> Result<Value> {
        let t = Instant::now();
        loop {
            let st = self.cmd(r#"{"execute":"query-migrate"}"#)?;
            match st["status"].as_str() {
                Some("completed") => return Ok(st),
                Some("failed") | Some("cancelled") => bail!("QEMU migration: {st}"),
                _ if t.elapsed() > limit => bail!("QEMU migration not done after {limit:?}"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Sends a command; returns its `return` value (events are skipped).
    pub fn cmd(&mut self, json: &str) -> Result<Value> {
        writeln!(self.w, "{json}")?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                bail!("QMP closed");
            }
            let v: Value = serde_json::from_str(&line)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {json}: {e}");
            }
        }
    }
}
