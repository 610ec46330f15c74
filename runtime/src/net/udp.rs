//! UDP for services: a socket bound to a port of the guest's address, with
//! async receive and a send that queues a datagram.

use alloc::vec;
use core::task::Poll;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use smoltcp::wire::IpEndpoint;

use super::progress;
use super::stack::{NetError, with};

/// A UDP socket on one port.
#[derive(Debug)]
pub struct UdpSocket {
    h: SocketHandle,
    port: u16,
}

impl UdpSocket {
    /// Binds `port`, with room for `datagrams` datagrams of up to
    /// `max_size` bytes each way (datagrams that find it full are dropped,
    /// as a kernel's socket buffer drops them).
    pub fn bind(port: u16, datagrams: usize, max_size: usize) -> Result<UdpSocket, NetError> {
        if port == 0 || datagrams == 0 || max_size == 0 {
            return Err(NetError::Bind(port));
        }
        let buffer = || {
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; datagrams],
                vec![0; datagrams * max_size],
            )
        };
        let mut s = udp::Socket::new(buffer(), buffer());
        s.bind(port).map_err(|_| NetError::Bind(port))?;
        let h = with(|st| {
            let taken = st.sockets.iter().any(|(_, sock)| {
                matches!(sock, smoltcp::socket::Socket::Udp(u) if u.endpoint().port == port)
            });
            if taken {
                return Err(NetError::Bind(port));
            }
            Ok(st.sockets.add(s))
        })?;
        Ok(UdpSocket { h, port })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next datagram: the bytes copied into `buf` (a longer datagram
    /// is cut to fit) and its sender.
    pub async fn recv_from(&mut self, buf: &mut [u8]) -> (usize, IpEndpoint) {
        core::future::poll_fn(|_| {
            with(|st| {
                let s = st.sockets.get_mut::<udp::Socket>(self.h);
                match s.recv() {
                    Ok((data, meta)) => {
                        let n = data.len().min(buf.len());
                        buf[..n].copy_from_slice(&data[..n]);
                        progress();
                        Poll::Ready((n, meta.endpoint))
                    }
                    Err(_) => Poll::Pending,
                }
            })
        })
        .await
    }

    /// Queues `data` for `to`; `Err(NotSent)` when the send buffer is full
    /// or `to` cannot be reached.
    pub fn send_to(&mut self, data: &[u8], to: IpEndpoint) -> Result<(), NetError> {
        with(|st| {
            let s = st.sockets.get_mut::<udp::Socket>(self.h);
            s.send_slice(data, to).map_err(|_| NetError::NotSent)?;
            progress();
            Ok(())
        })
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        with(|st| {
            st.sockets.remove(self.h);
        });
    }
}
