//! The fleet's records in etcd: the source of truth for what runs where.
//!
//! ```text
//!  /ferry/v1/hosts/NAME      a live host (JSON HostRecord), under the host's lease:
//!                            it vanishes when the host's agent stops renewing it
//!  /ferry/v1/cordon/NAME     an operator's "no new VMs here" (draining), no lease
//!  /ferry/v1/vms/ID          every VM (JSON VmRecord): image, owner, generation
//! ```
//!
//! A VM record changes only by a transaction on its `mod_revision`: two
//! writers that read the same record cannot both succeed, and a move is
//! recorded only if the record still names the expected owner and
//! generation. That is the fencing: whoever holds generation N+1 in the
//! record owns the VM, and a host whose lease expired keeps its VMs in the
//! record (they are not placed elsewhere while it may still run them)
//! until an operator confirms it is down.
//!
//! Every call has a deadline ([`Store::connect`]'s `timeout`); etcd being
//! unreachable is an error the caller sees, never a hang.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

/// Where Ferry's keys live.
pub const PREFIX: &str = "/ferry/v1/";

/// The largest record accepted from etcd (anything larger is not Ferry's).
const MAX_RECORD: usize = 64 << 10;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd did not answer (in time), or refused the request.
    #[error("etcd ({endpoints}): {why}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// What went wrong.
        why: String,
    },
    /// A record that is not what Ferry writes.
    #[error("the record {key} is not a Ferry record: {why}")]
    Bad {
        /// Its key.
        key: String,
        /// Why.
        why: String,
    },
    /// The record exists already.
    #[error("{0} exists already")]
    Exists(String),
    /// No such record.
    #[error("no such {0}")]
    Missing(String),
    /// The VM's record is not at the owner and generation the caller
    /// expected: someone else moved it, or the caller is stale.
    #[error(
        "VM {id} is at generation {generation} on {owner}, not generation {expected_generation} on {expected_owner}: the move is refused (fenced)"
    )]
    Fenced {
        /// The VM.
        id: String,
        /// Its owner in the record.
        owner: String,
        /// Its generation in the record.
        generation: u64,
        /// What the caller expected.
        expected_owner: String,
        /// What the caller expected.
        expected_generation: u64,
    },
    /// Bad input from the caller.
    #[error("{0}")]
    Invalid(String),
}

/// A live host, as its agent reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Its name (also the key).
    pub name: String,
    /// Where its agent receives migrations (`IP:PORT`).
    pub migrate: String,
    /// Memory it gives VMs, bytes.
    pub memory: u64,
    /// Cores it gives VMs.
    pub cores: f64,
    /// Cores its VMs keep busy (measured by the agent).
    pub load: f64,
    /// The agent's process id (for operators).
    pub agent_pid: u32,
}

/// What a VM is doing, in its record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum VmState {
    /// Placed on its owner; starting or running there.
    Running,
    /// Moving from its owner to `to` (the owner still runs it).
    Moving {
        /// The destination host.
        to: String,
    },
    /// Arriving at its owner, which claimed this generation when it
    /// admitted the move; it runs at `from` (at the generation before)
    /// until the move ends. Nothing else may give this generation away:
    /// the owner's receiver settles it (`running`, or back to `from`).
    Arriving {
        /// The source host.
        from: String,
    },
    /// Its owner's lease expired: it may still run there, so it is not
    /// placed elsewhere until an operator confirms the host is down.
    Fenced,
    /// Its host was confirmed down and it ran nowhere since.
    Lost,
}

/// A VM of the fleet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Its identity (32 hex digits, as `ferry status` shows it).
    pub id: String,
    /// A name for operators.
    pub name: String,
    /// The image it runs.
    pub image: String,
    /// Its memory, bytes.
    pub memory: u64,
    /// Arguments for the guest.
    pub args: Vec<String>,
    /// Its network card: the service address it keeps wherever it runs.
    #[serde(default)]
    pub net: Option<VmNet>,
    /// Its last move: from, to, the pause (VMM downtime), the whole move.
    #[serde(default)]
    pub last_move: Option<LastMove>,
    /// The host that owns generation `generation`.
    pub owner: String,
    /// Its generation: each move's commit adds one.
    pub generation: u64,
    /// What it is doing.
    #[serde(flatten)]
    pub state: VmState,
}

/// A VM's last move, as its source's agent recorded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastMove {
    /// From host.
    pub from: String,
    /// To host.
    pub to: String,
    /// VMM downtime, ms (the pause), if the move's report gave it.
    pub downtime_ms: Option<f64>,
    /// The whole move, ms, if the report gave it.
    pub total_ms: Option<f64>,
    /// When it ended, seconds since the epoch.
    pub at: u64,
}

/// A VM's network card in its record (as `ferry run` takes them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNet {
    /// MAC, e.g. 02:bf:0a:4d:00:0a.
    pub mac: String,
    /// IPv4 with prefix, e.g. 10.77.0.10/24.
    pub ip: String,
    /// Default gateway.
    pub gateway: Option<String>,
}

/// How a destination's fencing step ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Fence {
    /// The record names the destination at the new generation.
    Won,
    /// The record gives the VM elsewhere (why): it must not run.
    Refused(String),
}

/// A record with the revision it was read at.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    /// The record.
    pub record: T,
    /// etcd's `mod_revision` of its key.
    pub revision: i64,
}

/// What `ferry fleet ls` shows: live hosts, cordons, VMs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    /// Live hosts (their lease holds).
    pub hosts: Vec<HostRecord>,
    /// Hosts an operator cordoned (no new VMs).
    pub cordoned: Vec<String>,
    /// Every VM.
    pub vms: Vec<VmRecord>,
    /// etcd's revision the view was read at.
    pub revision: i64,
}

/// Checks a host name: 1-63 of `[A-Za-z0-9-]` (it is part of a key).
pub fn check_name(what: &str, name: &str) -> Result<(), StoreError> {
    if name.is_empty()
        || name.len() > 63
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(StoreError::Invalid(format!(
            "{what} {name:?}: use 1-63 letters, digits or '-'"
        )));
    }
    Ok(())
}

fn host_key(name: &str) -> String {
    format!("{PREFIX}hosts/{name}")
}

fn cordon_key(name: &str) -> String {
    format!("{PREFIX}cordon/{name}")
}

fn vm_key(id: &str) -> String {
    format!("{PREFIX}vms/{id}")
}

fn decode<T: for<'a> Deserialize<'a>>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    let key = String::from_utf8_lossy(key).into_owned();
    if value.len() > MAX_RECORD {
        return Err(StoreError::Bad {
            key,
            why: format!("{} bytes (at most {MAX_RECORD})", value.len()),
        });
    }
    serde_json::from_slice(value).map_err(|e| StoreError::Bad {
        key,
        why: e.to_string(),
    })
}

fn encode<T: Serialize>(r: &T) -> Vec<u8> {
    serde_json::to_vec(r).expect("records serialize")
}

/// Connections to each member of the fleet's etcd cluster, used in turn:
/// a call goes to the member that answered last, and to the next one when
/// that one is down, cut off or without a leader (a balanced channel alone
/// keeps sending to a dead member).
struct Pool {
    endpoints: Vec<String>,
    clients: Vec<Option<Client>>,
    at: usize,
    timeout: Duration,
}

/// Whether an error may go away on another member or a little later.
fn retryable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) | E::LeaseKeepAliveError(_) => true,
        // Unknown, DeadlineExceeded, Aborted, Internal, Unavailable.
        E::GRpcStatus(s) => matches!(s.code() as i32, 2 | 4 | 10 | 13 | 14),
        _ => false,
    }
}

impl Pool {
    fn new(endpoints: Vec<String>, timeout: Duration) -> Pool {
        Pool {
            clients: endpoints.iter().map(|_| None).collect(),
            endpoints,
            at: 0,
            timeout,
        }
    }

    async fn client(&mut self, i: usize) -> Result<Client, etcd_client::Error> {
        if let Some(c) = &self.clients[i] {
            return Ok(c.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(1), self.timeout)
            // A member cut off from the quorum refuses instead of
            // answering from what it last knew.
            .with_require_leader(true);
        let c = Client::connect([format!("http://{}", self.endpoints[i])], Some(opts)).await?;
        self.clients[i] = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` on a member's client, trying the others on errors that
    /// may pass, until the pool's timeout.
    async fn run<T, F, Fut>(&mut self, mut f: F) -> Result<T, String>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let n = self.endpoints.len();
        // One member may hang (cut off): it gets a share of the time, and
        // the others (an election takes a second or more) the rest.
        let each = (self.timeout / 3).clamp(Duration::from_millis(300), Duration::from_secs(2));
        let mut last = String::from("no member answered");
        let mut tries = 0usize;
        while tokio::time::Instant::now() < deadline {
            let i = (self.at + tries) % n;
            tries += 1;
            let until = deadline.min(tokio::time::Instant::now() + each);
            let r = tokio::time::timeout_at(until, async {
                let c = self.client(i).await?;
                f(c).await
            })
            .await;
            match r {
                Ok(Ok(v)) => {
                    self.at = i;
                    return Ok(v);
                }
                Ok(Err(e)) if !retryable(&e) => return Err(e.to_string()),
                Ok(Err(e)) => last = format!("{}: {e}", self.endpoints[i]),
                Err(_) => last = format!("{}: no answer", self.endpoints[i]),
            }
            self.clients[i] = None;
            if tries.is_multiple_of(n) {
                // Every member failed once: an election may be under way.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Err(format!(
            "{last} (no answer within {} ms)",
            self.timeout.as_millis()
        ))
    }
}

/// A connection to the fleet's etcd cluster. Calls block (on a runtime of
/// the store's own) until a member answers or the timeout passes.
pub struct Store {
    rt: tokio::runtime::Runtime,
    pool: std::sync::Mutex<Pool>,
    endpoints: Vec<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// A host's registration: its record lives while this does (a thread
/// renews the lease); dropping it revokes the lease.
#[derive(Debug)]
pub struct Registration {
    lease: i64,
    stop: Option<std::sync::mpsc::Sender<()>>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl Registration {
    /// The lease's id.
    pub fn lease(&self) -> i64 {
        self.lease
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // The message tells the renewer to revoke the lease.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
    }
}

impl Store {
    /// Connects to the etcd cluster whose members are `endpoints`
    /// (`IP:PORT`; comma-separated lists are split) and checks that one
    /// answers; every call then has `timeout`.
    pub fn connect(endpoints: &[String], timeout: Duration) -> Result<Store, StoreError> {
        let eps: Vec<String> = endpoints
            .iter()
            .flat_map(|e| e.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect();
        if eps.is_empty() {
            return Err(StoreError::Invalid(
                "no etcd endpoints: give --etcd IP:PORT[,IP:PORT...]".into(),
            ));
        }
        for e in &eps {
            if e.parse::<std::net::SocketAddr>().is_err() {
                return Err(StoreError::Invalid(format!(
                    "etcd endpoint {e:?} is not IP:PORT"
                )));
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Invalid(format!("cannot start a runtime: {e}")))?;
        let s = Store {
            rt,
            pool: std::sync::Mutex::new(Pool::new(eps.clone(), timeout)),
            endpoints: eps,
            timeout,
        };
        s.call(|mut c| async move { c.status().await })?;
        Ok(s)
    }

    fn err(&self, why: impl std::fmt::Display) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.join(","),
            why: why.to_string(),
        }
    }

    /// Runs one etcd call (`f` gets a member's client) to its end, trying
    /// other members, until the timeout.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut pool = self.pool.lock().expect("etcd pool");
        self.rt.block_on(pool.run(f)).map_err(|e| self.err(e))
    }

    /// Runs `txn`; whether its comparisons held.
    fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        Ok(self
            .call(|mut c| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })?
            .succeeded())
    }

    /// Registers `host` under a lease of `ttl` (renewed every third of it
    /// by a thread until the [`Registration`] drops). A host of that name
    /// that is still alive is refused.
    pub fn register(&self, host: &HostRecord, ttl: Duration) -> Result<Registration, StoreError> {
        check_name("host", &host.name)?;
        let secs = ttl.as_secs().clamp(1, 3600) as i64;
        let lease = self
            .call(|mut c| async move { c.lease_grant(secs, None).await })?
            .id();
        let key = host_key(&host.name);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                encode(host),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if !self.txn(txn)? {
            let _ = self.call(|mut c| async move { c.lease_revoke(lease).await });
            return Err(StoreError::Exists(format!(
                "host {} (its agent is alive, or its lease has not expired yet)",
                host.name
            )));
        }
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let pool = Pool::new(self.endpoints.clone(), self.timeout);
        let every = Duration::from_millis((secs as u64 * 1000 / 3).max(200));
        let renewer = std::thread::Builder::new()
            .name("ferry-lease".into())
            .spawn(move || renew(pool, lease, every, stopped))
            .map_err(|e| StoreError::Invalid(format!("cannot start a thread: {e}")))?;
        Ok(Registration {
            lease,
            stop: Some(stop),
            renewer: Some(renewer),
        })
    }

    /// Rewrites a registered host's record (its load), under its lease.
    pub fn update_host(&self, host: &HostRecord, reg: &Registration) -> Result<(), StoreError> {
        check_name("host", &host.name)?;
        let key = host_key(&host.name);
        // Only while the lease still holds the key: a host whose lease
        // expired must register again (and be seen to).
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, reg.lease)])
            .and_then([TxnOp::put(
                key,
                encode(host),
                Some(PutOptions::new().with_lease(reg.lease)),
            )]);
        if self.txn(txn)? {
            Ok(())
        } else {
            Err(StoreError::Missing(format!(
                "registration of host {} (its lease expired)",
                host.name
            )))
        }
    }

    /// Marks `host` as taking no new VMs (`on`), or schedulable again.
    pub fn cordon(&self, host: &str, on: bool) -> Result<(), StoreError> {
        check_name("host", host)?;
        let key = cordon_key(host);
        if on {
            self.call(|mut c| {
                let key = key.clone();
                async move { c.put(key, b"{}".to_vec(), None).await }
            })?;
        } else {
            self.call(|mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })?;
        }
        Ok(())
    }

    /// Everything, at one revision.
    pub fn view(&self) -> Result<View, StoreError> {
        let r = self.call(|mut c| async move {
            c.get(PREFIX, Some(GetOptions::new().with_prefix())).await
        })?;
        let mut v = View {
            revision: r.header().map_or(0, |h| h.revision()),
            ..View::default()
        };
        for kv in r.kvs() {
            let key = kv.key();
            let rest = &key[PREFIX.len().min(key.len())..];
            if rest.starts_with(b"hosts/") {
                v.hosts.push(decode(key, kv.value())?);
            } else if let Some(name) = rest.strip_prefix(b"cordon/") {
                v.cordoned.push(String::from_utf8_lossy(name).into_owned());
            } else if rest.starts_with(b"vms/") {
                v.vms.push(decode(key, kv.value())?);
            }
        }
        Ok(v)
    }

    /// One VM's record and its revision.
    pub fn vm(&self, id: &str) -> Result<Versioned<VmRecord>, StoreError> {
        let key = vm_key(id);
        let r = self.call(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        let kv = r
            .kvs()
            .first()
            .ok_or_else(|| StoreError::Missing(format!("VM {id}")))?;
        Ok(Versioned {
            record: decode(kv.key(), kv.value())?,
            revision: kv.mod_revision(),
        })
    }

    /// Records a new VM; refused if its id exists.
    pub fn create_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        check_id(&vm.id)?;
        let key = vm_key(&vm.id);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, encode(vm), None)]);
        if self.txn(txn)? {
            Ok(())
        } else {
            Err(StoreError::Exists(format!("VM {}", vm.id)))
        }
    }

    /// Replaces a VM's record if it is still at `revision` (false: someone
    /// wrote it since).
    pub fn replace_vm(&self, vm: &VmRecord, revision: i64) -> Result<bool, StoreError> {
        check_id(&vm.id)?;
        let key = vm_key(&vm.id);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key, encode(vm), None)]);
        self.txn(txn)
    }

    /// Changes VM `id` by `change` if its record names `owner` at
    /// `generation`; retried while others write unrelated fields. The
    /// fencing primitive: a move's commit is `advance(id, from, N, |r| {
    /// r.owner = to; r.generation = N + 1 })`, and two hosts can never
    /// both hold N+1.
    pub fn advance(
        &self,
        id: &str,
        owner: &str,
        generation: u64,
        change: impl Fn(&mut VmRecord),
    ) -> Result<VmRecord, StoreError> {
        self.update(id, |cur| {
            if cur.owner != owner || cur.generation != generation {
                return Err(StoreError::Fenced {
                    id: id.into(),
                    owner: cur.owner.clone(),
                    generation: cur.generation,
                    expected_owner: owner.into(),
                    expected_generation: generation,
                });
            }
            let mut next = cur.clone();
            change(&mut next);
            if next.id != cur.id {
                return Err(StoreError::Invalid("a VM's id does not change".into()));
            }
            Ok(next)
        })?
    }

    /// Reads VM `id`'s record and writes what `decide` makes of it, in a
    /// transaction on the revision read, again while others write first.
    /// `decide` answers the record to write, or an answer that ends here
    /// without writing (`Ok(Err(answer))`).
    fn update<T>(
        &self,
        id: &str,
        decide: impl Fn(&VmRecord) -> Result<VmRecord, T>,
    ) -> Result<Result<VmRecord, T>, StoreError> {
        for _ in 0..16 {
            let cur = self.vm(id)?;
            let next = match decide(&cur.record) {
                Ok(next) => next,
                Err(answer) => return Ok(Err(answer)),
            };
            if self.replace_vm(&next, cur.revision)? {
                return Ok(Ok(next));
            }
        }
        Err(self.err(format!("VM {id}'s record kept changing under 16 tries")))
    }

    /// Whether VM `id`'s record lets host `to` take it at generation
    /// `generation` (the arriving copy's): the record names the previous
    /// generation and says `moving` to `to`. The reason if not.
    pub fn check_arrival(r: &VmRecord, to: &str, generation: u64) -> Result<(), String> {
        let moving_here = matches!(&r.state, VmState::Moving { to: t } if t == to);
        if r.generation + 1 == generation && moving_here {
            return Ok(());
        }
        Err(format!(
            "the fleet's record of VM {} gives generation {} to {} ({}): it does not move the VM to {to} at generation {generation} (`ferry fleet move` does)",
            r.id,
            r.generation,
            r.owner,
            super::show::state_name(&r.state),
        ))
    }

    /// The fencing step of a fleet move, taken by the destination's
    /// receiver when it admits the move: VM `id` becomes `to`'s at
    /// `generation`, `arriving` from its owner, in one transaction on the
    /// record's revision, if the record says it moves to `to` from
    /// `generation - 1`. From then on no other host, and no confirm-down,
    /// can take that generation; the move's end settles the claim
    /// ([`Store::settle_arrival`]). This costs a transaction (~2 ms here)
    /// while memory is copied, never in the pause.
    /// `after_unknown`: an earlier call failed without an answer (its
    /// transaction may have been applied), so a record already claimed by
    /// `to` at `generation` is this claim.
    pub fn claim_arrival(
        &self,
        id: &str,
        to: &str,
        generation: u64,
        after_unknown: bool,
    ) -> Result<Fence, StoreError> {
        let r = self.update(id, |cur| {
            if after_unknown
                && cur.owner == to
                && cur.generation == generation
                && matches!(cur.state, VmState::Arriving { .. })
            {
                return Err(Fence::Won);
            }
            Self::check_arrival(cur, to, generation).map_err(Fence::Refused)?;
            let mut next = cur.clone();
            next.state = VmState::Arriving {
                from: cur.owner.clone(),
            };
            next.owner = to.to_string();
            next.generation = generation;
            Ok(next)
        })?;
        Ok(r.err().unwrap_or(Fence::Won))
    }

    /// Settles `to`'s claim on VM `id` at `generation`: the VM runs at
    /// `to` (`ran`: the record says `running` there), or it never will (the
    /// record gives it back to the source at the generation before,
    /// `running`). False if the record holds no such claim (settled
    /// already, by the other side).
    pub fn settle_arrival(
        &self,
        id: &str,
        to: &str,
        generation: u64,
        ran: bool,
    ) -> Result<bool, StoreError> {
        let r = self.update(id, |cur| {
            let VmState::Arriving { from } = &cur.state else {
                return Err(false);
            };
            if cur.owner != to || cur.generation != generation {
                return Err(false);
            }
            let mut next = cur.clone();
            if !ran {
                next.owner = from.clone();
                next.generation = generation - 1;
            }
            next.state = VmState::Running;
            Ok(next)
        })?;
        Ok(r.is_ok())
    }

    /// The current leader's member id and name (for tests and `fleet ls`).
    pub fn leader(&self) -> Result<(u64, String), StoreError> {
        let st = self.call(|mut c| async move { c.status().await })?;
        let leader = st.leader();
        let members = self.call(|mut c| async move { c.member_list().await })?;
        let name = members
            .members()
            .iter()
            .find(|m| m.id() == leader)
            .map_or_else(String::new, |m| m.name().to_string());
        Ok((leader, name))
    }
}

/// Checks a VM id: 1-64 hex digits or '-' (it is part of a key).
pub fn check_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(StoreError::Invalid(format!(
            "VM id {id:?}: use 1-64 letters, digits or '-'"
        )));
    }
    Ok(())
}

/// The renewer thread: keeps `lease` alive every `every` until told to
/// stop (then revokes it) or until its sender goes (then lets it expire).
/// A renewal that fails is tried on the next member at the next turn.
fn renew(mut pool: Pool, lease: i64, every: Duration, stop: std::sync::mpsc::Receiver<()>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    loop {
        match stop.recv_timeout(every) {
            Ok(()) => {
                let _ = rt.block_on(pool.run(|mut c| async move { c.lease_revoke(lease).await }));
                return;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        // One keep-alive round trip per turn (a stream per turn: a member
        // that went away leaves nothing half-open behind).
        let ttl = rt.block_on(pool.run(|mut c| async move {
            let (mut k, mut s) = c.lease_keep_alive(lease).await?;
            k.keep_alive().await?;
            match s.message().await? {
                Some(r) => Ok(r.ttl()),
                None => Err(etcd_client::Error::LeaseKeepAliveError(
                    "the member closed the stream".into(),
                )),
            }
        }));
        if ttl == Ok(0) {
            // The lease expired: nothing brings it back (the host must
            // register again, and be seen to).
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM at generation 3 on h1, moving to h2.
    fn sample() -> VmRecord {
        VmRecord {
            id: "0123abcd".into(),
            name: "web".into(),
            image: "stream".into(),
            memory: 64 << 20,
            args: vec!["ballast=4M".into()],
            net: None,
            last_move: None,
            owner: "h1".into(),
            generation: 3,
            state: VmState::Moving { to: "h2".into() },
        }
    }

    #[test]
    fn records_round_trip_as_json() {
        let vm = sample();
        let j = encode(&vm);
        let text = String::from_utf8(j.clone()).unwrap();
        assert!(text.contains(r#""state":"moving""#), "{text}");
        assert!(text.contains(r#""to":"h2""#), "{text}");
        assert_eq!(decode::<VmRecord>(b"k", &j).unwrap(), vm);
        // A move whose report gave no pause still reads back (a NaN would
        // have been written as null and broken every later view).
        let moved = VmRecord {
            last_move: Some(LastMove {
                from: "h1".into(),
                to: "h2".into(),
                downtime_ms: None,
                total_ms: Some(55.0),
                at: 1,
            }),
            ..vm
        };
        assert_eq!(decode::<VmRecord>(b"k", &encode(&moved)).unwrap(), moved);
    }

    #[test]
    fn only_a_move_to_this_host_from_the_generation_before_is_admitted() {
        let vm = sample();
        assert!(Store::check_arrival(&vm, "h2", 4).is_ok());
        // Another destination, a stale or future generation.
        for (to, g) in [("h3", 4), ("h2", 3), ("h2", 5)] {
            let why = Store::check_arrival(&vm, to, g).unwrap_err();
            assert!(
                why.contains(&format!("does not move the VM to {to}")),
                "{why}"
            );
        }
        // Not moving (called off, claimed already, fenced).
        for state in [
            VmState::Running,
            VmState::Arriving { from: "h1".into() },
            VmState::Fenced,
        ] {
            let r = VmRecord {
                state,
                ..vm.clone()
            };
            assert!(Store::check_arrival(&r, "h2", 4).is_err());
        }
        let arriving = VmRecord {
            state: VmState::Arriving { from: "h1".into() },
            ..vm
        };
        let text = String::from_utf8(encode(&arriving)).unwrap();
        assert!(text.contains(r#""state":"arriving","from":"h1""#), "{text}");
    }

    #[test]
    fn foreign_or_huge_records_are_refused_by_name() {
        let e = decode::<VmRecord>(b"/ferry/v1/vms/x", b"{\"id\":1}").unwrap_err();
        assert!(e.to_string().contains("/ferry/v1/vms/x"), "{e}");
        let big = vec![b' '; MAX_RECORD + 1];
        assert!(decode::<HostRecord>(b"k", &big).is_err());
    }

    #[test]
    fn names_and_endpoints_are_checked_before_any_call() {
        assert!(check_name("host", "h-1").is_ok());
        for bad in ["", "a/b", "x y", &"a".repeat(64)] {
            assert!(check_name("host", bad).is_err(), "{bad:?}");
        }
        assert!(check_id("../x").is_err());
        let e = Store::connect(&["localhost".into()], Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("not IP:PORT"), "{e}");
        let e = Store::connect(&[], Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("--etcd"), "{e}");
    }
}
