//! Pillow-exact image resampling for 8-bit RGB images.
//!
//! The reference image processor (HF `CLIPImageProcessor`, PIL backend) resizes with Pillow's
//! `Image.resize`, whose C core (`libImaging/Resample.c`, `ImagingResample`) is a separable
//! convolution with its own quirks: the filter support widens by the down-scale factor, tap weights
//! are normalised in `f64` and then quantised to 22-bit fixed point, and the image is rounded back to
//! 8 bits between the horizontal and the vertical pass. General-purpose resizers (the `image`
//! crate's CatmullRom, `fast_image_resize`) differ from Pillow by several grey levels on a large
//! share of pixels, so this module re-implements Pillow's algorithm step by step; every rounding
//! below is there because Pillow rounds at that point.
use image::RgbImage;
use rayon::prelude::*;

/// Fixed-point precision of the tap weights: 32 bits minus 8 for the pixel value and 2 of head room
/// for the sum of several taps (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Resampling filter, with Pillow's kernels and supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Filter {
    /// Triangle filter, support 1 (`Image.BILINEAR`, PIL code 2).
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (`Image.BICUBIC`, PIL code 3; what CLIP uses).
    #[default]
    Bicubic,
    /// Sinc windowed by sinc, support 3 (`Image.LANCZOS`, PIL code 1).
    Lanczos,
}

impl Filter {
    /// Half-width of the kernel in input pixels when the image is not shrunk.
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// Kernel value at `x` (in output-pixel units), written in the same operation order as Pillow
    /// so that the `f64` results, and hence the quantised weights, are bit-identical.
    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Taps of one axis: output index `i` reads `len[i]` input samples starting at `first[i]`, with the
/// fixed-point weights `kk[i * ksize..][..len[i]]`.
struct Coeffs {
    ksize: usize,
    first: Vec<usize>,
    len: Vec<usize>,
    kk: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the source interval
/// `[in0, in1)` of an axis of `in_size` pixels mapped onto `out_size` pixels (`out_size > 0`).
fn precompute_coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Coeffs {
    // The box is `float` in Pillow: the difference is taken in f32, then widened.
    let scale = f64::from(in1 - in0) / out_size as f64;
    // Shrinking widens the kernel (anti-aliasing); enlarging keeps it at its natural width.
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;

    let mut first = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // `(int)(v + 0.5)` in C: rounding by truncation toward zero, then clamping to the image.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).max(0) as usize;

        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        // Normalise so that the taps sum to one (Pillow divides; it does not multiply by 1/ww).
        if ww != 0.0 {
            for kx in &mut k[..n] {
                *kx /= ww;
            }
        }
        // Quantise, rounding half away from zero (`(int)(±0.5 + v * 2^22)`).
        let one = f64::from(1u32 << PRECISION_BITS);
        for (dst, &v) in kk[xx * ksize..xx * ksize + n].iter_mut().zip(&k[..n]) {
            *dst = if v < 0.0 {
                (-0.5 + v * one) as i32
            } else {
                (0.5 + v * one) as i32
            };
        }
        first.push(xmin as usize);
        len.push(n);
    }
    Coeffs {
        ksize,
        first,
        len,
        kk,
    }
}

/// Rounds a fixed-point accumulator (which already holds the +0.5 bias) back to 8 bits, clipping.
#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Initial accumulator value: one half in fixed point, so that the final shift rounds to nearest.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Which inner loops run the two passes. Both give the same bytes; the reference is kept so that
/// the tests can check the fast one against loops shaped exactly like Pillow's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    /// Pillow's loop order: one output pixel (horizontal) or byte (vertical) at a time.
    #[cfg_attr(not(test), allow(dead_code))] // only the tests compare against it
    Reference,
    /// The fastest the CPU allows: AVX2 where detected at run time, else blocks of bytes that the
    /// compiler vectorizes for the baseline target.
    Fast,
}

/// Output rows per rayon job: a row of a typical image is a few microseconds of work, too little to
/// hand to another thread on its own.
const ROWS_PER_JOB: usize = 8;

/// Horizontal pass (Pillow's `ImagingResampleHorizontal_8bpc`): resamples the rows
/// `row0..row0 + out_h` of `src` (`(src_h, src_w, 3)`) into an `(out_h, out_w, 3)` buffer.
fn resample_horizontal(
    src: &[u8],
    src_w: usize,
    row0: usize,
    out_h: usize,
    c: &Coeffs,
    kernels: Kernels,
) -> Vec<u8> {
    let out_w = c.first.len();
    let mut out = vec![0u8; out_h * out_w * 3]; // (out_h, out_w, 3)
    let in_row = |yy: usize| &src[(row0 + yy) * src_w * 3..][..src_w * 3];
    #[cfg(target_arch = "x86_64")]
    if kernels == Kernels::Fast && std::arch::is_x86_feature_detected!("avx2") {
        let taps = simd::HorizontalTaps::new(c);
        out.par_chunks_mut(out_w * 3)
            .enumerate()
            .with_min_len(ROWS_PER_JOB)
            .for_each_init(Vec::new, |row_buf, (yy, out_row)| {
                // SAFETY: AVX2 was detected above.
                unsafe { simd::horizontal_row(in_row(yy), out_row, &taps, row_buf) }
            });
        return out;
    }
    out.par_chunks_mut(out_w * 3)
        .enumerate()
        .with_min_len(ROWS_PER_JOB)
        .for_each(|(yy, out_row)| horizontal_row_scalar(in_row(yy), out_row, c));
    out
}

/// One row of the horizontal pass, one output pixel at a time (the portable path, and the reference
/// the vector path is tested against).
fn horizontal_row_scalar(in_row: &[u8], out_row: &mut [u8], c: &Coeffs) {
    for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
        let (xmin, n) = (c.first[xx], c.len[xx]);
        let k = &c.kk[xx * c.ksize..][..n];
        let taps = &in_row[xmin * 3..(xmin + n) * 3];
        let mut ss = [HALF; 3];
        for (&w, p) in k.iter().zip(taps.chunks_exact(3)) {
            ss[0] += i32::from(p[0]) * w;
            ss[1] += i32::from(p[1]) * w;
            ss[2] += i32::from(p[2]) * w;
        }
        px[0] = clip8(ss[0]);
        px[1] = clip8(ss[1]);
        px[2] = clip8(ss[2]);
    }
}

/// Vertical pass (Pillow's `ImagingResampleVertical_8bpc`): `src` is `(src_h, w, 3)` and the taps
/// index its rows directly; the result is `(out_h, w, 3)`.
fn resample_vertical(src: &[u8], w: usize, c: &Coeffs, kernels: Kernels) -> Vec<u8> {
    let out_h = c.first.len();
    let mut out = vec![0u8; out_h * w * 3]; // (out_h, w, 3)
    #[cfg(target_arch = "x86_64")]
    let avx2 = kernels == Kernels::Fast && std::arch::is_x86_feature_detected!("avx2");
    out.par_chunks_mut(w * 3)
        .enumerate()
        .with_min_len(ROWS_PER_JOB)
        .for_each(|(yy, out_row)| {
            let (ymin, n) = (c.first[yy], c.len[yy]);
            let k = &c.kk[yy * c.ksize..][..n];
            let rows = &src[ymin * w * 3..(ymin + n) * w * 3];
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 was detected above.
                unsafe { simd::vertical_row_avx2(rows, k, out_row) };
                return;
            }
            match kernels {
                Kernels::Fast => vertical_row(rows, k, out_row),
                Kernels::Reference => vertical_row_reference(rows, k, out_row),
            }
        });
    out
}

/// One output row of the vertical pass: `rows` holds the `k.len()` input rows it reads, each as long
/// as `out_row`. Pillow sums the taps of one byte at a time; summing a block of bytes per tap instead
/// gives the same integers (the order of exact integer additions does not matter, and no partial sum
/// can overflow: |sum| <= 255 * sum|w| < 2^31), but lets the compiler use vector instructions.
#[inline(always)]
fn vertical_row(rows: &[u8], k: &[i32], out_row: &mut [u8]) {
    const BLOCK: usize = 32;
    let w3 = out_row.len();
    let mut blocks = out_row.chunks_exact_mut(BLOCK);
    for (b, out) in (&mut blocks).enumerate() {
        let x = b * BLOCK;
        let mut acc = [HALF; BLOCK];
        for (t, &wt) in k.iter().enumerate() {
            let row = &rows[t * w3 + x..][..BLOCK];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * wt;
            }
        }
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    let x0 = w3 - blocks.into_remainder().len();
    for i in x0..w3 {
        let mut ss = HALF;
        for (t, &wt) in k.iter().enumerate() {
            ss += i32::from(rows[t * w3 + i]) * wt;
        }
        out_row[i] = clip8(ss);
    }
}

/// One output row of the vertical pass in Pillow's order: all taps of one byte, then the next byte.
fn vertical_row_reference(rows: &[u8], k: &[i32], out_row: &mut [u8]) {
    let w3 = out_row.len();
    for (i, v) in out_row.iter_mut().enumerate() {
        let mut ss = HALF;
        for (t, &wt) in k.iter().enumerate() {
            ss += i32::from(rows[t * w3 + i]) * wt;
        }
        *v = clip8(ss);
    }
}

/// AVX2 versions of the two passes. They compute exactly the integers of the scalar code: same
/// 32-bit products and sums, only grouped differently (see [`vertical_row`]).
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Coeffs, HALF, PRECISION_BITS};

    /// Horizontal taps laid out for [`horizontal_row`]: per output pixel, `groups` groups of four
    /// taps, each tap's weight repeated in the four `i32` lanes of one pixel (R, G, B and a spare),
    /// zero past the pixel's last tap.
    pub struct HorizontalTaps<'a> {
        c: &'a Coeffs,
        groups: usize,
        weights: Vec<i32>, // (out_w, groups, 4 taps, 4 lanes)
    }

    impl<'a> HorizontalTaps<'a> {
        pub fn new(c: &'a Coeffs) -> Self {
            let groups = c.ksize.div_ceil(4);
            let out_w = c.first.len();
            let mut weights = vec![0i32; out_w * groups * 16];
            for (xx, dst) in weights.chunks_exact_mut(groups * 16).enumerate() {
                let k = &c.kk[xx * c.ksize..][..c.len[xx]];
                for (t, &w) in k.iter().enumerate() {
                    dst[t * 4..t * 4 + 4].fill(w);
                }
            }
            HorizontalTaps { c, groups, weights }
        }
    }

    /// One row of the horizontal pass. Four taps (twelve bytes) are loaded at once, spread to one
    /// pixel per four `i32` lanes, multiplied by their weights and accumulated; the two halves of the
    /// accumulator are summed at the end. Taps past a pixel's last one have weight zero, but their
    /// bytes are still loaded: pixels whose loads would run past the end of the row read from a
    /// zero-padded copy of the row's tail in `row_buf` instead (copying whole rows costs ~10 %).
    ///
    /// SAFETY: the CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn horizontal_row(
        in_row: &[u8],
        out_row: &mut [u8],
        taps: &HorizontalTaps,
        row_buf: &mut Vec<u8>,
    ) {
        let c = taps.c;
        let groups = taps.groups;
        let out_w = c.first.len();
        assert!(out_row.len() == out_w * 3 && taps.weights.len() == out_w * groups * 16);
        // Bytes one pixel's loads reach past its first tap: the last group starts 4·(groups − 1)
        // pixels in and loads 16 bytes.
        let reach = (4 * groups - 4) * 3 + 16;
        // `first` is non-decreasing, so the pixels whose loads fit in the row form a prefix.
        let split = c.first.partition_point(|&xmin| xmin * 3 + reach <= in_row.len());
        let wts = taps.weights.as_ptr() as *const __m256i;
        for xx in 0..split {
            // SAFETY: xmin·3 + reach <= in_row.len() (the partition above); the weights hold
            // out_w · groups · 2 vectors (asserted above).
            let rgb = pixel(
                in_row.as_ptr().add(c.first[xx] * 3),
                wts.add(xx * groups * 2),
                groups,
            );
            out_row[xx * 3..xx * 3 + 3].copy_from_slice(&rgb[..3]);
        }
        if split < out_w {
            let tail = c.first[split];
            row_buf.clear();
            row_buf.extend_from_slice(&in_row[tail * 3..]);
            row_buf.resize(row_buf.len() + reach, 0);
            for xx in split..out_w {
                // SAFETY: xmin >= tail and xmin <= in_w, so xmin·3 − tail·3 + reach is within the
                // copy plus its `reach` bytes of padding; weights as above.
                let src = row_buf.as_ptr().add((c.first[xx] - tail) * 3);
                let rgb = pixel(src, wts.add(xx * groups * 2), groups);
                out_row[xx * 3..xx * 3 + 3].copy_from_slice(&rgb[..3]);
            }
        }
    }

    /// One output pixel of the horizontal pass: `groups` groups of four taps read from `src` (16
    /// bytes per group, 12 apart) with the weights at `w` (two vectors per group). Returns R, G, B and
    /// a spare byte.
    ///
    /// SAFETY: AVX2; `src` readable for `12 · (groups − 1) + 16` bytes, `w` for `2 · groups` vectors.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn pixel(src: *const u8, w: *const __m256i, groups: usize) -> [u8; 4] {
        let spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
        let mut acc0 = _mm256_setzero_si256();
        let mut acc1 = _mm256_setzero_si256();
        for g in 0..groups {
            let v = _mm_shuffle_epi8(_mm_loadu_si128(src.add(g * 12) as *const __m128i), spread);
            let lo = _mm256_cvtepu8_epi32(v); // pixels 0, 1 of the group
            let hi = _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(v)); // pixels 2, 3
            let w = w.add(g * 2);
            acc0 = _mm256_add_epi32(acc0, _mm256_mullo_epi32(lo, _mm256_loadu_si256(w)));
            acc1 = _mm256_add_epi32(acc1, _mm256_mullo_epi32(hi, _mm256_loadu_si256(w.add(1))));
        }
        let acc = _mm256_add_epi32(acc0, acc1);
        let s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256::<1>(acc));
        let s = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(_mm_add_epi32(s, _mm_set1_epi32(HALF)));
        // Saturating packs clamp to 0..=255 exactly as `clip8` does.
        let s16 = _mm_packs_epi32(s, s);
        (_mm_cvtsi128_si32(_mm_packus_epi16(s16, s16)) as u32).to_le_bytes()
    }

    /// [`super::vertical_row`] compiled for AVX2 (8 lanes of 32-bit multiplies).
    ///
    /// SAFETY: the CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn vertical_row_avx2(rows: &[u8], k: &[i32], out_row: &mut [u8]) {
        super::vertical_row(rows, k, out_row)
    }
}

/// Resizes `img` to `width` x `height` exactly as Pillow's `Image.resize((width, height), filter)`
/// does for an RGB image (no `box`, no `reducing_gap`).
///
/// As in Pillow's `ImagingResampleInner`, the horizontal pass runs first and only over the source
/// rows the vertical pass will read, each pass is skipped when its axis keeps its size, and the
/// intermediate image is rounded to 8 bits. Resizing to the same size returns a copy. A zero
/// target dimension gives an empty image.
pub fn resize_rgb(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    resize_with(img, width, height, filter, Kernels::Fast)
}

fn resize_with(img: &RgbImage, width: u32, height: u32, filter: Filter, kernels: Kernels) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if out_w == 0 || out_h == 0 {
        return RgbImage::new(width, height);
    }
    // The box is the whole image, so `box[0] == 0` and `box[2] == in_w`: a pass is needed exactly
    // when its axis changes size.
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;
    if !need_horizontal && !need_vertical {
        return img.clone();
    }

    let horiz = precompute_coeffs(in_w, 0.0, in_w as f32, out_w, filter);
    let mut vert = precompute_coeffs(in_h, 0.0, in_h as f32, out_h, filter);
    // Source rows used by the vertical pass: only those go through the horizontal pass.
    let ybox_first = vert.first[0];
    let ybox_last = vert.first[out_h - 1] + vert.len[out_h - 1];

    let src = img.as_raw(); // (in_h, in_w, 3)
    let (mut buf, mut buf_w) = (None::<Vec<u8>>, in_w);
    if need_horizontal {
        for f in &mut vert.first {
            *f -= ybox_first;
        }
        let rows = ybox_last - ybox_first;
        // (rows, out_w, 3)
        buf = Some(resample_horizontal(src, in_w, ybox_first, rows, &horiz, kernels));
        buf_w = out_w;
    }
    let pixels = if need_vertical {
        let input = buf.as_deref().unwrap_or(src.as_slice());
        resample_vertical(input, buf_w, &vert, kernels) // (out_h, out_w, 3)
    } else {
        // Only the horizontal pass ran, over all rows (the vertical taps are the identity).
        buf.unwrap_or_else(|| src.clone())
    };
    RgbImage::from_raw(width, height, pixels).expect("resampled buffer has the output size")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut s = seed;
        RgbImage::from_fn(w, h, |_, _| {
            let mut px = [0u8; 3];
            for c in &mut px {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *c = (s >> 24) as u8;
            }
            image::Rgb(px)
        })
    }

    #[test]
    fn same_size_is_identity() {
        let img = noise(17, 9, 1);
        for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            assert_eq!(resize_rgb(&img, 17, 9, f), img);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([12, 200, 255]));
        for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            for (w, h) in [(11, 7), (80, 50), (37, 5), (3, 23), (100, 3)] {
                let out = resize_rgb(&img, w, h, f);
                assert_eq!((out.width(), out.height()), (w, h));
                assert!(
                    out.pixels().all(|p| p.0 == [12, 200, 255]),
                    "{f:?} {w}x{h} changed a constant image"
                );
            }
        }
    }

    #[test]
    fn one_axis_resize_keeps_other_axis() {
        // A vertical gradient resized horizontally only must keep each row constant.
        let img = RgbImage::from_fn(30, 10, |_, y| image::Rgb([(y * 20) as u8; 3]));
        let out = resize_rgb(&img, 13, 10, Filter::Bicubic);
        for y in 0..10 {
            assert!(out
                .rows()
                .nth(y as usize)
                .unwrap()
                .all(|p| p.0 == [(y * 20) as u8; 3]));
        }
    }

    #[test]
    fn fast_kernels_match_reference_loops() {
        // Shrinking and enlarging on each axis, odd widths (vector tails), 1-pixel images and
        // targets, strong shrink factors (wide kernels, many tap groups), and extreme contrast so
        // that negative lobes and clipping are exercised.
        let sizes = [
            ((640, 480), (448, 336)),
            ((427, 640), (299, 448)),
            ((56, 56), (448, 448)),
            ((119, 59), (448, 222)),
            ((51, 84), (272, 448)),
            ((33, 17), (7, 5)),
            ((1, 1), (9, 4)),
            ((5, 3), (1, 1)),
            ((1000, 20), (13, 37)),
            ((31, 29), (31, 61)),
            ((61, 29), (31, 29)),
        ];
        for (i, &((w, h), (ow, oh))) in sizes.iter().enumerate() {
            let mut img = noise(w, h, 10 + i as u32);
            // Black/white stripes drive the Lanczos overshoot past 0 and 255.
            for (x, _, p) in img.enumerate_pixels_mut().filter(|(_, y, _)| y % 3 == 0) {
                p.0 = if x % 2 == 0 { [0; 3] } else { [255; 3] };
            }
            for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
                let fast = resize_with(&img, ow, oh, f, Kernels::Fast);
                let reference = resize_with(&img, ow, oh, f, Kernels::Reference);
                assert!(fast == reference, "{f:?} {w}x{h} -> {ow}x{oh}");
            }
        }
    }

    #[test]
    fn zero_size_target_is_empty() {
        let img = noise(5, 5, 2);
        assert_eq!(resize_rgb(&img, 0, 3, Filter::Bicubic).width(), 0);
    }
}
