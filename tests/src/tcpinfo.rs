//! The kernel's view of a TCP connection (`TCP_INFO`), for the paper's
//! Fig. 6: the client's windows over time around a migration.
//!
//! Read as bytes at the offsets of Linux's `struct tcp_info`
//! (include/uapi/linux/tcp.h), so fields newer than the `libc` crate's
//! copy of the struct (the peer's advertised window, `tcpi_snd_wnd`,
//! Linux 5.19+, and our own, `tcpi_rcv_wnd`, 6.7+) can be read too;
//! fields beyond the length the kernel returns are absent.

use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// One sample of a connection's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSample {
    /// Smoothed round-trip time, us.
    pub rtt_us: u32,
    /// Congestion window, segments (of what this end sends).
    pub snd_cwnd: u32,
    /// Slow-start threshold, segments.
    pub snd_ssthresh: u32,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Retransmissions over the connection's life.
    pub total_retrans: u32,
    /// Receive-buffer autotuning's estimate of the window it needs, bytes.
    pub rcv_space: u32,
    /// Bytes received over the connection's life.
    pub bytes_received: u64,
    /// The window the peer advertises to us, bytes (Linux 5.19+).
    pub snd_wnd: Option<u32>,
    /// The window we advertise to the peer, bytes (Linux 6.7+).
    pub rcv_wnd: Option<u32>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses the bytes `getsockopt(TCP_INFO)` returned.
pub fn parse(b: &[u8]) -> Option<TcpSample> {
    Some(TcpSample {
        unacked: u32_at(b, 24)?,
        rtt_us: u32_at(b, 68)?,
        snd_ssthresh: u32_at(b, 76)?,
        snd_cwnd: u32_at(b, 80)?,
        rcv_space: u32_at(b, 96)?,
        total_retrans: u32_at(b, 100)?,
        bytes_received: u64_at(b, 128)?,
        snd_wnd: u32_at(b, 228),
        rcv_wnd: u32_at(b, 232),
    })
}

/// Samples `conn` now.
pub fn sample(conn: &TcpStream) -> Option<TcpSample> {
    let mut buf = [0u8; 512];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf`, which
    // lives across the call, and stores the length it wrote in `len`.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    parse(&buf[..(len as usize).min(buf.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_at_their_offsets_and_leaves_out_what_is_missing() {
        let mut b = vec![0u8; 236];
        b[80..84].copy_from_slice(&10u32.to_ne_bytes());
        b[68..72].copy_from_slice(&250u32.to_ne_bytes());
        b[128..136].copy_from_slice(&(1u64 << 40).to_ne_bytes());
        b[228..232].copy_from_slice(&65535u32.to_ne_bytes());
        b[232..236].copy_from_slice(&131072u32.to_ne_bytes());
        let s = parse(&b).unwrap();
        assert_eq!((s.snd_cwnd, s.rtt_us, s.bytes_received), (10, 250, 1 << 40));
        assert_eq!((s.snd_wnd, s.rcv_wnd), (Some(65535), Some(131072)));
        let old = parse(&b[..232]).unwrap();
        assert_eq!((old.snd_wnd, old.rcv_wnd), (Some(65535), None));
        assert!(parse(&b[..100]).is_none());
    }

    #[test]
    fn samples_a_live_loopback_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = sample(&c).expect("TCP_INFO on a connected socket");
        assert!(s.snd_cwnd >= 1, "{s:?}");
    }
}
