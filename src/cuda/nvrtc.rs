//! NVRTC through cudarc, loaded dynamically. `available()` probes for the library without cudarc's
//! panic; `compile` builds one kernel family to CUBIN for an architecture and reads the per-kernel
//! resource usage from ptxas' verbose report; `compile_cached` keeps CUBINs on disk keyed by
//! hash(source, arch, options, NVRTC version).
use std::ffi::CString;
use std::path::PathBuf;

use super::Family;
use crate::{Error, Result};

/// Whether libnvrtc can be loaded (LD_LIBRARY_PATH, the system, the CUDA 13 wheel's soname).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn require() -> Result<()> {
    if available() {
        Ok(())
    } else {
        Err(Error::Invalid(
            "NVRTC (libnvrtc.so.13) not found: install it (`pip install nvidia-cuda-nvrtc==13.0.88`) and add its \
             nvidia/cu13/lib folder to LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32)> {
    require()?;
    let (mut a, mut b) = (0, 0);
    // SAFETY: the library is present (checked above); two out-pointers.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Invalid(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((a, b))
}

/// Registers, shared memory and spills of one kernel, from ptxas' report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub name: String,
    pub regs: u32,
    pub smem: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// local memory per thread (a register array indexed at run time, or spills)
    pub stack: u32,
}

/// A compiled family.
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
    pub stats: Vec<KernelStats>,
}

/// The options every kernel is compiled with: the device's own arch (CUBIN, no PTX JIT), C++17, fast
/// but IEEE-correct division and square roots (numerics are compared with the CPU twins).
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--ptxas-options=-v".into(),
        "-default-device".into(),
    ]
}

/// Compiles `family` for `arch` (e.g. `sm_90a`) to CUBIN. A compile error names the family and
/// carries NVRTC's log.
pub fn compile(family: &Family, arch: &str) -> Result<Compiled> {
    use cudarc::nvrtc::sys;
    require()?;
    let src = CString::new(family.unit()).expect("kernel sources hold no NUL");
    let name = CString::new(format!("{}.cu", family.name)).expect("name");
    let opts: Vec<CString> = options(arch)
        .into_iter()
        .map(|o| CString::new(o).expect("option"))
        .collect();
    let ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let fail = |what: &str, r: sys::nvrtcResult| {
        Error::Invalid(format!("kernels/{}.cu: {what}: {r:?}", family.name))
    };
    // SAFETY: NVRTC's C API used as documented: create, compile, read log and CUBIN, destroy; every
    // buffer is sized by the matching *Size call.
    unsafe {
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        let r = sys::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(fail("nvrtcCreateProgram", r));
        }
        let compiled = sys::nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr());
        let mut n = 0usize;
        sys::nvrtcGetProgramLogSize(prog, &mut n);
        let mut log = vec![0u8; n.max(1)];
        sys::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut _);
        let log = String::from_utf8_lossy(&log).trim_end_matches('\0').to_string();
        if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
            sys::nvrtcDestroyProgram(&mut prog);
            return Err(Error::Invalid(format!(
                "kernels/{}.cu does not compile for {arch} ({compiled:?}):\n{log}",
                family.name
            )));
        }
        let mut size = 0usize;
        let r = sys::nvrtcGetCUBINSize(prog, &mut size);
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            sys::nvrtcDestroyProgram(&mut prog);
            return Err(fail("nvrtcGetCUBINSize", r));
        }
        let mut cubin = vec![0u8; size];
        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _);
        sys::nvrtcDestroyProgram(&mut prog);
        let stats = parse_ptxas(&log);
        Ok(Compiled { cubin, log, stats })
    }
}

/// Per-kernel resource usage from ptxas' `-v` report:
/// `Compiling entry function 'NAME' for 'sm_90a'` / `N bytes stack frame, S bytes spill stores, L
/// bytes spill loads` / `Used R registers, ... M bytes smem, ...`.
pub fn parse_ptxas(log: &str) -> Vec<KernelStats> {
    let num_before = |line: &str, unit: &str| -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    let mut out: Vec<KernelStats> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelStats {
                name,
                ..Default::default()
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("stack frame") {
                k.stack = num_before(line, " bytes stack frame").unwrap_or(0);
            }
            if line.contains("spill stores") {
                k.spill_stores = num_before(line, " bytes spill stores").unwrap_or(0);
                k.spill_loads = num_before(line, " bytes spill loads").unwrap_or(0);
            }
            if line.contains("Used ") && line.contains("registers") {
                k.regs = num_before(line, " registers").unwrap_or(0);
                k.smem = num_before(line, " bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// ptxas' notes that it serialized `wgmma` or waited on its results where the source does not
/// (`(C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized ...`, `(C7517)
/// warpgroup.wait is injected ...`, `(C7519) warpgroup.arrive is injected ...`): the kernel is still
/// correct, but its tensor-core pipeline is not the one written. One line per note.
pub fn wgmma_notes(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Potential Performance Loss") || l.contains(" is injected "))
        .map(|l| l.trim().to_string())
        .collect()
}

/// Where compiled kernels are kept: `$MIADPO_KERNEL_CACHE`, else `$XDG_CACHE_HOME/miadpo/kernels`, else
/// `~/.cache/miadpo/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MIADPO_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("miadpo").join("kernels")
}

/// The CUBIN of `family` for `arch`, from the cache when its key (source, arch, options, NVRTC
/// version) is there, else compiled and stored (atomically).
pub fn compile_cached(family: &Family, arch: &str) -> Result<Vec<u8>> {
    let (major, minor) = version()?;
    let mut h = crate::train::checkpoint::Fnv::default();
    h.eat(family.unit().as_bytes());
    h.eat(arch.as_bytes());
    h.eat(options(arch).join(" ").as_bytes());
    h.eat(format!("nvrtc {major}.{minor}").as_bytes());
    let path = cache_dir().join(format!("{}-{arch}-{}.cubin", family.name, h.hex()));
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok(bytes);
    }
    let c = compile(family, arch)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::augment::run::write_atomic(&path, &c.cubin)?;
    Ok(c.cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_is_parsed_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'rms_norm_fwd' for 'sm_90a'\n\
ptxas info    : Function properties for rms_norm_fwd\n\
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 18 registers, used 1 barriers, 128 bytes smem, 380 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'add_bf16' for 'sm_90a'\n\
ptxas info    : Function properties for add_bf16\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 10 registers, used 0 barriers, 372 bytes cmem[0]\n";
        let s = parse_ptxas(log);
        assert_eq!(
            s,
            [
                KernelStats {
                    name: "rms_norm_fwd".into(),
                    regs: 18,
                    smem: 128,
                    spill_stores: 8,
                    spill_loads: 4,
                    stack: 16
                },
                KernelStats {
                    name: "add_bf16".into(),
                    regs: 10,
                    smem: 0,
                    spill_stores: 0,
                    spill_loads: 0,
                    stack: 0
                },
            ]
        );
    }

    #[test]
    fn wgmma_serialization_notes_are_found() {
        let log = "ptxas info    : (C7519) warpgroup.arrive is injected in around line 81 by compiler to allow use of registers in GMMA in function 'bad'\n\
ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the wgmma pipeline in the function 'bad'\n\
ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'bad' for 'sm_90a'\n";
        let notes = wgmma_notes(log);
        assert_eq!(notes.len(), 2);
        assert!(notes[1].contains("(C7511)"));
        assert!(wgmma_notes("ptxas info    : Used 10 registers, used 0 barriers\n").is_empty());
    }

    #[test]
    fn every_family_lists_its_kernels() {
        assert!(super::super::FAMILIES.len() >= 8);
        for f in super::super::FAMILIES {
            assert!(!f.kernels.is_empty(), "{}", f.name);
            for k in f.kernels {
                let plain = format!("void {k}(");
                let bounded = format!(") {k}("); // `void __launch_bounds__(N) name(`
                assert!(
                    f.source.contains(&plain) || f.source.contains(&bounded),
                    "{}: {k}",
                    f.name
                );
            }
        }
    }
}
