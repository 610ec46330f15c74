//! TCP for services: a listener with a backlog of listening sockets, and
//! streams with async read and write.

use alloc::vec;
use alloc::vec::Vec;
use core::task::Poll;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::IpEndpoint;

use super::progress;
use super::stack::{Listener, NetError, with};

/// Socket buffer sizes and how many connections may be half-open at once.
#[derive(Clone, Copy, Debug)]
pub struct BufferSizes {
    /// Receive buffer per connection.
    pub rx: usize,
    /// Send buffer per connection.
    pub tx: usize,
    /// Sockets kept in LISTEN. They are topped up after every received
    /// packet, so this bounds the SYNs that may arrive in one frame batch
    /// between two checks, not the connections waiting to be accepted.
    pub backlog: usize,
}

impl Default for BufferSizes {
    fn default() -> Self {
        BufferSizes {
            rx: 64 * 1024,
            tx: 64 * 1024,
            backlog: 2,
        }
    }
}

/// Accepts connections on a port.
#[derive(Debug)]
pub struct TcpListener {
    id: usize,
    port: u16,
}

/// A socket listening on `port` with buffers of `sizes`, or None if smoltcp
/// refuses the port.
pub(super) fn listening_socket(port: u16, sizes: &BufferSizes) -> Option<tcp::Socket<'static>> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; sizes.rx]),
        tcp::SocketBuffer::new(vec![0; sizes.tx]),
    );
    s.set_nagle_enabled(false);
    s.listen(port).ok()?;
    Some(s)
}

impl TcpListener {
    /// Listens on `port` of the guest's address.
    pub fn bind(port: u16, sizes: BufferSizes) -> Result<TcpListener, NetError> {
        if port == 0 || sizes.backlog == 0 || sizes.rx == 0 || sizes.tx == 0 {
            return Err(NetError::Bind(port));
        }
        listening_socket(port, &sizes).ok_or(NetError::Bind(port))?;
        let id = with(|st| {
            if st.listeners.iter().flatten().any(|l| l.port == port) {
                return Err(NetError::Bind(port));
            }
            st.listeners.push(Some(Listener {
                port,
                sizes,
                sockets: Vec::new(),
            }));
            st.replenish();
            Ok(st.listeners.len() - 1)
        })?;
        Ok(TcpListener { id, port })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next established connection.
    pub async fn accept(&mut self) -> TcpStream {
        core::future::poll_fn(|_| {
            with(|st| {
                let l = st.listeners[self.id].as_mut().expect("listener lives");
                let sockets = &st.sockets;
                let ready = l.sockets.iter().position(|&h| {
                    matches!(
                        sockets.get::<tcp::Socket>(h).state(),
                        State::Established | State::CloseWait
                    )
                });
                match ready {
                    Some(i) => {
                        let h = l.sockets.swap_remove(i);
                        progress();
                        Poll::Ready(TcpStream { h })
                    }
                    None => Poll::Pending,
                }
            })
        })
        .await
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        with(|st| {
            if let Some(l) = st.listeners[self.id].take() {
                for h in l.sockets {
                    st.sockets.get_mut::<tcp::Socket>(h).abort();
                    st.closing.push(h);
                }
            }
        });
    }
}

/// An open connection. Dropping it closes it gracefully (FIN after the
/// data already queued); the socket goes away once closed.
#[derive(Debug)]
pub struct TcpStream {
    h: SocketHandle,
}

impl TcpStream {
    fn with<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> R {
        with(|st| f(st.sockets.get_mut::<tcp::Socket>(self.h)))
    }

    /// The peer's address and port.
    pub fn peer(&self) -> Option<IpEndpoint> {
        self.with(|s| s.remote_endpoint())
    }

    /// Reads what has arrived, waiting for at least one byte. `Ok(0)` when
    /// the peer has closed its side and everything was read.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, NetError> {
        core::future::poll_fn(|_| {
            self.with(|s| {
                if s.can_recv() {
                    let n = s.recv_slice(buf).unwrap_or(0);
                    progress();
                    return Poll::Ready(Ok(n));
                }
                if !s.may_recv() {
                    progress();
                    return Poll::Ready(match s.state() {
                        State::Closed if s.remote_endpoint().is_none() => Err(NetError::Reset),
                        _ => Ok(0),
                    });
                }
                Poll::Pending
            })
        })
        .await
    }

    /// Lets `f` consume received bytes in place; it returns how many it
    /// took (and a result). Waits for at least one byte; `Ok(None)` at the
    /// end of the stream.
    pub async fn read_with<R>(
        &mut self,
        mut f: impl FnMut(&[u8]) -> (usize, R),
    ) -> Result<Option<R>, NetError> {
        core::future::poll_fn(|_| {
            self.with(|s| {
                if s.can_recv() {
                    let r = s.recv(|b| f(b)).ok();
                    progress();
                    return Poll::Ready(Ok(r));
                }
                if !s.may_recv() {
                    progress();
                    return Poll::Ready(Ok(None));
                }
                Poll::Pending
            })
        })
        .await
    }

    /// Queues as much of `data` as fits, waiting for room for at least one
    /// byte.
    pub async fn write(&mut self, data: &[u8]) -> Result<usize, NetError> {
        if data.is_empty() {
            return Ok(0);
        }
        core::future::poll_fn(|_| {
            self.with(|s| {
                if !s.may_send() {
                    return Poll::Ready(Err(if s.state() == State::Closed {
                        NetError::Reset
                    } else {
                        NetError::Closed
                    }));
                }
                if s.can_send() {
                    let n = s.send_slice(data).unwrap_or(0);
                    if n > 0 {
                        progress();
                        return Poll::Ready(Ok(n));
                    }
                }
                Poll::Pending
            })
        })
        .await
    }

    /// Queues all of `data`.
    pub async fn write_all(&mut self, mut data: &[u8]) -> Result<(), NetError> {
        while !data.is_empty() {
            let n = self.write(data).await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Lets `f` fill free send-buffer space in place (returns bytes
    /// written); waits for room for at least `min` bytes.
    pub async fn write_with(
        &mut self,
        min: usize,
        mut f: impl FnMut(&mut [u8]) -> usize,
    ) -> Result<usize, NetError> {
        core::future::poll_fn(|_| {
            self.with(|s| {
                if !s.may_send() {
                    return Poll::Ready(Err(NetError::Closed));
                }
                let room = s.send_capacity() - s.send_queue();
                if room >= min.max(1) {
                    let n = s.send(|b| {
                        let n = f(b);
                        (n, n)
                    });
                    progress();
                    return Poll::Ready(n.map_err(|_| NetError::Closed));
                }
                Poll::Pending
            })
        })
        .await
    }

    /// Whether received bytes are waiting to be read.
    pub fn recv_ready(&self) -> bool {
        self.with(|s| s.can_recv())
    }

    /// Free space in the send buffer now.
    pub fn send_room(&self) -> usize {
        self.with(|s| s.send_capacity() - s.send_queue())
    }

    /// Closes the sending side (FIN once queued data is out); reading goes on.
    pub fn shutdown(&mut self) {
        self.with(|s| s.close());
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        with(|st| {
            st.sockets.get_mut::<tcp::Socket>(self.h).close();
            st.closing.push(self.h);
        });
    }
}
