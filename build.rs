// Embeds the CUDA sources under kernels/ and generates the kernel table (`$OUT_DIR/kernels.rs`):
// one entry per `*.cu` file (its family), with the names of its `extern "C" __global__` kernels, so
// `miadpo kernels list/check` and the CUDA backend know every kernel without a hand-kept list.
use std::fmt::Write;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("kernels");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("kernels/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    let mut out = String::from("pub static FAMILIES: &[Family] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let src = std::fs::read_to_string(f).expect("kernel source");
        let names: Vec<String> = src
            .lines()
            .filter_map(|l| {
                let rest = l.trim_start().strip_prefix("extern \"C\" __global__ void ")?;
                // `void __launch_bounds__(N) name(`: the name follows the bounds
                let rest = match rest.strip_prefix("__launch_bounds__(") {
                    Some(r) => r.split_once(')')?.1.trim_start(),
                    None => rest,
                };
                Some(rest.split('(').next()?.trim().to_string())
            })
            .collect();
        assert!(
            !names.is_empty(),
            "{}: no extern \"C\" __global__ kernel",
            f.display()
        );
        let family = f.file_stem().unwrap().to_str().unwrap();
        writeln!(
            out,
            "    Family {{ name: {family:?}, source: include_str!({:?}), kernels: &{names:?} }},",
            f.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n");
    writeln!(
        out,
        "pub static COMMON: &str = include_str!({:?});",
        dir.join("common.cuh").display().to_string()
    )
    .unwrap();
    let dest = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.rs");
    std::fs::write(dest, out).unwrap();
}
