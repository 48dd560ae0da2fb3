//! What every eBPF object of this crate carries besides its programs and maps: the
//! panic handler a `no_std` binary needs, and the license the kernel reads.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
