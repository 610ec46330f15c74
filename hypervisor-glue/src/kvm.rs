//! The only module that sets up KVM: the VM (in-kernel irqchip, memory
//! slots) and the boot vCPU (CPUID, long-mode segments, registers).
//! Each ioctl's failure maps to the step that failed.

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::{BootCpu, CODE_SELECTOR, DATA_SELECTOR};
use crate::memory::GuestRam;

/// KVM setup errors, one per step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm could not be opened.
    #[error(
        "cannot open /dev/kvm ({0}); Ferry needs KVM: load kvm (or kvm_pvm) and run as a user who may open /dev/kvm"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("KVM_CREATE_IRQCHIP: {0}")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("KVM_SET_USER_MEMORY_REGION (slot {slot}): {source}")]
    SetMemoryRegion {
        /// Memory slot.
        slot: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// KVM_CREATE_VCPU failed.
    #[error("KVM_CREATE_VCPU: {0}")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS failed.
    #[error("KVM_SET_MSRS: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("KVM_SET_SREGS: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_REGS failed.
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_TSC_KHZ failed.
    #[error("KVM_GET_TSC_KHZ: {0}")]
    GetTscKhz(#[source] kvm_ioctls::Error),
    /// A capability Ferry needs is missing.
    #[error("this KVM lacks {0}, which Ferry needs")]
    MissingCap(&'static str),
}

/// An opened KVM with a VM whose memory is registered.
#[derive(Debug)]
pub struct Machine {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM.
    pub vm: VmFd,
}

/// Opens KVM, creates a VM with an in-kernel irqchip (LAPIC timers, later
/// irqfd) and registers every RAM region as a memory slot.
pub fn create_machine(mem: &GuestRam) -> Result<Machine, Error> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    if !kvm.check_extension(Cap::ImmediateExit) {
        return Err(Error::MissingCap("KVM_CAP_IMMEDIATE_EXIT"));
    }
    let vm = kvm.create_vm().map_err(Error::CreateVm)?;
    // Memory slots go in before the irqchip: on this KVM (PVM) the first
    // slot registered after KVM_CREATE_IRQCHIP costs ~8 ms, before it
    // ~0.02 ms (measured; the whole VM setup drops from ~8 ms to ~0.3 ms).
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live host mapping of exactly `memory_size`
        // bytes owned by `mem`, which the caller keeps alive for as long as
        // the VM exists (the `Vm` owns both and drops the VM first).
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|source| Error::SetMemoryRegion { slot, source })?;
    }
    vm.create_irq_chip().map_err(Error::CreateIrqChip)?;
    set_halt_polling(&vm);
    Ok(Machine { kvm, vm })
}

/// KVM_CAP_HALT_POLL: the VM's longest halt-polling time in ns.
const KVM_CAP_HALT_POLL: u32 = 182;

/// Turns KVM's halt polling off for this VM unless `FERRY_HALT_POLL_NS`
/// says how long to poll. KVM spins up to 200 us (its default) on a HLT
/// before it sleeps the vCPU thread; a paced guest halts thousands of
/// times a second, so the vCPU thread then burns a whole host core that
/// the card's worker and the clients need (measured on 2 cores: 100% CPU
/// for a guest streaming 120 MB/s that halts 90% of the time).
fn set_halt_polling(vm: &VmFd) {
    let ns = std::env::var("FERRY_HALT_POLL_NS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let cap = kvm_bindings::kvm_enable_cap {
        cap: KVM_CAP_HALT_POLL,
        args: [ns, 0, 0, 0],
        ..Default::default()
    };
    // Older kernels lack the capability: they poll as they always did.
    let _ = vm.enable_cap(&cap);
}

const CPUID_HYPERVISOR: u32 = 1 << 31;
const MSR_MTRR_DEF_TYPE: u32 = 0x2FF;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_WRITE_BACK: u64 = 6;
const CPUID_TSC_DEADLINE: u32 = 1 << 24;

/// Creates vCPU `id` with Ferry's CPUID and MSRs; [`set_boot_registers`]
/// then puts it in the boot state.
pub fn create_vcpu(machine: &Machine, id: u64) -> Result<VcpuFd, Error> {
    let vcpu = machine.vm.create_vcpu(id).map_err(Error::CreateVcpu)?;

    let mut cpuid = supported_cpuid(&machine.kvm)?;
    let deadline = machine.kvm.check_extension(Cap::TscDeadlineTimer);
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            e.ecx |= CPUID_HYPERVISOR;
            if deadline {
                e.ecx |= CPUID_TSC_DEADLINE;
            }
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(Error::SetCpuid)?;
    // MTRRs on with write-back as the default memory type, as firmware
    // leaves them on a real machine (KVM's reset value 0 means "MTRRs off",
    // all memory uncached, for a guest that looks).
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_MTRR_DEF_TYPE,
        data: MTRR_ENABLE | MTRR_WRITE_BACK,
        ..Default::default()
    }])
    .expect("one entry fits");
    let set = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    if set != 1 {
        return Err(Error::MissingCap("a writable IA32_MTRR_DEF_TYPE"));
    }
    Ok(vcpu)
}

/// The Hermit boot state: long mode, flat segments, identity paging from
/// `boot.cr3`, `rip`/`rsp`/`rdi` as given, `rsi` = CPU id 0.
pub fn set_boot_registers(vcpu: &VcpuFd, boot: &BootCpu) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(Error::GetSregs)?;
    let code = kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: CODE_SELECTOR,
        type_: 0xB,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: DATA_SELECTOR,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = boot.gdt.0;
    sregs.gdt.limit = boot.gdt.1;
    // PE | MP | ET | NE | WP | PG. No SSE enablement in CR4: guest code is
    // soft-float, and an SSE instruction should fault (#UD) rather than
    // reach PVM's emulator.
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = boot.cr3;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(Error::SetSregs)?;

    let regs = kvm_bindings::kvm_regs {
        rip: boot.rip,
        rsp: boot.rsp,
        rdi: boot.rdi,
        rsi: 0,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::SetRegs)
}

/// The vCPU's TSC rate in kHz (the host's: PVM cannot scale it).
pub fn tsc_khz(vcpu: &VcpuFd) -> Result<u32, Error> {
    vcpu.get_tsc_khz().map_err(Error::GetTscKhz)
}

/// KVM_GET_STATS_FD: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xAECE;

/// The vCPU's KVM statistics (binary stats interface): name and value of
/// each counter with a single value, e.g. `exits`, `insn_emulation`,
/// `halt_exits`. For diagnostics (`FERRY_STATS=1`); empty if the kernel
/// lacks the interface.
pub fn vcpu_stats(vcpu: &VcpuFd) -> Vec<(String, u64)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::FileExt;
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd (or
    // -1), which is then owned by the File below.
    let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD, 0) };
    if fd < 0 {
        return Vec::new();
    }
    // SAFETY: `fd` was just returned to us and is not owned elsewhere.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut header = [0u8; 24];
    if file.read_exact_at(&mut header, 0).is_err() {
        return Vec::new();
    }
    let word = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
    let (name_size, num_desc) = (word(&header, 4) as usize, word(&header, 8) as usize);
    let (desc_offset, data_offset) = (u64::from(word(&header, 16)), u64::from(word(&header, 20)));
    if name_size > 256 || num_desc > 4096 {
        return Vec::new();
    }
    let desc_len = 16 + name_size;
    let mut descs = vec![0u8; desc_len * num_desc];
    if file.read_exact_at(&mut descs, desc_offset).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for d in descs.chunks_exact(desc_len) {
        let size = u16::from_le_bytes([d[6], d[7]]);
        let offset = u64::from(word(d, 8));
        if size != 1 {
            continue;
        }
        let name = &d[16..];
        let name = String::from_utf8_lossy(
            &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())],
        )
        .into_owned();
        let mut v = [0u8; 8];
        if file.read_exact_at(&mut v, data_offset + offset).is_ok() {
            out.push((name, u64::from_le_bytes(v)));
        }
    }
    out
}

/// A vCPU's complete KVM state, as plain bytes of the KVM structures (so
/// that the snapshot format does not depend on kvm-bindings' types) plus
/// the MSRs. Restored with [`restore_vcpu`], which checks every length;
/// KVM itself checks the contents.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct VcpuState {
    /// `kvm_regs`.
    pub regs: Vec<u8>,
    /// `kvm_sregs`.
    pub sregs: Vec<u8>,
    /// `kvm_xsave` (the 4 KiB legacy region).
    pub xsave: Vec<u8>,
    /// `kvm_xcrs`.
    pub xcrs: Vec<u8>,
    /// `kvm_lapic_state`.
    pub lapic: Vec<u8>,
    /// `kvm_vcpu_events`.
    pub events: Vec<u8>,
    /// `kvm_mp_state`.
    pub mp_state: Vec<u8>,
    /// `kvm_debugregs`.
    pub debugregs: Vec<u8>,
    /// Every MSR KVM lists that could be read: (index, value).
    pub msrs: Vec<(u32, u64)>,
}

/// What of a vCPU's state takes ioctls to read once it has settled (all
/// but the registers, segment registers and events, which KVM hands back
/// in `kvm_run`): a migration saves and sends it after the rest, and the
/// destination loads the rest meanwhile.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct VcpuRest {
    /// `kvm_xsave` (the 4 KiB legacy region).
    pub xsave: Vec<u8>,
    /// `kvm_xcrs`.
    pub xcrs: Vec<u8>,
    /// `kvm_lapic_state`.
    pub lapic: Vec<u8>,
    /// `kvm_mp_state`.
    pub mp_state: Vec<u8>,
    /// `kvm_debugregs`.
    pub debugregs: Vec<u8>,
    /// Every MSR KVM lists that could be read: (index, value).
    pub msrs: Vec<(u32, u64)>,
}

impl VcpuState {
    /// This state with `rest` in place of its own.
    pub fn with_rest(self, rest: VcpuRest) -> VcpuState {
        VcpuState {
            xsave: rest.xsave,
            xcrs: rest.xcrs,
            lapic: rest.lapic,
            mp_state: rest.mp_state,
            debugregs: rest.debugregs,
            msrs: rest.msrs,
            ..self
        }
    }

    /// The registers, segment registers and events alone (the rest empty).
    pub fn front(&self) -> VcpuState {
        VcpuState {
            regs: self.regs.clone(),
            sregs: self.sregs.clone(),
            events: self.events.clone(),
            ..VcpuState::default()
        }
    }

    /// Its rest.
    pub fn rest(&self) -> VcpuRest {
        VcpuRest {
            xsave: self.xsave.clone(),
            xcrs: self.xcrs.clone(),
            lapic: self.lapic.clone(),
            mp_state: self.mp_state.clone(),
            debugregs: self.debugregs.clone(),
            msrs: self.msrs.clone(),
        }
    }
}

/// The in-kernel irqchip: `kvm_irqchip` of the two PICs and the IOAPIC.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct IrqchipState {
    /// Chip 0, 1, 2 (PIC master, PIC slave, IOAPIC).
    pub chips: Vec<Vec<u8>>,
}

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An ioctl failed.
    #[error("{what}: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A saved structure has the wrong size.
    #[error("saved {what} is {got} bytes; this KVM's structure is {want}")]
    Size {
        /// Which structure.
        what: &'static str,
        /// Its saved length.
        got: usize,
        /// The expected length.
        want: usize,
    },
    /// KVM would not take a saved MSR.
    #[error("KVM refused MSR {0:#x} from the snapshot")]
    Msr(u32),
    /// The guest ran in PVM native mode and this host cannot take that.
    #[error(
        "the guest runs in PVM native mode and this host's KVM refused PVM's control MSR \
         (not a PVM host, or another PVM ABI)"
    )]
    PvmNative,
    /// A saved MSR that KVM does not list (nor is PVM's control MSR).
    #[error("the saved state sets MSR {0:#x}, which this host's KVM does not list; refused")]
    NotListed(u32),
    /// Too many MSRs in a snapshot.
    #[error("snapshot lists {0} MSRs; at most {MAX_MSRS} are accepted")]
    TooManyMsrs(usize),
}

/// Most MSRs a snapshot may carry.
pub const MAX_MSRS: usize = 256;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6E0;

fn pod_bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: `T` is a plain C structure from kvm-bindings (integers and
    // arrays of integers), readable as bytes; the slice covers exactly it.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

fn pod_from<T: Copy>(what: &'static str, b: &[u8]) -> Result<T, StateError> {
    let want = std::mem::size_of::<T>();
    if b.len() != want {
        return Err(StateError::Size {
            what,
            got: b.len(),
            want,
        });
    }
    // SAFETY: `b` holds exactly size_of::<T>() bytes (checked above) and
    // `T` is a plain C structure of integers, for which every bit pattern
    // is a value; KVM validates the contents when the structure is set.
    Ok(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

fn io(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl { what, source }
}

/// PVM's control MSR. The guest writes it to run its ring 0 natively
/// (bits 12+: its PVCS page; see the runtime's `arch::pvm`). KVM_GET_MSRS
/// reads it as `0x400 | guest value`, and KVM_SET_MSRS takes back exactly
/// that value. It is not in KVM_GET_MSR_INDEX_LIST: saved by hand, or a
/// restored guest falls back to instruction emulation.
pub const MSR_PVM_CONTROL: u32 = 0x4b56_4d10;
/// Bit the host adds to [`MSR_PVM_CONTROL`] when it reads it.
const PVM_CONTROL_HOST_BIT: u64 = 0x400;

/// How the vCPU executes the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// PVM, guest in native mode (its control MSR is set).
    Native,
    /// PVM, every guest supervisor instruction emulated.
    Emulated,
    /// Not a PVM host: hardware virtualization, the guest runs natively.
    Hardware,
}

impl CpuMode {
    /// The name `ferry status` and `FERRY_STATS` print.
    pub fn name(self) -> &'static str {
        match self {
            CpuMode::Native => "pvm-native",
            CpuMode::Emulated => "pvm-emulated",
            CpuMode::Hardware => "hardware",
        }
    }
}

fn read_pvm_control(vcpu: &VcpuFd) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_PVM_CONTROL,
        ..Default::default()
    }])
    .expect("one entry fits");
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

/// Reads the vCPU's execution mode. The vCPU must not be running.
pub fn cpu_mode(vcpu: &VcpuFd) -> CpuMode {
    match read_pvm_control(vcpu) {
        None => CpuMode::Hardware,
        Some(v) if v & !PVM_CONTROL_HOST_BIT != 0 => CpuMode::Native,
        Some(_) => CpuMode::Emulated,
    }
}

/// The MSRs KVM lists (less the TSC, which cannot be moved here), asked
/// once per process: the list never changes, and asking costs an ioctl in
/// the pause of every migration.
fn listed_msrs(kvm: &Kvm) -> Result<&'static [u32], StateError> {
    static LIST: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    if let Some(l) = LIST.get() {
        return Ok(l);
    }
    let list = kvm
        .get_msr_index_list()
        .map_err(io("KVM_GET_MSR_INDEX_LIST"))?;
    let v = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_TSC)
        .collect();
    Ok(LIST.get_or_init(|| v))
}

/// Whether a saved state may set MSR `index`: one KVM lists, or PVM's
/// control MSR (which the list leaves out).
fn msr_allowed(kvm: &Kvm, index: u32) -> Result<bool, StateError> {
    Ok(index == MSR_PVM_CONTROL || listed_msrs(kvm)?.contains(&index))
}

/// The MSRs of a vCPU's state: those KVM lists and PVM's control MSR
/// (last; on PVM only), in one KVM_GET_MSRS.
fn save_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<(u32, u64)>, StateError> {
    // The ones this vCPU lets us read, found on the first save (KVM stops
    // at the first it cannot read: drop that one, retry) and kept.
    static READABLE: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    let mut indices: Vec<u32> = match READABLE.get() {
        Some(r) => r.clone(),
        None => {
            let mut all = listed_msrs(kvm)?.to_vec();
            all.push(MSR_PVM_CONTROL);
            all
        }
    };
    loop {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::TooManyMsrs(entries.len()))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(io("KVM_GET_MSRS"))?;
        if n == indices.len() {
            let _ = READABLE.set(indices);
            return Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect());
        }
        indices.remove(n);
    }
}

/// What KVM handed back in `kvm_run` at the end of a KVM_RUN
/// (KVM_CAP_SYNC_REGS; see [`crate::vcpu::Vcpu::settle`]): the same
/// values KVM_GET_REGS, KVM_GET_SREGS and KVM_GET_VCPU_EVENTS give, for
/// no ioctl.
#[derive(Clone, Copy)]
pub struct Synced {
    /// General registers.
    pub regs: kvm_bindings::kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_bindings::kvm_sregs,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_bindings::kvm_vcpu_events,
}

/// Saves the vCPU's state. The vCPU must not be running. `synced`, when
/// given, is its registers and events as they are now (each vCPU ioctl
/// costs ~15 us here, inside the pause).
pub fn save_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    synced: Option<&Synced>,
) -> Result<VcpuState, StateError> {
    Ok(save_vcpu_front(vcpu, synced)?.with_rest(save_vcpu_rest(kvm, vcpu)?))
}

/// The registers, segment registers and events (no ioctl with `synced`),
/// the rest left empty: what a migration sends first.
pub fn save_vcpu_front(vcpu: &VcpuFd, synced: Option<&Synced>) -> Result<VcpuState, StateError> {
    let (regs, sregs, events) = match synced {
        Some(s) => (s.regs, s.sregs, s.events),
        None => (
            vcpu.get_regs().map_err(io("KVM_GET_REGS"))?,
            vcpu.get_sregs().map_err(io("KVM_GET_SREGS"))?,
            vcpu.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?,
        ),
    };
    Ok(VcpuState {
        regs: pod_bytes(&regs),
        sregs: pod_bytes(&sregs),
        events: pod_bytes(&events),
        ..VcpuState::default()
    })
}

/// The rest of a stopped vCPU's state: an ioctl for each part.
pub fn save_vcpu_rest(kvm: &Kvm, vcpu: &VcpuFd) -> Result<VcpuRest, StateError> {
    Ok(VcpuRest {
        xsave: pod_bytes(&vcpu.get_xsave().map_err(io("KVM_GET_XSAVE"))?.region),
        xcrs: pod_bytes(&vcpu.get_xcrs().map_err(io("KVM_GET_XCRS"))?),
        lapic: pod_bytes(&vcpu.get_lapic().map_err(io("KVM_GET_LAPIC"))?),
        mp_state: pod_bytes(&vcpu.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?),
        debugregs: pod_bytes(&vcpu.get_debug_regs().map_err(io("KVM_GET_DEBUGREGS"))?),
        msrs: save_msrs(kvm, vcpu)?,
    })
}

/// Restores a vCPU created by [`create_vcpu`] (CPUID set) from `s`: its
/// front, then its rest (see [`restore_vcpu_front`] and
/// [`restore_vcpu_rest`]).
pub fn restore_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    s: &VcpuState,
    now: Option<&VcpuState>,
) -> Result<(), StateError> {
    restore_vcpu_front(vcpu, s, now)?;
    restore_vcpu_rest(kvm, vcpu, s, now)
}

/// Sets the segment registers (the APIC base and the modes first: the
/// LAPIC that follows is read by them) and the registers of `s`. What a
/// migration's destination does while the source still saves the rest.
pub fn restore_vcpu_front(
    vcpu: &VcpuFd,
    s: &VcpuState,
    now: Option<&VcpuState>,
) -> Result<(), StateError> {
    let regs: kvm_bindings::kvm_regs = pod_from("kvm_regs", &s.regs)?;
    let sregs: kvm_bindings::kvm_sregs = pod_from("kvm_sregs", &s.sregs)?;
    // Validated here, applied last by the rest.
    pod_from::<kvm_bindings::kvm_vcpu_events>("kvm_vcpu_events", &s.events)?;
    if now.is_none_or(|n| n.sregs != s.sregs) {
        vcpu.set_sregs(&sregs).map_err(io("KVM_SET_SREGS"))?;
    }
    if now.is_none_or(|n| n.regs != s.regs) {
        vcpu.set_regs(&regs).map_err(io("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// Sets the rest of `s` after its front: MP state, XSAVE, XCRs, debug
/// registers, the LAPIC, the MSRs after it, the events last. An armed TSC
/// deadline is set to fire at once: the host's TSC is not the one it was
/// armed against, and the guest re-arms it from its clock page.
///
/// `now`, when given, is this vCPU's own state as it is (saved after it
/// was created, nothing run since): parts equal to it are not set again.
/// Every vCPU ioctl costs ~15 us on PVM, and a migration's destination
/// loads the state inside the pause.
pub fn restore_vcpu_rest(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    s: &VcpuState,
    now: Option<&VcpuState>,
) -> Result<(), StateError> {
    if s.msrs.len() > MAX_MSRS {
        return Err(StateError::TooManyMsrs(s.msrs.len()));
    }
    // Only MSRs this KVM lists (and PVM's control MSR): a snapshot or a
    // migration stream does not get to poke any other index.
    for &(index, _) in &s.msrs {
        if !msr_allowed(kvm, index)? {
            return Err(StateError::NotListed(index));
        }
    }
    let mp: kvm_bindings::kvm_mp_state = pod_from("kvm_mp_state", &s.mp_state)?;
    let xsave = kvm_bindings::kvm_xsave {
        region: pod_from("kvm_xsave", &s.xsave)?,
        ..Default::default()
    };
    let xcrs: kvm_bindings::kvm_xcrs = pod_from("kvm_xcrs", &s.xcrs)?;
    let debugregs: kvm_bindings::kvm_debugregs = pod_from("kvm_debugregs", &s.debugregs)?;
    let lapic: kvm_bindings::kvm_lapic_state = pod_from("kvm_lapic_state", &s.lapic)?;
    let events: kvm_bindings::kvm_vcpu_events = pod_from("kvm_vcpu_events", &s.events)?;
    let changed = |part: fn(&VcpuState) -> &Vec<u8>| now.is_none_or(|n| part(n) != part(s));
    if changed(|v| &v.mp_state) {
        vcpu.set_mp_state(mp).map_err(io("KVM_SET_MP_STATE"))?;
    }
    // SAFETY: `xsave` is a full 4 KiB kvm_xsave, as KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(io("KVM_SET_XSAVE"))?;
    if changed(|v| &v.xcrs) {
        vcpu.set_xcrs(&xcrs).map_err(io("KVM_SET_XCRS"))?;
    }
    if changed(|v| &v.debugregs) {
        vcpu.set_debug_regs(&debugregs)
            .map_err(io("KVM_SET_DEBUGREGS"))?;
    }
    vcpu.set_lapic(&lapic).map_err(io("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data: if index == MSR_IA32_TSC_DEADLINE && data != 0 {
                1
            } else {
                data
            },
            ..Default::default()
        })
        .filter(|e| now.is_none_or(|n| !n.msrs.contains(&(e.index, e.data))))
        .collect();
    if !entries.is_empty() {
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::TooManyMsrs(entries.len()))?;
        let n = vcpu.set_msrs(&msrs).map_err(io("KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(match entries[n].index {
                MSR_PVM_CONTROL => StateError::PvmNative,
                index => StateError::Msr(index),
            });
        }
    }
    if changed(|v| &v.events) {
        vcpu.set_vcpu_events(&events)
            .map_err(io("KVM_SET_VCPU_EVENTS"))?;
    }
    Ok(())
}

/// The CPU features a guest sees that its code may rely on, as feature
/// words of CPUID: leaf 1 ECX and EDX, leaf 7 subleaf 0 EBX, ECX and EDX,
/// leaf 0x80000001 ECX and EDX. A guest keeps the features of the host it
/// booted on wherever it moves; a host that lacks one cannot take it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct CpuFeatures {
    /// The seven words, in the order above.
    pub words: [u32; 7],
}

/// The features checked, by word and bit, with their names.
const FEATURE_NAMES: &[(usize, u32, &str)] = &[
    (0, 0, "sse3"),
    (0, 1, "pclmulqdq"),
    (0, 9, "ssse3"),
    (0, 12, "fma"),
    (0, 13, "cx16"),
    (0, 19, "sse4.1"),
    (0, 20, "sse4.2"),
    (0, 22, "movbe"),
    (0, 23, "popcnt"),
    (0, 25, "aes"),
    (0, 26, "xsave"),
    (0, 28, "avx"),
    (0, 29, "f16c"),
    (0, 30, "rdrand"),
    (1, 0, "fpu"),
    (1, 23, "mmx"),
    (1, 25, "sse"),
    (1, 26, "sse2"),
    (2, 0, "fsgsbase"),
    (2, 3, "bmi1"),
    (2, 5, "avx2"),
    (2, 8, "bmi2"),
    (2, 9, "erms"),
    (2, 16, "avx512f"),
    (2, 17, "avx512dq"),
    (2, 18, "rdseed"),
    (2, 19, "adx"),
    (2, 28, "avx512cd"),
    (2, 29, "sha"),
    (2, 30, "avx512bw"),
    (2, 31, "avx512vl"),
    (3, 1, "avx512vbmi"),
    (3, 9, "vaes"),
    (3, 10, "vpclmulqdq"),
    (3, 11, "avx512vnni"),
    (5, 0, "lahf_lm"),
    (5, 5, "lzcnt"),
    (6, 20, "nx"),
    (6, 27, "rdtscp"),
    (6, 29, "lm"),
];

impl CpuFeatures {
    /// The features `self` has that `host` lacks, by name.
    pub fn missing_on(&self, host: &CpuFeatures) -> Vec<&'static str> {
        FEATURE_NAMES
            .iter()
            .filter(|&&(w, b, _)| self.words[w] >> b & 1 == 1 && host.words[w] >> b & 1 == 0)
            .map(|&(_, _, name)| name)
            .collect()
    }
}

/// What KVM_GET_SUPPORTED_CPUID says, asked once per process: it never
/// changes, and the ioctl costs ~0.3 ms on PVM, twice on every boot
/// (the vCPU's CPUID, then the features a migration checks).
fn supported_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId, Error> {
    static CPUID: std::sync::OnceLock<kvm_bindings::CpuId> = std::sync::OnceLock::new();
    if let Some(c) = CPUID.get() {
        return Ok(c.clone());
    }
    let c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::GetSupportedCpuid)?;
    Ok(CPUID.get_or_init(|| c).clone())
}

/// This host's CPU features as Ferry gives them to a guest it boots.
pub fn host_cpu_features(kvm: &Kvm) -> Result<CpuFeatures, Error> {
    let cpuid = supported_cpuid(kvm)?;
    let mut f = CpuFeatures::default();
    for e in cpuid.as_slice() {
        match (e.function, e.index) {
            (1, _) => {
                f.words[0] = e.ecx;
                f.words[1] = e.edx;
            }
            (7, 0) => {
                f.words[2] = e.ebx;
                f.words[3] = e.ecx;
                f.words[4] = e.edx;
            }
            (0x8000_0001, _) => {
                f.words[5] = e.ecx;
                f.words[6] = e.edx;
            }
            _ => {}
        }
    }
    Ok(f)
}

/// Saves the in-kernel PICs and IOAPIC.
pub fn save_irqchip(vm: &VmFd) -> Result<IrqchipState, StateError> {
    let mut chips = Vec::new();
    for id in 0..3 {
        let mut c = kvm_bindings::kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map_err(io("KVM_GET_IRQCHIP"))?;
        chips.push(pod_bytes(&c));
    }
    Ok(IrqchipState { chips })
}

/// Points IOAPIC pin `pin` at `vector` on vCPU 0 (fixed delivery,
/// physical destination, edge-triggered, active high, unmasked), as
/// firmware would for a guest that expects its interrupt lines routed
/// already: RustyHermit under uhyve's conventions never programs the
/// IOAPIC and takes legacy IRQ n at vector 32 + n.
pub fn route_ioapic_pin(vm: &VmFd, pin: u32, vector: u8) -> Result<(), StateError> {
    const KVM_IRQCHIP_IOAPIC: u32 = 2;
    let mut c = kvm_bindings::kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(io("KVM_GET_IRQCHIP"))?;
    // SAFETY: chip 2 is the IOAPIC, so KVM filled the union's `ioapic`
    // member; it is plain integers, valid for any bits.
    let ioapic = unsafe { &mut c.chip.ioapic };
    let entry = ioapic
        .redirtbl
        .get_mut(pin as usize)
        .ok_or(StateError::Size {
            what: "IOAPIC pin",
            got: pin as usize,
            want: 24,
        })?;
    entry.bits = u64::from(vector);
    vm.set_irqchip(&c).map_err(io("KVM_SET_IRQCHIP"))
}

/// Restores the in-kernel PICs and IOAPIC.
pub fn restore_irqchip(vm: &VmFd, s: &IrqchipState) -> Result<(), StateError> {
    if s.chips.len() != 3 {
        return Err(StateError::Size {
            what: "irqchip list",
            got: s.chips.len(),
            want: 3,
        });
    }
    for (id, bytes) in s.chips.iter().enumerate() {
        let mut c: kvm_bindings::kvm_irqchip = pod_from("kvm_irqchip", bytes)?;
        c.chip_id = id as u32;
        vm.set_irqchip(&c).map_err(io("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
