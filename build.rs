// Re-run the build script when a kernel source changes: the CUDA sources under kernels/ are embedded
// with include_str! by the CUDA backend, and cargo must notice edits to them.
fn main() {
    println!("cargo:rerun-if-changed=kernels");
}
