/*
 * The tiny Firecracker test guest: a few hundred bytes of x86-64, no kernel.
 *
 * Firecracker loads an ELF "vmlinux" without a PVH note with the Linux 64-bit boot
 * protocol: long mode, identity-mapped paging, a flat GDT, rsp in low memory.  So this
 * runs straight from _start (linked at 1 MiB):
 *   1. prints "MARATHON-FC-GUEST up" on COM1 (outb to 0x3f8; Firecracker's serial goes to
 *      the VMM's stdout),
 *   2. arms the local APIC timer (x2APIC MSRs, periodic, vector 32, ~50 ms under KVM's
 *      1 GHz APIC bus) with a one-entry IDT,
 *   3. masks the legacy PIC (see below) and halts; each timer interrupt prints "tick <8 hex digits>" with a counter kept in guest
 *      memory.
 * After a snapshot is restored the counter continues from where it was: proof that the
 * restored memory and vCPU state are the snapshot's and that the guest runs again.
 */
    .ifndef PERIOD
    .set PERIOD, 50000000          /* 50 ms at KVM's 1 GHz APIC bus */
    .endif
    .code64
    .text
    .globl _start
_start:
    cli
    /* Mask the legacy 8259 PICs: after a snapshot is restored Firecracker raises the VMGenID
     * IRQ 5, which an unprogrammed PIC delivers as vector 5 (not in our IDT: triple fault). */
    mov $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    lea banner(%rip), %rsi
    mov $bannerlen, %ecx
    call puts

    /* IDT gate 32 -> tick: offset split over three fields, selector = our CS */
    lea idt+32*16(%rip), %rdi
    lea tick(%rip), %rax
    mov %ax, (%rdi)
    mov %cs, %bx
    mov %bx, 2(%rdi)
    movw $0x8e00, 4(%rdi)          /* present, DPL 0, 64-bit interrupt gate */
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    lidt idtr(%rip)

    /* x2APIC: enable (IA32_APIC_BASE bits 10+11), software-enable via SVR, timer */
    mov $0x1b, %ecx
    rdmsr
    or $0xc00, %eax
    wrmsr
    xor %edx, %edx
    mov $0x80f, %ecx               /* spurious vector register: enable | 0xff */
    mov $0x1ff, %eax
    wrmsr
    mov $0x83e, %ecx               /* divide configuration: by 1 */
    mov $0xb, %eax
    wrmsr
    mov $0x832, %ecx               /* LVT timer: periodic, vector 32 */
    mov $0x20020, %eax
    wrmsr
    mov $0x838, %ecx               /* initial count: PERIOD ns (as --defsym PERIOD=...) */
    mov $PERIOD, %eax
    wrmsr
    lea armed(%rip), %rsi
    mov $armedlen, %ecx
    call puts
    sti
1:  hlt
    jmp 1b

/* write %ecx bytes from %rsi to COM1 */
puts:
    mov $0x3f8, %dx
2:  lodsb
    outb %al, %dx
    loop 2b
    ret

tick:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    incq ticks(%rip)
    lea tickmsg(%rip), %rsi
    mov $5, %ecx
    call puts
    mov ticks(%rip), %rax
    mov $8, %ecx
    mov $0x3f8, %dx
3:  rol $4, %eax                   /* most significant nibble first */
    push %rax
    and $0xf, %eax
    lea hexdigits(%rip), %rsi
    movb (%rsi,%rax), %al
    outb %al, %dx
    pop %rax
    loop 3b
    mov $10, %al
    outb %al, %dx
    xor %eax, %eax                 /* x2APIC EOI */
    xor %edx, %edx
    mov $0x80b, %ecx
    wrmsr
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq

banner: .ascii "MARATHON-FC-GUEST up\n"
    .set bannerlen, . - banner
armed: .ascii "timer armed\n"
    .set armedlen, . - armed
tickmsg: .ascii "tick "
hexdigits: .ascii "0123456789abcdef"
    .balign 8
idtr: .word 256*16-1
    .quad idt
ticks: .quad 0
    .balign 16
idt: .fill 256*16, 1, 0
