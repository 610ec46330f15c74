//! Entry points: the Hermit 64-bit entry (Ferry's VMM, uhyve) and the PVH
//! 32-bit entry (QEMU `-kernel`), each ending in a Rust `*_main`.
//!
//! Hermit entry: long mode with identity paging, `rdi` = `RawBootInfo`,
//! `rsi` = CPU id, relocations already applied by the loader.
//!
//! PVH entry: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`,
//! the image loaded at its `p_paddr` (link address + 1 MiB) and not
//! relocated. The stub identity-maps the first 4 GiB with 2 MiB pages, enters
//! long mode, applies the image's own `R_X86_64_RELATIVE` relocations (with
//! RIP-relative addressing only: nothing may be read through the GOT before
//! that), and calls `pvh_main`.

use core::arch::global_asm;

/// Size of the boot stack (the only stack: one vCPU, no threads).
pub const STACK_SIZE: usize = 256 * 1024;

#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

#[unsafe(no_mangle)]
static mut __boot_stack: Stack = Stack([0; STACK_SIZE]);

hermit_entry::define_entry_version!();

global_asm!(
    r#"
    .section .text.boot, "ax"
    .code64
    .global _start
_start:
    cli
    lea rsp, [rip + __boot_stack + {stack_size}]
    xor ebp, ebp
    call {hermit_main}
    ud2

    .code32
    .global pvh_start
pvh_start:
    cli
    mov edi, ebx
    /* six zeroed pages in .bss: PML4, PDPT, PD0..PD3; every entry is
       present, writable and user (PVM native mode runs ring 0 on ring 3) */
    mov eax, offset __pvh_tables_phys
    lea ecx, [eax + 0x1007]
    mov [eax], ecx
    lea ecx, [eax + 0x2007]
    mov [eax + 0x1000], ecx
    lea ecx, [eax + 0x3007]
    mov [eax + 0x1008], ecx
    lea ecx, [eax + 0x4007]
    mov [eax + 0x1010], ecx
    lea ecx, [eax + 0x5007]
    mov [eax + 0x1018], ecx
    lea ebx, [eax + 0x2000]
    xor ecx, ecx
2:
    mov edx, ecx
    shl edx, 21
    or edx, 0x87
    mov [ebx + ecx * 8], edx
    mov dword ptr [ebx + ecx * 8 + 4], 0
    inc ecx
    cmp ecx, 2048
    jb 2b
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    mov eax, offset __pvh_gdtr_phys
    lgdt [eax]
    mov eax, offset __pvh_start64_phys
    push 0x08
    push eax
    retf

    .code64
    .global pvh_start64
pvh_start64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + __boot_stack + {stack_size}]
    lea rbx, [rip + __image_start]
    lea rcx, [rip + __rela_start]
    lea rdx, [rip + __rela_end]
3:
    cmp rcx, rdx
    jae 4f
    mov eax, [rcx + 8]
    cmp eax, 8
    jne 5f
    mov rax, [rcx]
    mov r8, [rcx + 16]
    add r8, rbx
    mov [rbx + rax], r8
5:
    add rcx, 24
    jmp 3b
4:
    mov edi, edi
    xor ebp, ebp
    call {pvh_main}
    ud2

    .section .rodata.pvh, "a"
    .balign 16
    .global __pvh_gdt
__pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .global __pvh_gdtr
__pvh_gdtr:
    .word 23
    .long __pvh_gdt_phys

    .section .bss.pvh_tables, "aw", @nobits
    .balign 4096
    .global __pvh_tables
__pvh_tables:
    .zero 6 * 4096
    "#,
    stack_size = const STACK_SIZE,
    hermit_main = sym crate::platform::hermit_main,
    pvh_main = sym crate::platform::pvh_main,
);
