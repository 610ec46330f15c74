//! The one network stack: the card, the smoltcp interface and its sockets.

use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;
use core::sync::atomic::Ordering;

use smoltcp::iface::{Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpCidr, Ipv4Address,
};

use super::Local;
use crate::arch::cpu;
use crate::arch::idt::DEVICE_INTERRUPT;
use crate::drivers::virtio_net::NetCard;
use crate::time::Instant;

/// What can go wrong, for the network or a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetError {
    /// The runtime arguments lack or garble the IP settings.
    Config(alloc::string::String),
    /// The card could not be brought up.
    Card(alloc::string::String),
    /// A port is already in use or invalid.
    Bind(u16),
    /// The peer reset the connection, or it timed out.
    Reset,
    /// The connection is closed for writing.
    Closed,
    /// A datagram found no room in its socket's send buffer, or no route.
    NotSent,
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::Config(m) => write!(f, "bad network settings: {m}"),
            NetError::Card(m) => write!(f, "network card: {m}"),
            NetError::Bind(p) => write!(f, "cannot listen on port {p}"),
            NetError::Reset => write!(f, "connection reset"),
            NetError::Closed => write!(f, "connection closed"),
            NetError::NotSent => write!(f, "datagram not sent: send buffer full or no route"),
        }
    }
}

/// The guest's IP settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Address and prefix.
    pub ip: Ipv4Address,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Option<Ipv4Address>,
    /// Print event-loop counters every 2 s (`net.stats=1`).
    pub stats: bool,
    /// Let the card cut large TCP segments if it can (`net.tso=0`: no).
    pub tso: bool,
}

impl Config {
    /// Reads `net.ip=A.B.C.D/P` and `net.gw=A.B.C.D` from runtime words.
    pub fn from_args(words: &[alloc::string::String]) -> Result<Config, NetError> {
        let get = |k: &str| {
            words
                .iter()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
        };
        let ip = get("net.ip").ok_or_else(|| {
            NetError::Config("no net.ip=ADDR/PREFIX on the command line (give the VMM --ip)".into())
        })?;
        let bad = |what: &str| NetError::Config(what.into());
        let (addr, prefix) = ip
            .split_once('/')
            .ok_or_else(|| bad("net.ip needs /PREFIX"))?;
        let ip: Ipv4Address = addr
            .parse()
            .map_err(|_| bad("net.ip is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| bad("net.ip prefix must be 1 to 32"))?;
        let gateway = match get("net.gw") {
            Some(g) => Some(
                g.parse()
                    .map_err(|_| bad("net.gw is not an IPv4 address"))?,
            ),
            None => None,
        };
        Ok(Config {
            ip,
            prefix,
            gateway,
            stats: get("net.stats") == Some("1"),
            tso: get("net.tso") != Some("0"),
        })
    }
}

/// A port being listened on: its sockets in LISTEN (kept at `backlog`)
/// and those past it, not yet accepted.
pub(super) struct Listener {
    pub port: u16,
    pub sizes: super::tcp::BufferSizes,
    pub sockets: Vec<SocketHandle>,
}

/// A halt whose timer is due within this long does not ask the card for
/// an interrupt on received frames: they wait for the timer (at most this
/// long). An interrupt costs ~150 us of host CPU on PVM, and a paced sender
/// wakes for its timer every fraction of a millisecond anyway; without
/// this, every returning ACK would be one more wake-up.
const RX_COALESCE: core::time::Duration = core::time::Duration::from_micros(500);

/// Longest halt without a wake-up from the card or a timer that is due.
const MAX_HALT: core::time::Duration = core::time::Duration::from_secs(1);

/// With `net.stats=1`, a halt longer than this (ns) is reported at once,
/// with what it waited for: on a busy host a late wake-up is otherwise
/// hard to tell from a guest that had nothing to do.
const LONG_HALT_NS: u64 = 3_000_000;

/// Counters of the event loop, printed every 2 s with `net.stats=1`.
#[derive(Default)]
pub(super) struct LoopStats {
    pub turns: u64,
    pub idles: u64,
    pub irq_wakes: u64,
    pub halted_ns: u64,
    pub printed_at: u64,
    pub enabled: bool,
}

pub(super) struct Stack {
    pub card: NetCard,
    pub stats: LoopStats,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    /// Sockets whose stream was dropped: removed once closed.
    pub closing: Vec<SocketHandle>,
    /// Listening ports, by [`super::TcpListener`] id (None once dropped).
    pub listeners: Vec<Option<Listener>>,
    pub config: Config,
}

impl Stack {
    /// Tops every listener up to its backlog of sockets in LISTEN. Runs
    /// after every received packet, so a burst of SYNs finds a listening
    /// socket for each (smoltcp answers a SYN nobody listens for with RST).
    pub fn replenish(&mut self) {
        let sockets = &mut self.sockets;
        for l in self.listeners.iter_mut().flatten() {
            let listening = l
                .sockets
                .iter()
                .filter(|&&h| sockets.get::<tcp::Socket>(h).state() == tcp::State::Listen)
                .count();
            for _ in listening..l.sizes.backlog {
                match super::tcp::listening_socket(l.port, &l.sizes) {
                    Some(s) => l.sockets.push(sockets.add(s)),
                    None => break,
                }
            }
        }
    }
}

static STACK: Local<Option<Stack>> = Local(RefCell::new(None));

/// Runs `f` on the stack. Panics if the network is not up (a task can only
/// exist after [`init`]).
pub(super) fn with<R>(f: impl FnOnce(&mut Stack) -> R) -> R {
    let mut s = STACK.0.borrow_mut();
    f(s.as_mut().expect("the network is not up: call net::run"))
}

pub(super) fn config() -> Option<Config> {
    STACK.0.borrow().as_ref().map(|s| s.config)
}

fn smol_now(now: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros((now.as_nanos() / 1000) as i64)
}

pub(super) fn init(config: &Config) -> Result<(), NetError> {
    let mut card = NetCard::probe(config.tso).map_err(|e| NetError::Card(alloc::format!("{e}")))?;
    let mac = EthernetAddress(card.mac());
    let mut iface_config = smoltcp::iface::Config::new(HardwareAddress::Ethernet(mac));
    iface_config.random_seed = cpu::rdtsc()
        ^ u64::from_le_bytes([
            mac.0[0], mac.0[1], mac.0[2], mac.0[3], mac.0[4], mac.0[5], 0, 0,
        ]);
    let now = crate::time::now();
    let mut iface = Interface::new(iface_config, &mut card, smol_now(now));
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(config.ip.into(), config.prefix)).ok();
    });
    if let Some(gw) = config.gateway {
        iface
            .routes_mut()
            .add_default_ipv4_route(gw)
            .map_err(|_| NetError::Config("cannot add the default route".into()))?;
    }
    announce(&mut card, mac, config.ip);
    crate::println!(
        "net: up: mac {mac} irq {} checksum offload {} tso {} ip {}/{} gateway {} cpu {}",
        card.irq_line(),
        if card.tx.offload() { "on" } else { "off" },
        if card.tx.tso() { "on" } else { "off" },
        config.ip,
        config.prefix,
        config.gateway.map_or_else(
            || alloc::string::String::from("none"),
            |g| alloc::format!("{g}")
        ),
        crate::platform::cpu_mode().name()
    );
    *STACK.0.borrow_mut() = Some(Stack {
        card,
        iface,
        sockets: SocketSet::new(Vec::new()),
        closing: Vec::new(),
        listeners: Vec::new(),
        stats: LoopStats {
            enabled: config.stats,
            ..LoopStats::default()
        },
        config: *config,
    });
    Ok(())
}

/// A gratuitous ARP (a request for our own address, broadcast), so that
/// neighbours and bridges learn where the address lives now.
fn announce(card: &mut NetCard, mac: EthernetAddress, ip: Ipv4Address) {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: mac,
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: ip,
    };
    let eth = EthernetRepr {
        src_addr: mac,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = [0u8; 60];
    let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut f);
    arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
    card.send_raw(&frame);
}

/// One turn of smoltcp; whether socket state changed.
pub(super) fn poll(now: Instant) -> bool {
    with(|s| {
        s.stats.turns += 1;
        let t = smol_now(now);
        let mut changed = false;
        s.iface.poll_maintenance(t);
        // While there is something to send, one received frame and one
        // round of sending take turns: a sender's segments go out between
        // the ACKs it takes in, instead of after all of them (each costs
        // ~1 ms of emulated guest instructions here, so a queue of ACKs
        // would otherwise be a gap of several ms in the outgoing stream).
        // Once a round sends nothing (requests waiting for the app, say),
        // received frames are taken in a row: a round of sending walks
        // every socket, which a server with many connections would
        // otherwise pay once per frame.
        let mut sending = true;
        loop {
            let took = match s.iface.poll_ingress_single(t, &mut s.card, &mut s.sockets) {
                PollIngressSingleResult::None => false,
                PollIngressSingleResult::PacketProcessed => true,
                PollIngressSingleResult::SocketStateChanged => {
                    changed = true;
                    s.replenish();
                    true
                }
            };
            if took && !sending {
                continue;
            }
            sending = s.iface.poll_egress(t, &mut s.card, &mut s.sockets)
                == PollResult::SocketStateChanged;
            changed |= sending;
            if !took && !sending {
                break;
            }
        }
        s.card.flush();
        let sockets = &mut s.sockets;
        s.closing.retain(|&h| {
            let st = sockets.get::<tcp::Socket>(h).state();
            let done = matches!(st, tcp::State::Closed | tcp::State::TimeWait);
            if done {
                sockets.remove(h);
            }
            !done
        });
        changed
    })
}

/// Nothing to do: halt until the card interrupts, smoltcp's next timer,
/// or `timer` (a task's).
pub(super) fn idle(now: Instant, timer: Option<Instant>) {
    let deadline = with(|s| {
        s.card.flush();
        let at = s
            .iface
            .poll_delay(smol_now(now), &s.sockets)
            .map(|d| now.saturating_add(core::time::Duration::from_micros(d.total_micros())));
        let due = match (at, timer) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(Instant::from_nanos(u64::MAX)),
        };
        // A safety net: never halt longer than MAX_HALT, so that a lost
        // wake-up (a device or hypervisor bug) costs latency, not a hang.
        // `net.stats=1` counts the halts that ended this way and found work.
        due.min(now.saturating_add(MAX_HALT))
    });
    let rx_interrupt = deadline > now.saturating_add(RX_COALESCE);
    with(|s| {
        crate::time::halt_until(Some(deadline), || {
            s.card.arm(rx_interrupt) && !DEVICE_INTERRUPT.load(Ordering::Acquire)
        });
        let interrupted = DEVICE_INTERRUPT.swap(false, Ordering::AcqRel);
        s.card.disarm(interrupted);
        if s.stats.enabled {
            let after = crate::time::now();
            let halted = after.as_nanos().saturating_sub(now.as_nanos());
            if halted > LONG_HALT_NS {
                crate::println!(
                    "net: stats: a halt of {} us: its timer was due after {} us, card interrupts {}, woken by the card {}",
                    halted / 1000,
                    deadline.as_nanos().saturating_sub(now.as_nanos()) / 1000,
                    if rx_interrupt { "armed" } else { "off" },
                    interrupted
                );
            }
            let st = &mut s.stats;
            st.idles += 1;
            st.irq_wakes += u64::from(interrupted);
            st.halted_ns += after.as_nanos().saturating_sub(now.as_nanos());
            if after.as_nanos() - st.printed_at > 2_000_000_000 {
                st.printed_at = after.as_nanos();
                crate::println!(
                    "net: stats: turns {} idles {} woken by the card {} halted {} ms acks coalesced {}",
                    st.turns,
                    st.idles,
                    st.irq_wakes,
                    st.halted_ns / 1_000_000,
                    s.card.rx.coalesced
                );
            }
        }
    });
}
