//! `stream-client`: reads the `stream` app's byte stream, checks every byte
//! (`ferry_abi::stream`), and reports bytes verified, throughput and the
//! gaps between arrivals (the paper's migration delay is the largest).
//! Optionally keeps sending upstream at a rate, so that frames flow towards
//! the service too, and samples the kernel's view of its connections
//! (`TCP_INFO`: windows, cwnd, RTT) over time.
//!
//! Exit status: 0 if everything read was verified and the target reached,
//! 1 on a verification failure or connection error, 2 on bad arguments.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "Read and verify the stream app's byte stream; report throughput and arrival gaps"
)]
struct Args {
    /// The service, e.g. 10.77.0.10:5001.
    addr: SocketAddr,
    /// Stop after this many verified bytes (0 = no limit).
    #[arg(long, default_value_t = 0)]
    bytes: u64,
    /// Stop after this many seconds (0 = no limit).
    #[arg(long, default_value_t = 0.0)]
    seconds: f64,
    /// Also send this many bytes per second upstream (0 = none).
    #[arg(long, default_value_t = 0)]
    upstream: u64,
    /// Report arrival gaps longer than this many milliseconds individually
    /// (the --max-gaps largest).
    #[arg(long, default_value_t = 50.0)]
    gap_ms: f64,
    /// How many of the gaps longer than --gap-ms to report.
    #[arg(long, default_value_t = 100)]
    max_gaps: usize,
    /// Give up if nothing arrives for this many seconds.
    #[arg(long, default_value_t = 30.0)]
    idle_timeout: f64,
    /// Also keep an echo conversation with this address (the stream app's
    /// `echo=PORT`): verifiable bytes go up at --echo-rate and every byte
    /// that comes back is checked.
    #[arg(long)]
    echo: Option<SocketAddr>,
    /// Also report bytes received per window of this many milliseconds
    /// (throughput over time); 0 = no.
    #[arg(long, default_value_t = 0)]
    windows_ms: u64,
    /// Bytes per second sent to --echo.
    #[arg(long, default_value_t = 20_000)]
    echo_rate: u64,
    /// Sample TCP_INFO of the stream (and echo) connection every this many
    /// milliseconds and report the samples (`tcp_info`); 0 = no.
    #[arg(long, default_value_t = 0)]
    tcp_info_ms: u64,
    /// Stop (and report) once this file exists: for tests that end the
    /// client when they have seen what they need.
    #[arg(long)]
    stop_file: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The echo conversation: (bytes sent, bytes verified, error).
fn echo_run(
    conn: TcpStream,
    rate: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u64, u64, Option<String>) {
    use std::sync::atomic::Ordering::Relaxed;
    conn.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let mut w = conn.try_clone().expect("clone");
    let stop_w = stop.clone();
    let sent_so_far = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent_w = sent_so_far.clone();
    let writer = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut sent = 0u64;
        let mut chunk = vec![0u8; 512];
        while !stop_w.load(Relaxed) {
            let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
            if sent < due {
                ferry_abi::stream::fill(&mut chunk, sent);
                if w.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len() as u64;
                sent_w.store(sent, Relaxed);
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        sent
    });
    let mut r = conn;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut error = None;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if stop.load(Relaxed) && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + Duration::from_secs(5));
        }
        match r.read(&mut buf) {
            Ok(0) => {
                error = Some(format!("echo: the service closed after {got} bytes"));
                break;
            }
            Ok(n) => {
                if let Err(i) = ferry_abi::stream::check(&buf[..n], got) {
                    error = Some(format!("echo: byte {} came back wrong", got + i as u64));
                    break;
                }
                got += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                error = Some(format!("echo: read after {got} bytes: {e}"));
                break;
            }
        }
        if drain_deadline.is_some() && writer.is_finished() && got >= sent_so_far.load(Relaxed) {
            break;
        }
        if let Some(d) = drain_deadline
            && Instant::now() > d
        {
            // A writer stuck on a peer that is gone: cut it loose.
            let _ = r.shutdown(std::net::Shutdown::Both);
            break;
        }
    }
    let sent = writer.join().unwrap_or(0);
    if error.is_none() && got < sent {
        error = Some(format!("echo: {sent} bytes sent, {got} came back"));
    }
    let _ = r.shutdown(std::net::Shutdown::Both);
    (sent, got, error)
}

/// Samples the stream connection (and the echo one) every `every` until
/// `stop`: one JSON object per sample, `t` in seconds since `start`. The
/// stream's fields are what the client receives with (`rcv_wnd`: the window
/// it advertises; `snd_wnd`: the service's); `echo_*` are the upstream
/// sender's (its cwnd collapses if a migration costs it a timeout).
fn sample_tcp_info(
    stream: &TcpStream,
    echo: Option<&TcpStream>,
    start: Instant,
    every: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<String> {
    use ferry_tests::tcpinfo;
    let opt = |v: Option<u32>| v.map_or("null".to_string(), |v| v.to_string());
    let mut out = Vec::new();
    let mut next = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && out.len() < 1_000_000 {
        let t = start.elapsed().as_secs_f64();
        if let Some(s) = tcpinfo::sample(stream) {
            let mut line = format!(
                "{{\"t\":{t:.3},\"rtt_us\":{},\"rcv_space\":{},\"rcv_wnd\":{},\"snd_wnd\":{},\"bytes\":{}",
                s.rtt_us,
                s.rcv_space,
                opt(s.rcv_wnd),
                opt(s.snd_wnd),
                s.bytes_received
            );
            if let Some(e) = echo.and_then(tcpinfo::sample) {
                line.push_str(&format!(
                    ",\"echo_cwnd\":{},\"echo_ssthresh\":{},\"echo_rtt_us\":{},\"echo_unacked\":{},\"echo_retrans\":{},\"echo_snd_wnd\":{}",
                    e.snd_cwnd,
                    e.snd_ssthresh,
                    e.rtt_us,
                    e.unacked,
                    e.total_retrans,
                    opt(e.snd_wnd)
                ));
            }
            line.push('}');
            out.push(line);
        }
        next += every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    out
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let start = Instant::now();
    let start_monotonic_s = ferry_tests::monotonic_s();
    let mut conn = match TcpStream::connect_timeout(&a.addr, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stream-client: cannot connect to {}: {e}", a.addr);
            return std::process::ExitCode::from(1);
        }
    };
    // Short reads, so that --seconds and --stop-file are noticed while
    // nothing arrives; --idle-timeout is counted here.
    conn.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let idle_limit = Duration::from_secs_f64(a.idle_timeout.max(0.1));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upstream = (a.upstream > 0).then(|| {
        let mut w = conn.try_clone().expect("clone socket");
        let rate = a.upstream;
        let stop = stop.clone();
        std::thread::spawn(move || {
            let chunk = vec![b'u'; 1024];
            let t0 = Instant::now();
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
                if sent < due {
                    if w.write_all(&chunk).is_err() {
                        return sent;
                    }
                    sent += chunk.len() as u64;
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            sent
        })
    });
    let echo_conn = match a.echo.map(|addr| {
        TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("echo: cannot connect to {addr}: {e}"))
    }) {
        Some(Err(e)) => {
            eprintln!("stream-client: {e}");
            return std::process::ExitCode::from(1);
        }
        Some(Ok(c)) => Some(c),
        None => None,
    };
    let sampler = (a.tcp_info_ms > 0).then(|| {
        let stream = conn.try_clone().expect("clone socket");
        let echo = echo_conn
            .as_ref()
            .map(|c| c.try_clone().expect("clone socket"));
        let stop = stop.clone();
        let every = Duration::from_millis(a.tcp_info_ms);
        std::thread::spawn(move || sample_tcp_info(&stream, echo.as_ref(), start, every, &stop))
    });
    let echo = echo_conn.map(|conn| {
        let stop = stop.clone();
        let rate = a.echo_rate;
        std::thread::spawn(move || echo_run(conn, rate, stop))
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut windows: Vec<u64> = Vec::new();
    let mut verified = 0u64;
    let mut last = Instant::now();
    let mut max_gap = Duration::ZERO;
    let mut gaps: Vec<(f64, f64)> = Vec::new();
    let mut error: Option<String> = None;
    loop {
        if a.bytes > 0 && verified >= a.bytes {
            break;
        }
        if a.seconds > 0.0 && start.elapsed().as_secs_f64() >= a.seconds {
            break;
        }
        if a.stop_file.as_ref().is_some_and(|f| f.exists()) {
            break;
        }
        let n = match conn.read(&mut buf) {
            Ok(0) => {
                if a.bytes > 0 && verified < a.bytes {
                    error = Some(format!(
                        "the service closed the stream after {verified} bytes"
                    ));
                }
                break;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if last.elapsed() > idle_limit {
                    error = Some(format!(
                        "nothing arrived for {:.1} s after {verified} bytes",
                        idle_limit.as_secs_f64()
                    ));
                    break;
                }
                continue;
            }
            Err(e) => {
                error = Some(format!("read after {verified} bytes: {e}"));
                break;
            }
        };
        let now = Instant::now();
        let gap = now - last;
        if verified > 0 {
            max_gap = max_gap.max(gap);
            if gap.as_secs_f64() * 1e3 > a.gap_ms {
                gaps.push(((now - start).as_secs_f64(), gap.as_secs_f64() * 1e3));
            }
        }
        last = now;
        if let Some(w) = ((now - start).as_millis() as u64).checked_div(a.windows_ms) {
            if windows.len() <= w as usize {
                windows.resize(w as usize + 1, 0);
            }
            windows[w as usize] += n as u64;
        }
        if let Err(i) = ferry_abi::stream::check(&buf[..n], verified) {
            error = Some(format!(
                "byte {} of the stream is wrong",
                verified + i as u64
            ));
            break;
        }
        verified += n as u64;
    }
    // Keep the largest gaps, in time order.
    gaps.sort_by(|a, b| b.1.total_cmp(&a.1));
    gaps.truncate(a.max_gaps);
    gaps.sort_by(|a, b| a.0.total_cmp(&b.0));
    let secs = start.elapsed().as_secs_f64();
    if a.windows_ms > 0 {
        // Windows with nothing in them, up to the end, count too.
        let all = (secs * 1e3 / a.windows_ms as f64).ceil() as usize;
        if windows.len() < all {
            windows.resize(all, 0);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Segments this end sent again on the stream's connection (its
    // upstream bytes and ACKs), before it closes.
    let retransmits = ferry_tests::tcpinfo::sample(&conn).map_or(0, |s| s.total_retrans);
    let _ = conn.shutdown(std::net::Shutdown::Both);
    drop(conn);
    let up = upstream.map(|h| h.join().unwrap_or(0)).unwrap_or(0);
    let (echo_sent, echo_verified, echo_error) = echo
        .map(|h| h.join().unwrap_or((0, 0, Some("echo thread died".into()))))
        .unwrap_or((0, 0, None));
    if error.is_none() {
        error = echo_error;
    }
    let tcp_info = sampler
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();
    let rate = verified as f64 / secs.max(1e-9);
    if a.json {
        let gaps_json: Vec<String> = gaps
            .iter()
            .map(|(t, g)| format!("{{\"at_s\":{t:.3},\"gap_ms\":{g:.3}}}"))
            .collect();
        println!(
            "{{\"bytes_verified\":{verified},\"seconds\":{secs:.3},\"bytes_per_second\":{rate:.0},\"max_gap_ms\":{:.3},\"gaps\":[{}],\"upstream_bytes\":{up},\"echo_bytes_sent\":{echo_sent},\"echo_bytes_verified\":{echo_verified},\"windows\":{windows:?},\"tcp_info\":[{}],\"retransmits\":{retransmits},\"start_monotonic_s\":{start_monotonic_s:.6},\"error\":{}}}",
            max_gap.as_secs_f64() * 1e3,
            gaps_json.join(","),
            tcp_info.join(","),
            error
                .as_ref()
                .map_or("null".to_string(), |e| format!("{e:?}"))
        );
    } else {
        println!(
            "stream-client: {verified} bytes verified in {secs:.2} s ({:.2} MB/s), largest gap between arrivals {:.2} ms, {up} bytes sent upstream, echo {echo_verified} of {echo_sent} bytes verified",
            rate / 1e6,
            max_gap.as_secs_f64() * 1e3
        );
        for (t, g) in &gaps {
            println!("stream-client: gap of {g:.1} ms at {t:.3} s");
        }
        if let Some(e) = &error {
            println!("stream-client: ERROR: {e}");
        }
    }
    std::process::ExitCode::from(u8::from(error.is_some()))
}
