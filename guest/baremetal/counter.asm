; Kiln bare-metal test guest.
;
; Writes "kiln-counter N\n" to COM1 (I/O port 0x3f8) forever, N rising by
; one per line, about ten lines per second of guest time (TSC-paced). N lives
; in guest RAM, so it continues after pause/resume and snapshot/restore.
;
; Entry points:
;   pvh_start  32-bit protected mode, paging off (PVH boot: the ELF note
;              XEN_ELFNOTE_PHYS32_ENTRY below). Used by QEMU -kernel and by
;              Firecracker releases that support PVH.
;   _start     the ELF entry, for loaders that enter an ELF kernel in 64-bit
;              long mode with identity-mapped low memory (Firecracker without
;              PVH).
; Both run the same loop, assembled once per mode. No stack and no
; interrupts are needed.

%define COM1        0x3f8
%define TSC_PERIOD  0x10000000      ; ~0.1 s at 2.7 GHz

section .note.Xen note alloc noexec nowrite align=4
    dd 4                            ; name size ("Xen\0")
    dd 4                            ; descriptor size
    dd 18                           ; XEN_ELFNOTE_PHYS32_ENTRY
    db "Xen", 0
    dd pvh_start

section .bss nobits alloc noexec write align=16
counter:    resd 1
digits:     resb 16

section .rodata progbits alloc noexec nowrite align=16
prefix:     db "kiln-counter "
prefix_len  equ $ - prefix

section .text progbits alloc exec nowrite align=16

; Send AL to COM1 once the transmitter holding register is empty.
; Clobbers DX, AH.
%macro PUTC 0
    mov ah, al
%%wait:
    mov dx, COM1 + 5
    in al, dx
    test al, 0x20
    jz %%wait
    mov al, ah
    mov dx, COM1
    out dx, al
%endmacro

%macro COUNTER_LOOP 0
    ; 8N1, no interrupts, DLAB off.
    mov dx, COM1 + 1
    xor al, al
    out dx, al
    mov dx, COM1 + 3
    mov al, 0x03
    out dx, al
%%line:
    ; "kiln-counter "
    mov esi, prefix
    mov ecx, prefix_len
%%prefix:
    mov al, [esi]
    PUTC
    inc esi
    dec ecx
    jnz %%prefix
    ; decimal digits of the counter, most significant first
    mov eax, [counter]
    mov edi, digits + 16
    mov ecx, 10
%%div:
    xor edx, edx
    div ecx
    add dl, '0'
    dec edi
    mov [edi], dl
    test eax, eax
    jnz %%div
%%emit:
    mov al, [edi]
    PUTC
    inc edi
    cmp edi, digits + 16
    jne %%emit
    mov al, 10
    PUTC
    inc dword [counter]
    ; wait TSC_PERIOD ticks
    rdtsc
    mov esi, eax
    mov edi, edx
%%spin:
    pause
    rdtsc
    sub eax, esi
    sbb edx, edi
    jnz %%line
    cmp eax, TSC_PERIOD
    jb %%spin
    jmp %%line
%endmacro

bits 32
global pvh_start
pvh_start:
    cli
    COUNTER_LOOP

bits 64
global _start
_start:
    cli
    COUNTER_LOOP
