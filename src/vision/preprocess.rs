//! Image decoding and the CLIP image processor, matching HF transformers' `CLIPImageProcessor`
//! (PIL backend) pixel for pixel.
//!
//! The pipeline is the one of `shared/DESIGN.md` ("Numerics contract"): optional LLaVA
//! expand-to-square padding with the mean colour, shortest-edge bicubic resize (Pillow's resampler,
//! ported in [`super::resample`]), centre crop, rescale, normalize. Each step reproduces the
//! reference's integer and floating-point arithmetic, so that the output equals HF's `pixel_values`
//! bit for bit up to the f32 rounding of the normalisation.
use std::fmt;
use std::io::Cursor;
use std::path::Path;
use std::str::FromStr;

use image::{DynamicImage, ImageFormat, ImageReader, Limits, RgbImage};
use serde_json::{Map, Value};

use super::resample::{resize_rgb, Filter};
use crate::error::{Error, Result};

/// Largest accepted image side, in pixels (a decode limit: larger headers are rejected before any
/// allocation).
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Largest allocation the decoder may make, in bytes.
pub const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;

/// OpenAI CLIP normalisation mean (HF `OPENAI_CLIP_MEAN`), the default of `CLIPImageProcessor`.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP normalisation std (HF `OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// How a non-square image is made square before the CLIP processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AspectMode {
    /// LLaVA-1.5's `pad` (its training default): expand to a square filled with the mean colour,
    /// the image centred, so nothing is cropped away.
    #[default]
    Pad,
    /// Plain CLIP: resize the shortest edge and centre-crop, losing the borders of the long side.
    Crop,
}

impl FromStr for AspectMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pad" => Ok(AspectMode::Pad),
            "crop" => Ok(AspectMode::Crop),
            _ => Err(Error::Invalid(format!(
                "unknown image aspect mode `{s}` (expected `pad` or `crop`)"
            ))),
        }
    }
}

impl fmt::Display for AspectMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AspectMode::Pad => "pad",
            AspectMode::Crop => "crop",
        })
    }
}

/// Target of the resize step (HF's `size` dict).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// `{"shortest_edge": n}` (or a bare int): the short side becomes `n`, the long side
    /// `int(n * long / short)`, keeping the aspect ratio.
    ShortestEdge(u32),
    /// `{"height": h, "width": w}`: resize to exactly this size.
    Exact { height: u32, width: u32 },
}

/// The CLIP image processor of an HF `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipProcessor {
    pub do_resize: bool,
    pub size: ResizeTarget,
    pub resample: Filter,
    pub do_center_crop: bool,
    /// Crop size as (height, width).
    pub crop_size: (u32, u32),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Kept for completeness: [`load_image`] always yields RGB, which is what this flag asks for.
    pub do_convert_rgb: bool,
}

impl Default for ClipProcessor {
    /// The defaults of HF's `CLIPImageProcessor` (224 px OpenAI CLIP).
    fn default() -> Self {
        ClipProcessor {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(224),
            resample: Filter::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
        }
    }
}

impl ClipProcessor {
    /// Reads an HF `preprocessor_config.json`. Missing (or `null`) keys take the CLIP defaults;
    /// every error names the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::file(path, "expected a JSON object"))?;
        Self::from_json(obj).map_err(|msg| Error::file(path, msg))
    }

    /// Parses the keys of a preprocessor config; errors are messages without the file name.
    fn from_json(obj: &Map<String, Value>) -> std::result::Result<Self, String> {
        let d = ClipProcessor::default();
        // `null` is treated as absent, as HF does for keys saved without a value.
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let flag = |k: &str, default: bool| match get(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or(format!("`{k}` must be a boolean, got {v}")),
        };

        let size = match get("size") {
            None => d.size,
            Some(v) => parse_size(v)?,
        };
        let crop_size = match get("crop_size") {
            None => d.crop_size,
            Some(v) => parse_crop_size(v)?,
        };
        let resample = match get("resample") {
            None => d.resample,
            Some(v) => match v.as_i64() {
                Some(3) => Filter::Bicubic,
                Some(2) => Filter::Bilinear,
                Some(1) => Filter::Lanczos,
                _ => {
                    return Err(format!(
                        "unsupported `resample` {v} (supported: 3 = bicubic, 2 = bilinear, \
                         1 = lanczos)"
                    ))
                }
            },
        };
        let rescale_factor = match get("rescale_factor") {
            None => d.rescale_factor,
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or(format!("`rescale_factor` must be a finite number, got {v}"))?,
        };
        let image_mean = match get("image_mean") {
            None => d.image_mean,
            Some(v) => parse_triple("image_mean", v)?,
        };
        let image_std = match get("image_std") {
            None => d.image_std,
            Some(v) => parse_triple("image_std", v)?,
        };
        if image_std.contains(&0.0) {
            return Err(format!("`image_std` must be non-zero, got {image_std:?}"));
        }

        let p = ClipProcessor {
            do_resize: flag("do_resize", d.do_resize)?,
            size,
            resample,
            do_center_crop: flag("do_center_crop", d.do_center_crop)?,
            crop_size,
            do_rescale: flag("do_rescale", d.do_rescale)?,
            rescale_factor,
            do_normalize: flag("do_normalize", d.do_normalize)?,
            image_mean,
            image_std,
            do_convert_rgb: flag("do_convert_rgb", d.do_convert_rgb)?,
        };
        // The vision tower needs one fixed input size; without a crop, only an exact resize gives it.
        let fixed = p.do_center_crop || (p.do_resize && matches!(p.size, ResizeTarget::Exact { .. }));
        if !fixed {
            return Err(
                "the output size depends on the image: need `do_center_crop` or a \
                        `size` with `height` and `width`"
                    .into(),
            );
        }
        Ok(p)
    }

    /// Output (height, width) of [`ClipProcessor::preprocess`].
    pub fn output_size(&self) -> (usize, usize) {
        match (self.do_center_crop, self.size) {
            (false, ResizeTarget::Exact { height, width }) => (height as usize, width as usize),
            _ => (self.crop_size.0 as usize, self.crop_size.1 as usize),
        }
    }

    /// The expand-to-square fill colour of the `pad` mode: `int(mean * 255)` per channel
    /// (truncation, as LLaVA's `expand2square` call does).
    pub fn pad_color(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }

    /// Preprocesses one image into `pixel_values` of shape (3, H, W) with (H, W) =
    /// [`ClipProcessor::output_size`], channel-major (CHW) f32.
    pub fn preprocess(&self, img: &RgbImage, mode: AspectMode) -> Vec<f32> {
        let padded;
        let mut img = img;
        if mode == AspectMode::Pad && img.width() != img.height() {
            padded = expand_to_square(img, self.pad_color());
            img = &padded;
        }

        let resized;
        if self.do_resize {
            let (h, w) = self.resize_output_size(img.height(), img.width());
            resized = resize_rgb(img, w, h, self.resample);
            img = &resized;
        }

        let (out_h, out_w) = self.output_size();
        let cropped;
        if self.do_center_crop {
            cropped = center_crop(img, out_h as u32, out_w as u32);
            img = &cropped;
        }
        debug_assert_eq!((img.height() as usize, img.width() as usize), (out_h, out_w));

        // HF: `rescale` multiplies the uint8 values in f64 and casts to f32; `normalize` then
        // computes `(x - mean) / std` in f32 with mean and std cast to f32.
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let plane = out_h * out_w;
        let mut out = vec![0f32; 3 * plane]; // (3, H, W)
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                let mut x = if self.do_rescale {
                    (f64::from(px.0[c]) * self.rescale_factor) as f32
                } else {
                    f32::from(px.0[c])
                };
                if self.do_normalize {
                    x = (x - mean[c]) / std[c];
                }
                out[c * plane + i] = x;
            }
        }
        out
    }

    /// Loads an image file and preprocesses it (see [`load_image`], [`ClipProcessor::preprocess`]).
    pub fn load_and_preprocess(&self, path: impl AsRef<Path>, mode: AspectMode) -> Result<Vec<f32>> {
        Ok(self.preprocess(&load_image(path.as_ref())?, mode))
    }

    /// (height, width) after the resize step, as HF's `get_resize_output_image_size` with
    /// `default_to_square=False`: the short side becomes `size` and the long side
    /// `int(size * long / short)` (true division in f64, then truncation).
    fn resize_output_size(&self, height: u32, width: u32) -> (u32, u32) {
        match self.size {
            ResizeTarget::Exact { height, width } => (height, width),
            ResizeTarget::ShortestEdge(size) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // An empty image has no aspect ratio; treat it as square rather than divide by zero.
                let new_long = if short == 0 {
                    size
                } else {
                    (f64::from(size) * f64::from(long) / f64::from(short)) as u32
                };
                if width <= height {
                    (new_long, size)
                } else {
                    (size, new_long)
                }
            }
        }
    }
}

/// LLaVA's `expand2square`: a square of side max(w, h) filled with `fill`, the image pasted at
/// ((s - w) / 2, (s - h) / 2) with integer division.
fn expand_to_square(img: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    let s = w.max(h);
    let mut canvas = RgbImage::from_pixel(s, s, image::Rgb(fill));
    let (x0, y0) = ((s - w) / 2, (s - h) / 2);
    for (x, y, px) in img.enumerate_pixels() {
        canvas.put_pixel(x0 + x, y0 + y, *px);
    }
    canvas
}

/// HF's numpy `center_crop` to (ch, cw): along an axis at least as long as the crop, the window
/// starts at `(len - crop) / 2`; along a shorter axis the image is zero-padded, placed at offset
/// `ceil((crop - len) / 2)` of the crop.
fn center_crop(img: &RgbImage, ch: u32, cw: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    // (source start, destination start, length) along one axis.
    let axis = |len: u32, crop: u32| {
        if len >= crop {
            ((len - crop) / 2, 0, crop)
        } else {
            (0, (crop - len).div_ceil(2), len)
        }
    };
    let (sx, dx, nx) = axis(w, cw);
    let (sy, dy, ny) = axis(h, ch);
    let mut out = RgbImage::new(cw, ch); // zeros, as HF pads
    for y in 0..ny {
        for x in 0..nx {
            out.put_pixel(dx + x, dy + y, *img.get_pixel(sx + x, sy + y));
        }
    }
    out
}

fn parse_u32(key: &str, v: &Value) -> std::result::Result<u32, String> {
    v.as_u64()
        .filter(|&n| n > 0 && n <= u64::from(MAX_IMAGE_SIDE))
        .map(|n| n as u32)
        .ok_or(format!(
            "`{key}` must be an integer in 1..={MAX_IMAGE_SIDE}, got {v}"
        ))
}

/// `size`: `{"shortest_edge": n}`, `{"height": h, "width": w}` or a bare int (HF's
/// `get_size_dict(default_to_square=False)` reads an int as the shortest edge).
fn parse_size(v: &Value) -> std::result::Result<ResizeTarget, String> {
    if v.is_number() {
        return Ok(ResizeTarget::ShortestEdge(parse_u32("size", v)?));
    }
    let obj = v.as_object();
    let field = |k: &str| obj.and_then(|o| o.get(k)).filter(|x| !x.is_null());
    match (field("shortest_edge"), field("height"), field("width")) {
        (Some(_), _, _) if field("longest_edge").is_some() => {
            Err(format!("unsupported `size` {v}: `longest_edge` is not supported"))
        }
        (Some(s), None, None) => Ok(ResizeTarget::ShortestEdge(parse_u32("size.shortest_edge", s)?)),
        (None, Some(h), Some(w)) => Ok(ResizeTarget::Exact {
            height: parse_u32("size.height", h)?,
            width: parse_u32("size.width", w)?,
        }),
        _ => Err(format!(
            "unsupported `size` {v} (expected an int, {{\"shortest_edge\": n}} or \
             {{\"height\": h, \"width\": w}})"
        )),
    }
}

/// `crop_size`: `{"height": h, "width": w}` or a bare int (square; HF's default for crops).
fn parse_crop_size(v: &Value) -> std::result::Result<(u32, u32), String> {
    if v.is_number() {
        let n = parse_u32("crop_size", v)?;
        return Ok((n, n));
    }
    let obj = v.as_object();
    let field = |k: &str| obj.and_then(|o| o.get(k)).filter(|x| !x.is_null());
    match (field("height"), field("width"), field("shortest_edge")) {
        (Some(h), Some(w), None) => Ok((
            parse_u32("crop_size.height", h)?,
            parse_u32("crop_size.width", w)?,
        )),
        (None, None, Some(s)) => {
            let n = parse_u32("crop_size.shortest_edge", s)?;
            Ok((n, n))
        }
        _ => Err(format!(
            "unsupported `crop_size` {v} (expected an int or {{\"height\": h, \"width\": w}})"
        )),
    }
}

/// `image_mean` / `image_std`: three numbers, or one number for all channels.
fn parse_triple(key: &str, v: &Value) -> std::result::Result<[f64; 3], String> {
    let bad = || format!("`{key}` must be a number or a list of 3 numbers, got {v}");
    if let Some(x) = v.as_f64() {
        return Ok([x; 3]);
    }
    let arr = v.as_array().filter(|a| a.len() == 3).ok_or_else(bad)?;
    let mut out = [0.0; 3];
    for (o, x) in out.iter_mut().zip(arr) {
        *o = x.as_f64().filter(|f| f.is_finite()).ok_or_else(bad)?;
    }
    Ok(out)
}

/// Decodes an image file into 8-bit RGB, like PIL's `Image.open(path).convert("RGB")`.
///
/// The format is guessed from the content (the extension is only a fallback). Decoding is bounded
/// (sides up to [`MAX_IMAGE_SIDE`], allocations up to [`MAX_DECODE_ALLOC`]) so that a hostile header
/// cannot exhaust memory, and a truncated JPEG is an error, as in PIL (the JPEG decoder used here
/// would otherwise fill the missing part with grey). Alpha is dropped without compositing, as PIL's
/// `convert("RGB")` does; 16-bit samples keep their high byte, as PIL's PNG reader does for RGB.
/// Every error is an [`Error::File`] (or [`Error::Io`]) naming `path`.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut reader = ImageReader::new(Cursor::new(bytes.as_slice()))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    // The content decides; the extension is only tried when no format signature matches.
    let by_content = reader.format().is_some();
    if !by_content {
        match ImageFormat::from_path(path) {
            Ok(format) => reader.set_format(format),
            Err(_) => return Err(Error::file(path, "not an image file (unrecognised format)")),
        }
    }
    if reader.format() == Some(ImageFormat::Jpeg) {
        check_jpeg_complete(&bytes).map_err(|msg| Error::file(path, msg))?;
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(e) => Error::file(
            path,
            format!(
                "image too large to decode ({e}; limits: {MAX_IMAGE_SIDE} px per side, \
                 {} MiB)",
                MAX_DECODE_ALLOC >> 20
            ),
        ),
        e if !by_content => Error::file(
            path,
            format!("not an image file: its content matches no supported format ({e})"),
        ),
        e => Error::file(path, format!("cannot decode image: {e}")),
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::file(path, "image has no pixels"));
    }
    Ok(to_rgb8(img))
}

/// PIL-like conversion to RGB8: alpha dropped, grey replicated, 16-bit reduced to the high byte.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let high = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageRgb16(i) => {
            RgbImage::from_fn(w, h, |x, y| image::Rgb(i.get_pixel(x, y).0.map(high)))
        }
        DynamicImage::ImageRgba16(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([high(p[0]), high(p[1]), high(p[2])])
        }),
        DynamicImage::ImageLuma16(i) => {
            RgbImage::from_fn(w, h, |x, y| image::Rgb([high(i.get_pixel(x, y).0[0]); 3]))
        }
        DynamicImage::ImageLumaA16(i) => {
            RgbImage::from_fn(w, h, |x, y| image::Rgb([high(i.get_pixel(x, y).0[0]); 3]))
        }
        other => other.into_rgb8(),
    }
}

/// Walks the JPEG marker structure and fails unless it reaches the end-of-image marker, i.e. the
/// file was cut short (PIL raises "image file is truncated" there).
fn check_jpeg_complete(b: &[u8]) -> std::result::Result<(), String> {
    const TRUNCATED: &str = "truncated JPEG (no end-of-image marker)";
    if !b.starts_with(&[0xFF, 0xD8]) {
        return Err("not a JPEG file (missing start-of-image marker)".into());
    }
    let mut i = 2;
    loop {
        // Expect a marker, possibly preceded by fill bytes 0xFF.
        if i >= b.len() {
            return Err(TRUNCATED.into());
        }
        if b[i] != 0xFF {
            // Stray bytes before a marker: decoders skip them with a warning, and so do we.
            i += 1;
            continue;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = b.get(i) else {
            return Err(TRUNCATED.into());
        };
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            // Stand-alone markers: restart intervals and TEM carry no length.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let len = match b.get(i..i + 2) {
            Some(l) => usize::from(u16::from_be_bytes([l[0], l[1]])),
            None => return Err(TRUNCATED.into()),
        };
        if len < 2 {
            return Err(format!("corrupt JPEG: segment length {len} at byte {i}"));
        }
        i += len;
        if i > b.len() {
            return Err(TRUNCATED.into());
        }
        if marker == 0xDA {
            // Entropy-coded data follows the scan header: skip to the next marker that is neither a
            // stuffed 0xFF00 nor a restart marker.
            loop {
                match b.get(i..i + 2) {
                    None => return Err(TRUNCATED.into()),
                    Some([0xFF, 0x00]) | Some([0xFF, 0xD0..=0xD7]) => i += 2,
                    Some([0xFF, _]) => break,
                    Some(_) => i += 1,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aspect_mode_round_trips() {
        for m in [AspectMode::Pad, AspectMode::Crop] {
            assert_eq!(m.to_string().parse::<AspectMode>().unwrap(), m);
        }
        let err = "square".parse::<AspectMode>().unwrap_err().to_string();
        assert!(err.contains("square") && err.contains("pad"), "{err}");
    }

    #[test]
    fn resize_size_follows_hf() {
        let p = ClipProcessor {
            size: ResizeTarget::ShortestEdge(56),
            ..Default::default()
        };
        // wide 119x59 -> short 56, long int(56 * 119 / 59) = 112
        assert_eq!(p.resize_output_size(59, 119), (56, 112));
        // tall 51x84 -> int(56 * 84 / 51) = 92
        assert_eq!(p.resize_output_size(84, 51), (92, 56));
    }

    #[test]
    fn center_crop_pads_small_images_with_zeros() {
        let img = RgbImage::from_pixel(3, 6, image::Rgb([9, 9, 9]));
        let out = center_crop(&img, 4, 6); // h 6 -> 4 (start 1), w 3 -> 6 (offset ceil(3/2) = 2)
        let cols: Vec<u8> = (0..6).map(|x| out.get_pixel(x, 0).0[0]).collect();
        assert_eq!(cols, [0, 0, 9, 9, 9, 0]);
    }

    #[test]
    fn jpeg_structure_check() {
        let mut full = vec![0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF, 0x00, 0x34];
        assert!(check_jpeg_complete(&full).is_err());
        full.extend([0xFF, 0xD9]);
        assert!(check_jpeg_complete(&full).is_ok());
    }
}
