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

/// Horizontal pass (Pillow's `ImagingResampleHorizontal_8bpc`): resamples the rows
/// `row0..row0 + out_h` of `src` (`(src_h, src_w, 3)`) into an `(out_h, out_w, 3)` buffer.
fn resample_horizontal(src: &[u8], src_w: usize, row0: usize, out_h: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.first.len();
    let mut out = vec![0u8; out_h * out_w * 3]; // (out_h, out_w, 3)
    out.par_chunks_mut(out_w * 3)
        .enumerate()
        .for_each(|(yy, out_row)| {
            let in_row = &src[(row0 + yy) * src_w * 3..][..src_w * 3];
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
        });
    out
}

/// Vertical pass (Pillow's `ImagingResampleVertical_8bpc`): `src` is `(src_h, w, 3)` and the taps
/// index its rows directly; the result is `(out_h, w, 3)`.
fn resample_vertical(src: &[u8], w: usize, c: &Coeffs) -> Vec<u8> {
    let out_h = c.first.len();
    let mut out = vec![0u8; out_h * w * 3]; // (out_h, w, 3)
    out.par_chunks_mut(w * 3).enumerate().for_each(|(yy, out_row)| {
        let (ymin, n) = (c.first[yy], c.len[yy]);
        let k = &c.kk[yy * c.ksize..][..n];
        for (i, v) in out_row.iter_mut().enumerate() {
            let mut ss = HALF;
            for (y, &wgt) in k.iter().enumerate() {
                ss += i32::from(src[(ymin + y) * w * 3 + i]) * wgt;
            }
            *v = clip8(ss);
        }
    });
    out
}

/// Resizes `img` to `width` x `height` exactly as Pillow's `Image.resize((width, height), filter)`
/// does for an RGB image (no `box`, no `reducing_gap`).
///
/// As in Pillow's `ImagingResampleInner`, the horizontal pass runs first and only over the source
/// rows the vertical pass will read, each pass is skipped when its axis keeps its size, and the
/// intermediate image is rounded to 8 bits. Resizing to the same size returns a copy. A zero
/// target dimension gives an empty image.
pub fn resize_rgb(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
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
        buf = Some(resample_horizontal(src, in_w, ybox_first, rows, &horiz));
        buf_w = out_w;
    }
    let pixels = if need_vertical {
        let input = buf.as_deref().unwrap_or(src.as_slice());
        resample_vertical(input, buf_w, &vert) // (out_h, out_w, 3)
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
    fn zero_size_target_is_empty() {
        let img = noise(5, 5, 2);
        assert_eq!(resize_rgb(&img, 0, 3, Filter::Bicubic).width(), 0);
    }
}
