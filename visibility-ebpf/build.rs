//! Linker flags for the datapath object.

fn main() {
    // bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM by default, which also
    // turns off inline expansion of `memset`: every zeroed key or padding field then
    // became a call to a byte-at-a-time loop, tens of nanoseconds per packet each.
    // Without it LLVM expands memset and memcpy into plain stores.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    // LLVM refuses a frame whose deepest slot starts 512 bytes down, which the verifier
    // allows (its limit covers [-512, 0)): `pod_egress` uses exactly that much. Every
    // program is still loaded, and so verified, by the tests on each supported kernel.
    println!("cargo:rustc-link-arg-bins=--llvm-args=-bpf-stack-size=520");
}
