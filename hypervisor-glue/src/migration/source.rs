//! The source side: runs on the control API thread while the vCPU runs,
//! and asks the vCPU thread (through [`crate::control::Control`]) to pause,
//! save its state, resume or end.

use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use serde_json::{Value, json};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{
    Error, Key, Msg, PAGE, PAGES_PER_MESSAGE, PROTOCOL_VERSION, encode_pages, expect, nonce, same,
    send,
};
use crate::kvm::Machine;
use crate::memory::GuestRam;
use crate::snapshot::{ConfigState, VmState};

/// KVM_MEM_LOG_DIRTY_PAGES.
const LOG_DIRTY: u32 = 1;
/// Most pre-copy rounds before stopping anyway.
const MAX_ROUNDS: u32 = 30;

/// What the source needs of the running VM, shared with the API thread.
#[derive(Clone, Debug)]
pub struct Context {
    /// The KVM VM (for the dirty log).
    pub machine: Arc<Machine>,
    /// Guest memory.
    pub mem: GuestRam,
    /// Its configuration.
    pub config: ConfigState,
}

/// What the vCPU thread does for a migration.
pub trait VmControl {
    /// Stops the vCPU and devices.
    fn pause(&self) -> Result<(), String>;
    /// Runs them again (a failed migration).
    fn resume(&self) -> Result<(), String>;
    /// The paused VM's state.
    fn save(&self) -> Result<VmState, String>;
    /// Ends the VM here (it runs on the destination now).
    fn finish(&self);
    /// Starts or stops recording the frames the card reads (the capture
    /// overlap the destination drops).
    fn record(&self, on: bool);
}

/// Parameters of a migration.
#[derive(Clone, Debug)]
pub struct Params {
    /// The destination's `ferry receive --listen` address.
    pub to: String,
    /// The pre-shared key.
    pub key: Key,
    /// How long the VM may be stopped.
    pub downtime: Duration,
}

fn slots(mem: &GuestRam) -> Vec<kvm_userspace_memory_region> {
    mem.iter()
        .enumerate()
        .map(|(slot, r)| kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        })
        .collect()
}

fn set_dirty_logging(ctx: &Context, on: bool) -> Result<(), Error> {
    for mut r in slots(&ctx.mem) {
        r.flags = if on { LOG_DIRTY } else { 0 };
        // SAFETY: the same live mapping of `mem` that is registered already;
        // only the flags change. `mem` outlives the VM (the Vm owns both).
        unsafe { ctx.machine.vm.set_user_memory_region(r) }.map_err(|e| {
            Error::Local(format!("KVM_SET_USER_MEMORY_REGION (dirty logging): {e}"))
        })?;
    }
    Ok(())
}

/// Pages dirtied since the last call, by KVM (the vCPU) or by the VMM
/// (device writes): guest-physical addresses, ascending.
fn collect_dirty(ctx: &Context) -> Result<Vec<u64>, Error> {
    let mut out = Vec::new();
    for (slot, r) in ctx.mem.iter().enumerate() {
        let kvm = ctx
            .machine
            .vm
            .get_dirty_log(slot as u32, r.len() as usize)
            .map_err(|e| Error::Local(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let bitmap: &vm_memory::bitmap::AtomicBitmap = std::ops::Deref::deref(r).bitmap();
        let vmm = bitmap.get_and_reset();
        let pages = r.len() as usize / PAGE;
        for i in 0..pages {
            let (w, b) = (i / 64, i % 64);
            let k = kvm.get(w).is_some_and(|x| x >> b & 1 == 1);
            let v = vmm.get(w).is_some_and(|x| x >> b & 1 == 1);
            if k || v {
                out.push(r.start_addr().0 + (i * PAGE) as u64);
            }
        }
    }
    Ok(out)
}

/// Sends pages (read from guest memory now); returns bytes sent. With
/// `skip_zero`, pages of zeros are left out (the destination's memory
/// starts zeroed).
fn send_pages(
    w: &mut impl Write,
    mem: &GuestRam,
    gpas: impl Iterator<Item = u64>,
    skip_zero: bool,
) -> Result<u64, Error> {
    let mut bytes = 0u64;
    let mut batch: Vec<(u64, [u8; PAGE])> = Vec::with_capacity(PAGES_PER_MESSAGE);
    let flush = |batch: &mut Vec<(u64, [u8; PAGE])>, w: &mut dyn Write| -> Result<u64, Error> {
        if batch.is_empty() {
            return Ok(0);
        }
        let refs: Vec<(u64, &[u8])> = batch.iter().map(|(g, d)| (*g, &d[..])).collect();
        let enc = encode_pages(&refs);
        send(&mut &mut *w, Msg::Pages, &enc)?;
        batch.clear();
        Ok(enc.len() as u64)
    };
    for gpa in gpas {
        let mut page = [0u8; PAGE];
        mem.read_slice(&mut page, GuestAddress(gpa))
            .map_err(|e| Error::Local(format!("reading guest page {gpa:#x}: {e}")))?;
        if skip_zero && page.iter().all(|&b| b == 0) {
            continue;
        }
        batch.push((gpa, page));
        if batch.len() == PAGES_PER_MESSAGE {
            bytes += flush(&mut batch, w)?;
        }
    }
    bytes += flush(&mut batch, w)?;
    Ok(bytes)
}

fn all_pages(mem: &GuestRam) -> Vec<u64> {
    mem.iter()
        .flat_map(|r| {
            let start = r.start_addr().0;
            (0..r.len() / PAGE as u64).map(move |i| start + i * PAGE as u64)
        })
        .collect()
}

fn connect(to: &str) -> Result<TcpStream, Error> {
    let addrs: Vec<SocketAddr> = to
        .to_socket_addrs()
        .map_err(|e| Error::Local(format!("{to}: {e}")))?
        .collect();
    let addr = addrs
        .first()
        .ok_or_else(|| Error::Local(format!("{to}: no address")))?;
    let s = TcpStream::connect_timeout(addr, Duration::from_secs(5))
        .map_err(|e| Error::Local(format!("cannot connect to the destination {to}: {e}")))?;
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    s.set_write_timeout(Some(Duration::from_secs(60))).ok();
    Ok(s)
}

/// Moves the VM to `params.to`. On any failure before Commit, the VM runs
/// on here. `progress` gets a JSON object after every step.
pub fn migrate(
    ctx: &Context,
    vm: &dyn VmControl,
    params: &Params,
    progress: &mut dyn FnMut(Value),
) -> Result<Value, Error> {
    let t0 = Instant::now();
    let stream = connect(&params.to)?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = BufWriter::with_capacity(1 << 20, stream.try_clone()?);

    // Hello and mutual authentication.
    let ns = nonce();
    let mut hello = PROTOCOL_VERSION.to_le_bytes().to_vec();
    hello.extend_from_slice(&ns);
    send(&mut w, Msg::Hello, &hello)?;
    w.flush()?;
    let ch = expect(&mut r, Msg::Challenge)?;
    if ch.len() != 68 {
        return Err(Error::Protocol("Challenge of the wrong size".into()));
    }
    let version = u32::from_le_bytes(ch[..4].try_into().expect("4"));
    if version != PROTOCOL_VERSION {
        return Err(Error::Version(version));
    }
    let nd = &ch[4..36];
    if !same(&ch[36..68], &params.key.proof(b"dst", &ns, nd)) {
        return Err(Error::Auth);
    }
    send(&mut w, Msg::Auth, &params.key.proof(b"src", nd, &ns))?;
    w.flush()?;
    expect(&mut r, Msg::AuthOk)?;

    let config = serde_json::to_vec(&json!({
        "memory": ctx.config.memory, "cpus": ctx.config.cpus, "image": ctx.config.image,
        "net": ctx.config.net,
    }))
    .expect("config serializes");
    send(&mut w, Msg::Config, &config)?;
    w.flush()?;
    expect(&mut r, Msg::Ready)?;
    progress(json!({"phase": "connected", "ms": t0.elapsed().as_millis() as u64}));

    // Pre-copy.
    set_dirty_logging(ctx, true)?;
    let result = precopy_and_commit(ctx, vm, params, &mut r, &mut w, progress, t0);
    if result.is_err() {
        let _ = set_dirty_logging(ctx, false);
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn precopy_and_commit(
    ctx: &Context,
    vm: &dyn VmControl,
    params: &Params,
    r: &mut impl std::io::Read,
    w: &mut BufWriter<TcpStream>,
    progress: &mut dyn FnMut(Value),
    t0: Instant,
) -> Result<Value, Error> {
    let _ = collect_dirty(ctx)?; // start from a clean log
    // While the VM runs, copying yields the CPU to it.
    let background = crate::sched::Background::enter();
    let total_pages = all_pages(&ctx.mem).len() as u64;
    let mut bytes = 0u64;
    let mut rounds = Vec::new();
    let t = Instant::now();
    let b = send_pages(w, &ctx.mem, all_pages(&ctx.mem).into_iter(), true)?;
    w.flush()?;
    bytes += b;
    let mut bandwidth = b as f64 / t.elapsed().as_secs_f64().max(1e-6);
    rounds.push(json!({"round": 0, "bytes": b, "ms": t.elapsed().as_secs_f64() * 1e3}));
    progress(json!({"phase": "precopy", "round": 0, "bytes": bytes, "pages_total": total_pages}));
    let mut pending;
    let mut last = u64::MAX;
    let mut stalls = 0;
    loop {
        pending = collect_dirty(ctx)?;
        let dirty_bytes = pending.len() as u64 * PAGE as u64;
        let budget = bandwidth * params.downtime.as_secs_f64();
        let round = rounds.len() as u32;
        if (dirty_bytes as f64) <= budget || round >= MAX_ROUNDS || stalls >= 3 {
            break;
        }
        stalls = if pending.len() as u64 >= last {
            stalls + 1
        } else {
            0
        };
        last = pending.len() as u64;
        let t = Instant::now();
        let b = send_pages(w, &ctx.mem, pending.iter().copied(), false)?;
        w.flush()?;
        bytes += b;
        bandwidth = (b as f64 / t.elapsed().as_secs_f64().max(1e-6)).max(1.0);
        rounds.push(json!({"round": round, "pages": pending.len(), "bytes": b, "ms": t.elapsed().as_secs_f64() * 1e3}));
        progress(
            json!({"phase": "precopy", "round": round, "bytes": bytes, "dirty_pages": pending.len()}),
        );
    }

    // Capture at the destination, then stop and copy (at full priority:
    // the VM waits for it). Frames read here from now on are recorded, so
    // the destination can drop its copies.
    drop(background);
    let _urgent = crate::sched::Urgent::enter();
    vm.record(true);
    let capture_on = send(w, Msg::StartCapture, b"")
        .and_then(|()| w.flush().map_err(Error::from))
        .and_then(|()| expect(r, Msg::CaptureOn).map(|_| ()));
    if let Err(e) = capture_on {
        vm.record(false);
        return Err(e);
    }
    let t_pause = Instant::now();
    vm.pause().map_err(Error::Local)?;
    // Where the downtime goes, in ms from the pause.
    let mut phases = serde_json::Map::new();
    let mut mark = |name: &str| {
        phases.insert(name.into(), json!(t_pause.elapsed().as_secs_f64() * 1e3));
    };
    mark("paused");
    let stop_and_copy = (|| -> Result<(u64, usize), Error> {
        let mut last_pages = pending;
        last_pages.extend(collect_dirty(ctx)?);
        last_pages.sort_unstable();
        last_pages.dedup();
        let n = last_pages.len();
        mark("dirty_collected");
        let b = send_pages(w, &ctx.mem, last_pages.into_iter(), false)?;
        mark("pages_sent");
        let state = vm.save().map_err(Error::Local)?;
        let enc = crate::snapshot::encode_state(&state).map_err(|e| Error::Local(e.to_string()))?;
        mark("state_saved");
        send(w, Msg::State, &enc)?;
        w.flush()?;
        mark("state_sent");
        expect(r, Msg::StateOk)?;
        mark("state_loaded_there");
        Ok((b + enc.len() as u64, n))
    })();
    let (b, last_n) = match stop_and_copy {
        Ok(x) => x,
        Err(e) => {
            // Not committed: the VM runs on here.
            let _ = set_dirty_logging(ctx, false);
            vm.record(false);
            vm.resume().map_err(Error::Local)?;
            return Err(e);
        }
    };
    bytes += b;
    // The point of no return: after Commit the VM never runs here again.
    let commit = send(w, Msg::Commit, b"").and_then(|()| w.flush().map_err(Error::from));
    if let Err(e) = commit {
        // The destination cannot have resumed without the Commit message.
        let _ = set_dirty_logging(ctx, false);
        vm.record(false);
        vm.resume().map_err(Error::Local)?;
        return Err(e);
    }
    let committed = expect(r, Msg::Committed);
    let downtime = t_pause.elapsed();
    mark("running_there");
    vm.finish();
    let dest: Value = match committed {
        Ok(p) => serde_json::from_slice(&p).unwrap_or(Value::Null),
        Err(e) => {
            // Committed may be lost with the destination already running;
            // the VM must not run here in any case.
            return Err(Error::Local(format!(
                "committed, but the destination did not confirm ({e}); the VM is no longer running here"
            )));
        }
    };
    Ok(json!({
        "ok": true,
        "rounds": rounds.len(),
        "precopy": rounds,
        "last_pages": last_n,
        "bytes": bytes,
        "downtime_ms": downtime.as_secs_f64() * 1e3,
        "downtime_phases_ms": phases,
        "total_ms": t0.elapsed().as_secs_f64() * 1e3,
        "destination": dest,
    }))
}
