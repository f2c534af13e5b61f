/*
 * The test guest: a 64-bit payload that runs at CPL 3, and a multiboot
 * boot stub that lets a multiboot loader (QEMU's -kernel, GRUB) start it.
 *
 * The payload (section .payload, loaded at 0x10000) is the code the test
 * VMM in src/testvm.rs runs directly: its bytes are PAYLOAD there, and a
 * test checks that this file assembles to exactly those bytes.
 *
 * Registers on entry to the payload:
 *   rdi  working-set base (physical = virtual, identity-mapped)
 *   rsi  working-set pages (not 0)
 *   r8   report mask: it reports when (counter & r8) == 0
 *   rcx  the progress counter (0 on a fresh start)
 *   r9   TSC ticks to wait between reports, 0 for no pacing
 *   r10  the TSC deadline of the next report (0 on a fresh start)
 * It needs RFLAGS.IOPL = 3 (for out) and CR4.TSD = 0 (for rdtsc).
 *
 * Each iteration it adds one to the counter and stores the counter in one
 * page of the working set, so it dirties the pages in turn. When the
 * counter is a multiple of the report interval it writes the low 32 bits
 * of the counter to port 0x10 and, if r9 is not 0, waits until the TSC
 * reaches the deadline. A deadline more than one interval behind or ahead
 * of the TSC (a long pause, or a TSC that differs after a migration)
 * restarts the schedule from now instead of catching up.
 */
	.intel_syntax noprefix

	.section .payload, "awx"
	.code64
	.globl payload
payload:
loop:	inc	rcx
	mov	rax, rcx
	xor	edx, edx
	div	rsi			/* rdx = counter % pages */
	shl	rdx, 12
	mov	[rdi + rdx], rcx	/* dirty one page */
	test	rcx, r8
	jnz	loop
	mov	eax, ecx
	mov	edx, 0x10
	out	dx, eax			/* report to the VMM */
	test	r9, r9
	jz	loop
wait:	rdtsc
	shl	rdx, 32
	or	rax, rdx		/* rax = TSC */
	mov	rdx, r10
	sub	rdx, rax		/* rdx = deadline - TSC */
	jbe	next			/* the deadline has come */
	cmp	rdx, r9
	jbe	wait			/* within one interval: wait on */
restart:
	lea	r10, [rax + r9]
	jmp	loop
next:	add	r10, r9
	cmp	r10, rax
	jbe	restart			/* more than an interval behind */
	jmp	loop
	.globl payload_end
payload_end:

/*
 * Multiboot (version 1) header and boot stub. The loader enters `start` in
 * 32-bit protected mode at CPL 0 with paging off, eax = 0x2BADB002 and
 * ebx = the multiboot information. The stub builds the same machine the
 * test VMM builds (identity page tables of 2 MiB user pages over the first
 * GiB at 0x1000-0x3fff), enters long mode, reads its parameters from the
 * command line, and drops to the payload at CPL 3 with IOPL 3.
 *
 * Command line: every "=" is followed by a decimal number; the numbers in
 * order are the working-set pages, the report interval (a power of two)
 * and the TSC ticks between reports, for example
 *   wss=65536 every=256 ticks=11718750
 * Missing numbers keep their defaults (1024 pages, 256, 0). The working
 * set starts at 1 MiB and must fit in the guest's memory and the first GiB.
 */
	.section .boot, "awx"
	.align	4
multiboot_header:
	.long	0x1BADB002		/* magic */
	.long	0			/* flags: nothing asked of the loader */
	.long	-0x1BADB002		/* checksum: magic + flags + checksum = 0 */

	.code32
	.globl	start
start:
	cli
	mov	esp, 0x9000
	mov	ebp, ebx		/* the multiboot information */
	cmp	eax, 0x2BADB002
	je	1f
	xor	ebp, ebp		/* not started by multiboot: no command line */
1:
	/* Page tables: clear 0x1000-0x3fff, then PML4 -> PDPT -> PD. */
	xor	eax, eax
	mov	edi, 0x1000
	mov	ecx, 3 * 1024
	cld
	rep stosd
	mov	dword ptr [0x1000], 0x2000 | 7
	mov	dword ptr [0x2000], 0x3000 | 7
	mov	edi, 0x3000
	mov	eax, 0x87		/* present, writable, user, 2 MiB */
	mov	ecx, 512
2:	mov	[edi], eax
	mov	dword ptr [edi + 4], 0
	add	eax, 0x200000
	add	edi, 8
	loop	2b

	lgdt	[gdt_pointer]
	mov	eax, 0x620		/* PAE | OSFXSR | OSXMMEXCPT */
	mov	cr4, eax
	mov	eax, 0x1000
	mov	cr3, eax
	mov	ecx, 0xC0000080		/* EFER */
	rdmsr
	or	eax, 0x900		/* LME | NXE */
	wrmsr
	mov	eax, 0x80050033		/* PG | AM | WP | NE | ET | MP | PE */
	mov	cr0, eax
	ljmp	0x08, offset long_mode

	.code64
long_mode:
	mov	ax, 0x10
	mov	ds, ax
	mov	es, ax
	mov	ss, ax
	mov	esp, 0x9000
	/* Parameters from the command line, if there is one. */
	mov	ebx, ebp		/* zero-extends */
	test	rbx, rbx
	jz	run
	test	dword ptr [rbx], 4	/* flags: cmdline valid */
	jz	run
	mov	esi, [rbx + 16]		/* the command line */
	lea	rdi, [rip + params]
scan:	movzx	eax, byte ptr [rsi]
	inc	rsi
	test	eax, eax
	jz	run
	cmp	eax, '='
	jne	scan
	xor	edx, edx
digit:	movzx	eax, byte ptr [rsi]
	sub	eax, '0'
	cmp	eax, 9
	ja	store
	imul	rdx, rdx, 10
	add	rdx, rax
	inc	rsi
	jmp	digit
store:	mov	[rdi], rdx
	add	rdi, 8
	lea	rax, [rip + params_end]
	cmp	rdi, rax
	jb	scan

run:	mov	rsi, [rip + params]	/* working-set pages */
	test	rsi, rsi
	jnz	3f
	inc	rsi
3:	mov	r8, [rip + params + 8]	/* report interval */
	dec	r8			/* as a mask */
	mov	r9, [rip + params + 16]	/* ticks between reports */
	xor	r10, r10
	xor	ecx, ecx
	mov	edi, 0x100000		/* the working set starts at 1 MiB */
	push	0x1b			/* ss: user data */
	push	0x9000			/* rsp */
	push	0x3002			/* rflags: IOPL 3 */
	push	0x23			/* cs: user code */
	push	0x10000			/* rip: the payload */
	iretq

	.align	8
gdt:	.quad	0			/* null */
	.quad	0x00af9b000000ffff	/* 0x08 kernel code, 64-bit */
	.quad	0x00cf93000000ffff	/* 0x10 kernel data */
	.quad	0x00cff3000000ffff	/* 0x18 user data */
	.quad	0x00affb000000ffff	/* 0x20 user code, 64-bit */
gdt_end:
gdt_pointer:
	.word	gdt_end - gdt - 1
	.long	gdt

	.align	8
params:	.quad	1024			/* working-set pages */
	.quad	256			/* report interval */
	.quad	0			/* TSC ticks between reports */
params_end:
