//! Image composition for the *grid collage* and *pic-in-pic* augmentations (MIA-DPO, section 3).
//!
//! Pure functions on in-memory RGB images: no I/O and no randomness. The caller (the augment stage)
//! picks which images go where, so the same inputs always give the same pixels, whatever the thread
//! count.
//!
//! Geometry follows the original MIA-DPO collage code: every image is resized with Lanczos to fit a
//! 448×448 cell (aspect ratio kept, pasted at the cell's top-left on white), cells are 40 px apart,
//! and each row of cells has a 40 px band above it holding the labels `Image1`, `Image2`, ... that
//! the rewritten prompts refer to. Resizing goes through [`resize_rgb`], a port of Pillow's resampler,
//! so a collage matches the Pillow-based original pixel for pixel in its cells.
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::vision::resample::{resize_rgb, Filter};

/// Side of a square grid cell: LLaVA-1.5's CLIP works at 336 px, and 448 keeps a 3×3 collage legible
/// after the processor shrinks it, as in the original code.
pub const CELL: u32 = 448;
/// White space between neighbouring cells, so that the model sees where one image ends.
pub const GAP: u32 = 40;
/// Height of the band above each row of cells that holds the `ImageK` labels.
pub const LABEL_BAND: u32 = 40;

/// Label font size in pixels per em, i.e. what Pillow's `ImageFont.truetype(path, 36)` uses.
const LABEL_EM_PX: f32 = 36.0;
/// Left offset of a label from its cell's left edge.
const LABEL_INDENT: u32 = 20;

/// DejaVu Sans Bold (Bitstream Vera licence, `assets/fonts/DejaVu-LICENSE.txt`), embedded so that the
/// labels do not depend on the fonts installed on the machine.
pub(crate) static FONT_BYTES: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/DejaVuSans-Bold.ttf"
));

/// The parsed label font and the label placement derived from its metrics; immutable once built.
struct LabelStyle {
    font: FontRef<'static>,
    scale: PxScale,
    /// Offset from the top of the label band to the `y` that `draw_text_mut` takes, chosen so that
    /// the ink of `ImageK` (cap height to the descender of `g`) is centred in the band.
    dy: i32,
}

/// Parses the embedded font once. Parsing a constant cannot fail on one run and succeed on another,
/// so the outcome (font or message) is cached as it is.
fn label_style() -> Result<&'static LabelStyle> {
    static STYLE: OnceLock<std::result::Result<LabelStyle, String>> = OnceLock::new();
    STYLE
        .get_or_init(|| {
            let font = FontRef::try_from_slice(FONT_BYTES)
                .map_err(|e| format!("embedded label font DejaVuSans-Bold.ttf: {e}"))?;
            // ab_glyph scales by the line height (ascent − descent); Pillow and CSS sizes are per em.
            let units_per_em = font
                .units_per_em()
                .ok_or("embedded label font has no units_per_em")?;
            let scale = PxScale::from(LABEL_EM_PX * font.height_unscaled() / units_per_em);
            let (top, bottom) = ink_rows(&font, scale, "Image0123456789");
            let dy = (LABEL_BAND as i32 - (bottom - top)) / 2 - top;
            Ok(LabelStyle { font, scale, dy })
        })
        .as_ref()
        .map_err(|msg| Error::Invalid(msg.clone()))
}

/// Rows covered by the ink of `text` relative to the `y` given to `draw_text_mut` (which puts the
/// baseline at `y + ascent`), as `[top, bottom)`; rounded the way `draw_text_mut` rounds.
fn ink_rows(font: &FontRef<'_>, scale: PxScale, text: &str) -> (i32, i32) {
    let scaled = font.as_scaled(scale);
    let (mut top, mut bottom) = (i32::MAX, i32::MIN);
    for c in text.chars() {
        let glyph = font
            .glyph_id(c)
            .with_scale_and_position(scale, ab_glyph::point(0.0, scaled.ascent()));
        if let Some(outline) = font.outline_glyph(glyph) {
            let bb = outline.px_bounds();
            let y0 = bb.min.y.round() as i32;
            top = top.min(y0);
            bottom = bottom.max(y0 + bb.height() as i32);
        }
    }
    if top > bottom {
        (0, 0)
    } else {
        (top, bottom)
    }
}

/// Rows × columns of the collage for `n` images; `None` for counts MIA-DPO does not use.
pub fn grid_shape(n: usize) -> Option<(u32, u32)> {
    match n {
        2 => Some((1, 2)),
        3 => Some((1, 3)),
        4 => Some((2, 2)),
        6 => Some((2, 3)),
        9 => Some((3, 3)),
        _ => None,
    }
}

/// Canvas `(width, height)` of a `rows` × `cols` collage: cells and the gaps between them across, and
/// per row a label band plus a cell down (no gap under the last row, no band below it).
pub fn grid_canvas_size(rows: u32, cols: u32) -> (u32, u32) {
    let width = CELL * cols + GAP * cols.saturating_sub(1);
    let height = CELL * rows + LABEL_BAND * rows;
    (width, height)
}

/// Size of a `w` × `h` image scaled to fit inside `side` × `side` with its aspect ratio kept: the
/// long side becomes `side` and the short side is rounded to nearest (half up), at least 1.
///
/// Images smaller than the box are *enlarged* as well, like the original MIA-DPO collage code
/// (which resizes every image to fit its cell), so that every cell is filled to its long side and
/// small images are not lost in a large white cell. A zero dimension is treated as 1.
pub fn fit_in(w: u32, h: u32, side: u32) -> (u32, u32) {
    let (w, h) = (u64::from(w.max(1)), u64::from(h.max(1)));
    let side64 = u64::from(side);
    // Integer rounding of short·side/long, so that no float step can make it differ across platforms.
    let scaled = |short: u64, long: u64| ((2 * short * side64 + long) / (2 * long)).max(1) as u32;
    if w >= h {
        (side, scaled(h, w))
    } else {
        (scaled(w, h), side)
    }
}

/// Top-left corner of cell `k` (0-based, row-major) of a `rows` × `cols` collage: cells step by
/// `CELL + GAP` across and down, and each row sits below its own label band.
pub fn cell_origin(k: usize, rows: u32, cols: u32) -> (u32, u32) {
    debug_assert!(rows > 0 && cols > 0 && (k as u64) < u64::from(rows) * u64::from(cols));
    let cols = cols.max(1) as usize;
    let (row, col) = ((k / cols) as u32, (k % cols) as u32);
    (col * (CELL + GAP), row * (CELL + LABEL_BAND) + LABEL_BAND)
}

/// Copies `src` into `canvas` with its top-left at `(x, y)`, clipping at the canvas border.
fn paste(canvas: &mut RgbImage, src: &RgbImage, x: u32, y: u32) {
    let (cw, ch) = canvas.dimensions();
    if x >= cw || y >= ch {
        return;
    }
    let w = src.width().min(cw - x) as usize;
    let h = src.height().min(ch - y) as usize;
    let (cw, sw) = (cw as usize * 3, src.width() as usize * 3);
    let dst = &mut **canvas;
    for (r, src_row) in src.as_raw().chunks_exact(sw).take(h).enumerate() {
        let start = (y as usize + r) * cw + x as usize * 3;
        dst[start..start + w * 3].copy_from_slice(&src_row[..w * 3]);
    }
}

/// Composes the MIA-DPO grid collage of `images` (2, 3, 4, 6 or 9 of them, in cell order).
///
/// The canvas is white and [`grid_canvas_size`] large; image `k` is resized with Pillow's Lanczos to
/// [`fit_in`]`(.., CELL)` and pasted at [`cell_origin`]`(k, ..)`, and the label `Image{k+1}` is drawn
/// in black (DejaVu Sans Bold, 36 px per em) 20 px right of the cell's left edge, vertically centred
/// in the band above the cell. The resizes run in parallel over the cells (rayon), which is where
/// nearly all the time goes; the result does not depend on the thread count.
///
/// Errors for an unsupported count or an empty (zero-sized) image.
pub fn compose_grid(images: &[&RgbImage]) -> Result<RgbImage> {
    let n = images.len();
    let (rows, cols) = grid_shape(n)
        .ok_or_else(|| Error::Invalid(format!("a grid collage takes 2, 3, 4, 6 or 9 images, got {n}")))?;
    if let Some(k) = images
        .iter()
        .position(|img| img.width() == 0 || img.height() == 0)
    {
        return Err(Error::Invalid(format!("grid collage: image {} is empty", k + 1)));
    }
    let style = label_style()?;

    let cells: Vec<RgbImage> = images
        .par_iter()
        .map(|img| {
            let (w, h) = fit_in(img.width(), img.height(), CELL);
            resize_rgb(img, w, h, Filter::Lanczos)
        })
        .collect();

    let (width, height) = grid_canvas_size(rows, cols);
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (k, cell) in cells.iter().enumerate() {
        let (x, y) = cell_origin(k, rows, cols);
        paste(&mut canvas, cell, x, y);
        let band_top = (y - LABEL_BAND) as i32;
        imageproc::drawing::draw_text_mut(
            &mut canvas,
            Rgb([0, 0, 0]),
            (x + LABEL_INDENT) as i32,
            band_top + style.dy,
            style.scale,
            &style.font,
            &format!("Image{}", k + 1),
        );
    }
    Ok(canvas)
}

/// Placement `(x, y, w, h)` of the pic-in-pic foreground on a `bg_w` × `bg_h` background: the
/// foreground is scaled by `0.7 · min(bg_w / fg_w, bg_h / fg_h)` (so it spans 70 % of the background
/// along its tighter axis and stays inside along the other), each side rounded to nearest and at least
/// 1, and centred with integer division. Zero foreground dimensions are treated as 1.
pub fn pip_box(bg_w: u32, bg_h: u32, fg_w: u32, fg_h: u32) -> (u32, u32, u32, u32) {
    let (fw, fh) = (f64::from(fg_w.max(1)), f64::from(fg_h.max(1)));
    let scale = 0.7 * (f64::from(bg_w) / fw).min(f64::from(bg_h) / fh);
    // floor(v + 0.5), written out so that `scripts/compare_pil.py` can do the same in Python.
    let round = |v: f64| (v + 0.5).floor() as u32;
    let w = round(fw * scale).max(1).min(bg_w);
    let h = round(fh * scale).max(1).min(bg_h);
    ((bg_w - w) / 2, (bg_h - h) / 2, w, h)
}

/// Composes a pic-in-pic image: a copy of `background` with `foreground` resized (Pillow Lanczos) to
/// [`pip_box`] and pasted at its centre. The output has the background's size. An empty background or
/// foreground leaves the background unchanged, as there is nothing to paste or nowhere to paste it.
pub fn compose_pip(background: &RgbImage, foreground: &RgbImage) -> RgbImage {
    let mut out = background.clone();
    if background.width() == 0
        || background.height() == 0
        || foreground.width() == 0
        || foreground.height() == 0
    {
        return out;
    }
    let (x, y, w, h) = pip_box(
        background.width(),
        background.height(),
        foreground.width(),
        foreground.height(),
    );
    let fg = resize_rgb(foreground, w, h, Filter::Lanczos);
    paste(&mut out, &fg, x, y);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise, so that resampling errors show up in every pixel.
    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        RgbImage::from_fn(w, h, |_, _| {
            let mut px = [0u8; 3];
            for c in &mut px {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *c = (s >> 24) as u8;
            }
            Rgb(px)
        })
    }

    const WHITE: [u8; 3] = [255, 255, 255];

    #[test]
    fn shapes_and_canvas_sizes() {
        let expected = [
            (2, (1, 2), (936, 488)),
            (3, (1, 3), (1424, 488)),
            (4, (2, 2), (936, 976)),
            (6, (2, 3), (1424, 976)),
            (9, (3, 3), (1424, 1464)),
        ];
        for (n, shape, size) in expected {
            assert_eq!(grid_shape(n), Some(shape), "n={n}");
            assert_eq!(grid_canvas_size(shape.0, shape.1), size, "n={n}");
        }
        for n in [0, 1, 5, 7, 8, 10, 16] {
            assert_eq!(grid_shape(n), None, "n={n}");
        }
    }

    #[test]
    fn cell_origins() {
        assert_eq!(cell_origin(0, 1, 2), (0, 40));
        assert_eq!(cell_origin(1, 1, 2), (488, 40));
        assert_eq!(cell_origin(2, 1, 3), (976, 40));
        assert_eq!(cell_origin(2, 2, 2), (0, 528));
        assert_eq!(cell_origin(3, 2, 2), (488, 528));
        assert_eq!(cell_origin(5, 2, 3), (976, 528));
        assert_eq!(cell_origin(4, 3, 3), (488, 528));
        assert_eq!(cell_origin(8, 3, 3), (976, 1016));
        // Every cell lies inside its canvas, the last one touching the right and bottom edges.
        for n in [2, 3, 4, 6, 9] {
            let (rows, cols) = grid_shape(n).unwrap();
            let (w, h) = grid_canvas_size(rows, cols);
            let (x, y) = cell_origin(n - 1, rows, cols);
            assert_eq!((x + CELL, y + CELL), (w, h), "n={n}");
        }
    }

    #[test]
    fn fit_in_sizes() {
        assert_eq!(fit_in(640, 480, 448), (448, 336)); // wide, down
        assert_eq!(fit_in(427, 640, 448), (299, 448)); // tall: 427·0.7 = 298.9
        assert_eq!(fit_in(500, 375, 448), (448, 336));
        assert_eq!(fit_in(500, 500, 448), (448, 448)); // square
        assert_eq!(fit_in(56, 56, 448), (448, 448)); // small square, enlarged
        assert_eq!(fit_in(119, 59, 448), (448, 222)); // small wide: 222.1
        assert_eq!(fit_in(51, 84, 448), (272, 448)); // small tall: 272.0
        assert_eq!(fit_in(448, 448, 448), (448, 448));
        assert_eq!(fit_in(10_000, 1, 448), (448, 1)); // never below 1
        assert_eq!(fit_in(1, 10_000, 448), (1, 448));
        assert_eq!(fit_in(3, 2, 5), (5, 3)); // 3.33 -> 3
        assert_eq!(fit_in(4, 2, 5), (5, 3)); // 2.5 -> 3 (half up)
    }

    #[test]
    fn pip_boxes() {
        let cases = [
            // (bg, fg, expected box)
            ((640, 480), (500, 375), (96, 72, 448, 336)),
            ((640, 480), (427, 640), (208, 72, 224, 336)), // tall fg on wide bg: height-bound
            ((427, 640), (640, 480), (64, 208, 299, 224)), // wide fg on tall bg: width-bound
            ((1000, 200), (100, 100), (430, 30, 140, 140)),
            ((200, 1000), (100, 100), (30, 430, 140, 140)),
            ((64, 64), (1, 1), (9, 9, 45, 45)),
        ];
        for ((bw, bh), (fw, fh), expected) in cases {
            let (x, y, w, h) = pip_box(bw, bh, fw, fh);
            assert_eq!((x, y, w, h), expected, "bg {bw}x{bh} fg {fw}x{fh}");
            assert!(x + w <= bw && y + h <= bh);
            // One axis spans 0.7 of the background (up to rounding), the other at most that.
            let (rw, rh) = (f64::from(w) / f64::from(bw), f64::from(h) / f64::from(bh));
            let tol = 1.0 / f64::from(bw.min(bh));
            assert!((rw.max(rh) - 0.7).abs() <= tol, "{rw} {rh}");
            assert!(rw.min(rh) <= 0.7 + tol);
            // Centred.
            assert!((bw - w - 2 * x) <= 1 && (bh - h - 2 * y) <= 1);
        }
    }

    #[test]
    fn grid_rejects_bad_input() {
        let img = noise(8, 8, 0);
        for n in [0, 1, 5, 7, 10] {
            let imgs = vec![&img; n];
            assert!(compose_grid(&imgs).is_err(), "n={n}");
        }
        let empty = RgbImage::new(0, 5);
        assert!(compose_grid(&[&img, &empty]).is_err());
    }

    /// The reserved label area of cell `(x, y)`: the band above it, from the indent to a generous
    /// width for `ImageK`.
    fn in_label_area(px: u32, py: u32, x: u32, y: u32) -> bool {
        (y - LABEL_BAND..y).contains(&py) && (x + LABEL_INDENT..x + LABEL_INDENT + 200).contains(&px)
    }

    #[test]
    fn grid_layout_pixels() {
        // Wide, tall, square and small images, so that cells are filled differently.
        let sizes = [
            (640, 480),
            (427, 640),
            (500, 375),
            (56, 56),
            (119, 59),
            (51, 84),
            (640, 480),
            (300, 300),
            (20, 90),
        ];
        let srcs: Vec<RgbImage> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(w, h))| noise(w, h, i as u32))
            .collect();
        for n in [2, 3, 4, 6, 9] {
            let imgs: Vec<&RgbImage> = srcs.iter().take(n).collect();
            let out = compose_grid(&imgs).unwrap();
            let (rows, cols) = grid_shape(n).unwrap();
            assert_eq!(out.dimensions(), grid_canvas_size(rows, cols), "n={n}");

            let mut rects = Vec::new(); // pasted image rectangles
            for (k, src) in imgs.iter().enumerate() {
                let (x, y) = cell_origin(k, rows, cols);
                let (w, h) = fit_in(src.width(), src.height(), CELL);
                let expected = resize_rgb(src, w, h, Filter::Lanczos);
                for (cx, cy, p) in expected.enumerate_pixels() {
                    assert_eq!(out.get_pixel(x + cx, y + cy), p, "n={n} cell {k} at ({cx},{cy})");
                }
                rects.push((x, y, w, h));

                // The label has dark ink near the indent, inside the band.
                let dark = (y - LABEL_BAND..y)
                    .flat_map(|py| (x + LABEL_INDENT..x + LABEL_INDENT + 150).map(move |px| (px, py)))
                    .filter(|&(px, py)| out.get_pixel(px, py).0.iter().all(|&c| c < 64))
                    .count();
                assert!(dark > 100, "n={n} cell {k}: label has only {dark} dark pixels");
                // The cell right of (or below) a non-square image stays white.
                if w < CELL {
                    assert_eq!(out.get_pixel(x + w, y + h / 2).0, WHITE);
                    assert_eq!(out.get_pixel(x + CELL - 1, y + CELL - 1).0, WHITE);
                }
                if h < CELL {
                    assert_eq!(out.get_pixel(x + w / 2, y + h).0, WHITE);
                }
            }
            // Everything outside the pasted images and the label areas is white (gaps included).
            for (px, py, p) in out.enumerate_pixels() {
                let in_cell = rects
                    .iter()
                    .any(|&(x, y, w, h)| (x..x + w).contains(&px) && (y..y + h).contains(&py));
                let in_label = rects.iter().any(|&(x, y, _, _)| in_label_area(px, py, x, y));
                if !in_cell && !in_label {
                    assert_eq!(p.0, WHITE, "n={n}: stray ink at ({px},{py})");
                }
            }
            // The gaps between columns are white all the way down.
            for c in 1..cols {
                let gx = c * (CELL + GAP) - GAP;
                for py in (0..out.height()).step_by(7) {
                    assert_eq!(out.get_pixel(gx, py).0, WHITE);
                    assert_eq!(out.get_pixel(gx + GAP - 1, py).0, WHITE);
                }
            }
        }
    }

    #[test]
    fn label_ink_fits_its_band() {
        let style = label_style().unwrap();
        let (top, bottom) = ink_rows(&style.font, style.scale, "Image0123456789");
        let (top, bottom) = (top + style.dy, bottom + style.dy);
        assert!(
            top >= 0 && bottom <= LABEL_BAND as i32,
            "ink rows {top}..{bottom}"
        );
        // Centred: the margins above and below differ by at most one pixel.
        assert!(
            (top - (LABEL_BAND as i32 - bottom)).abs() <= 1,
            "ink rows {top}..{bottom}"
        );
        // About 36 px per em: DejaVu's cap height plus the descender of `g` is ~34 px, as in Pillow.
        assert!((30..=38).contains(&(bottom - top)), "ink rows {top}..{bottom}");
    }

    #[test]
    fn grid_is_deterministic_across_thread_counts() {
        let srcs: Vec<RgbImage> = (0..4).map(|i| noise(200 + 30 * i, 150 + 10 * i, i)).collect();
        let imgs: Vec<&RgbImage> = srcs.iter().collect();
        let a = compose_grid(&imgs).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let b = pool.install(|| compose_grid(&imgs)).unwrap();
        assert!(a == b);
    }

    #[test]
    fn pip_pixels() {
        for ((bw, bh), (fw, fh)) in [
            ((640, 480), (500, 375)),
            ((427, 640), (640, 480)),
            ((119, 59), (51, 84)),
        ] {
            let bg = noise(bw, bh, 7);
            let fg = noise(fw, fh, 8);
            let out = compose_pip(&bg, &fg);
            assert_eq!(out.dimensions(), (bw, bh));
            let (x, y, w, h) = pip_box(bw, bh, fw, fh);
            let small = resize_rgb(&fg, w, h, Filter::Lanczos);
            for (px, py, p) in out.enumerate_pixels() {
                let inside = (x..x + w).contains(&px) && (y..y + h).contains(&py);
                let expected = if inside {
                    small.get_pixel(px - x, py - y)
                } else {
                    bg.get_pixel(px, py)
                };
                assert_eq!(p, expected, "bg {bw}x{bh} at ({px},{py})");
            }
        }
        // Nothing to paste: the background comes back as it is.
        let bg = noise(30, 20, 1);
        assert!(compose_pip(&bg, &RgbImage::new(0, 4)) == bg);
    }
}
