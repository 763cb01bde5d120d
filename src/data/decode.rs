//! Decoding an image file to 8-bit RGB exactly as PIL's
//! `Image.open(path).convert("RGB")` does (Pillow 13; docs/data.md#decoding).
//!
//! The format is chosen from the file's first bytes, never from its name.
//! - JPEG: libjpeg-turbo (the library inside PIL) through the TurboJPEG API:
//!   the same IDCT and upsampling, so the same pixels. Grayscale is replicated;
//!   CMYK and YCCK are read as Adobe writes them (inverted), as PIL always
//!   assumes, then converted with PIL's formula. libjpeg warnings are ignored as
//!   PIL ignores them, except the end of the data ("Premature end of JPEG file"),
//!   which PIL reports as "image file is truncated": so do we.
//! - PNG: alpha and transparency are dropped, not composited; palettes are looked
//!   up; 16-bit samples keep their high byte, except 16-bit grayscale, which PIL
//!   reads as `I;16` and clips to 255 when converting to RGB.
//! - PPM/PGM/PBM: PIL's rules for every `maxval` (see `decode_pnm`).
//! - BMP, TIFF, WebP: the `image` crate (lossless formats give the same pixels).
//!
//! EXIF orientation is not applied (PIL does not apply it either).
use std::io::Cursor;
use std::path::Path;

use image::DynamicImage;

use super::DataError;

/// An 8-bit RGB image: `data` holds `height` rows of `width` pixels, each three
/// bytes R, G, B (HWC order), values 0..=255.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `data` (length `3 * width * height`, HWC); errors on a length mismatch.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self, DataError> {
        if data.len() != 3 * width * height {
            return Err(DataError::InvalidArgument(format!(
                "RGB buffer of {} bytes for a {width}x{height} image",
                data.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }
}

/// Reads and decodes the image file at `path` (see the module docs).
/// Errors name the path and the reason (unreadable, empty, truncated, corrupt,
/// unrecognised format).
pub fn decode_file(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_bytes(&bytes).map_err(|reason| DataError::Decode {
        path: path.to_path_buf(),
        reason,
    })
}

/// Decodes an in-memory image file; the error is the decoder's reason.
pub fn decode_bytes(bytes: &[u8]) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        decode_jpeg(bytes)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes)
    } else if bytes.len() >= 2 && bytes[0] == b'P' && (b'1'..=b'6').contains(&bytes[1]) {
        decode_pnm(bytes)
    } else if bytes.starts_with(b"BM") {
        match decode_bmp16(bytes) {
            Some(result) => result,
            None => decode_other(bytes, image::ImageFormat::Bmp),
        }
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        decode_other(bytes, image::ImageFormat::Tiff)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        decode_other(bytes, image::ImageFormat::WebP)
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(format!(
            "unrecognised image format (first bytes: {}); supported: JPEG, PNG, BMP, PPM/PGM/PBM, TIFF, WebP",
            head.join(" ")
        ))
    }
}

/// PIL refuses images of more than twice `Image.MAX_IMAGE_PIXELS` pixels
/// (`DecompressionBombError`); so do we, before allocating anything.
const MAX_PIXELS: usize = 2 * 89_478_485;

fn check_size(width: usize, height: usize) -> Result<(), String> {
    match width.checked_mul(height) {
        Some(n) if n > 0 && n <= MAX_PIXELS => Ok(()),
        _ => Err(format!(
            "image size {width}x{height} is empty or exceeds PIL's limit of {MAX_PIXELS} pixels"
        )),
    }
}

/// Owns a TurboJPEG decompressor handle.
struct TjHandle(turbojpeg::raw::tjhandle);

impl Drop for TjHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { turbojpeg::raw::tj3Destroy(self.0) }
    }
}

impl TjHandle {
    fn error(&self) -> (bool, String) {
        // SAFETY: valid handle; tj3GetErrorStr returns a NUL-terminated string
        // owned by the handle, copied before the handle can change.
        unsafe {
            let fatal = turbojpeg::raw::tj3GetErrorCode(self.0)
                != turbojpeg::raw::TJERR_TJERR_WARNING as std::ffi::c_int;
            let msg = std::ffi::CStr::from_ptr(turbojpeg::raw::tj3GetErrorStr(self.0));
            (fatal, msg.to_string_lossy().into_owned())
        }
    }
}

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, String> {
    use turbojpeg::raw;
    // SAFETY: plain FFI calls on a handle we own; the output buffer is sized
    // from the header (pitch * height bytes) before tj3Decompress8 writes to it.
    unsafe {
        let ptr = raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as std::ffi::c_int);
        if ptr.is_null() {
            return Err("cannot initialise libjpeg-turbo".into());
        }
        let tj = TjHandle(ptr);
        let len = bytes.len() as raw::size_t;
        if raw::tj3DecompressHeader(tj.0, bytes.as_ptr(), len) != 0 {
            let (fatal, msg) = tj.error();
            if fatal {
                return Err(format!("JPEG header: {msg}"));
            } // a warning (e.g. junk between markers): PIL reads on
        }
        let get = |p: raw::TJPARAM| raw::tj3Get(tj.0, p as std::ffi::c_int);
        let (w, h) = (
            get(raw::TJPARAM_TJPARAM_JPEGWIDTH),
            get(raw::TJPARAM_TJPARAM_JPEGHEIGHT),
        );
        if w <= 0 || h <= 0 {
            return Err(format!("JPEG header: invalid size {w}x{h}"));
        }
        let (w, h) = (w as usize, h as usize);
        check_size(w, h)?;
        let cs = get(raw::TJPARAM_TJPARAM_COLORSPACE);
        let cmyk = cs == raw::TJCS_TJCS_CMYK as i32 || cs == raw::TJCS_TJCS_YCCK as i32;
        let (fmt, channels) = if cmyk {
            (raw::TJPF_TJPF_CMYK, 4)
        } else {
            (raw::TJPF_TJPF_RGB, 3)
        };
        let mut out = vec![0u8; w * h * channels];
        let pitch = (w * channels) as std::ffi::c_int;
        let ret = raw::tj3Decompress8(
            tj.0,
            bytes.as_ptr(),
            len,
            out.as_mut_ptr(),
            pitch,
            fmt as std::ffi::c_int,
        );
        if ret != 0 {
            let (fatal, msg) = tj.error();
            if fatal {
                return Err(format!("corrupt JPEG data: {msg}"));
            }
            // TurboJPEG keeps only the first warning's text: a file that warns
            // earlier and is also cut short is caught by the marker walk.
            if msg.contains("Premature end of JPEG file") || !reaches_eoi(bytes) {
                return Err(format!("image file is truncated ({msg})"));
            }
            // Any other libjpeg warning: PIL ignores it and keeps the pixels.
        }
        let data = if cmyk { cmyk_to_rgb(&out) } else { out };
        Ok(RgbImage {
            width: w,
            height: h,
            data,
        })
    }
}

/// Whether walking the JPEG's marker segments (skipping each by its length,
/// and entropy-coded data byte by byte) reaches the end-of-image marker.
fn reaches_eoi(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 1 < bytes.len() {
        if bytes[i] != 0xFF {
            i += 1; // entropy-coded data (or junk)
            continue;
        }
        match bytes[i + 1] {
            0xD9 => return true,
            // fill byte, stuffed zero, restart markers, TEM, SOI: no length
            0xFF => i += 1,
            0x00 | 0x01 | 0xD0..=0xD8 => i += 2,
            _ => match bytes.get(i + 2..i + 4) {
                Some(len) => i += 2 + u16::from_be_bytes([len[0], len[1]]) as usize,
                None => return false,
            },
        }
    }
    false
}

/// Adobe-inverted CMYK (as libjpeg returns it) to RGB, as PIL does: it first
/// inverts the samples (raw mode `CMYK;I`), then computes
/// `R = 255 - K' - C'(255 - K')/255` with its integer `MULDIV255`.
fn cmyk_to_rgb(inverted: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(inverted.len() / 4 * 3);
    for px in inverted.chunks_exact(4) {
        // nk = 255 - K with K = 255 - px[3]
        let nk = px[3] as i32;
        for &v in &px[..3] {
            let t = (255 - v as i32) * nk + 128;
            let muldiv = ((t >> 8) + t) >> 8;
            rgb.push((nk - muldiv).clamp(0, 255) as u8);
        }
    }
    rgb
}

fn decode_png(bytes: &[u8]) -> Result<RgbImage, String> {
    let dec = image::codecs::png::PngDecoder::new(Cursor::new(bytes)).map_err(png_error)?;
    let img = DynamicImage::from_decoder(dec).map_err(png_error)?;
    from_dynamic(img)
}

fn png_error(e: image::ImageError) -> String {
    match e {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "image file is truncated".into()
        }
        e => format!("corrupt PNG: {e}"),
    }
}

fn decode_other(bytes: &[u8], format: image::ImageFormat) -> Result<RgbImage, String> {
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| format!("{format:?}: {e}"))?;
    from_dynamic(img)
}

/// 16-bit BMPs, which the `image` crate expands with rounding where PIL
/// truncates (`v * 255 / 31`); `None` for any other BMP. PIL reads 5-5-5 (plain
/// or as bit fields) and 5-6-5 bit fields, and rejects other layouts.
fn decode_bmp16(bytes: &[u8]) -> Option<Result<RgbImage, String>> {
    let u16_at = |i: usize| {
        bytes
            .get(i..i + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |i: usize| {
        bytes
            .get(i..i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if u32_at(14)? < 40 || u16_at(28)? != 16 {
        return None;
    }
    let (offset, width, height) = (u32_at(10)? as usize, u32_at(18)? as i32, u32_at(22)? as i32);
    let green_bits = match (u32_at(30)?, u32_at(54), u32_at(58), u32_at(62)) {
        (0, ..) => 5,
        (3, Some(0x7c00), Some(0x3e0), Some(0x1f)) => 5,
        (3, Some(0xf800), Some(0x7e0), Some(0x1f)) => 6,
        (c, r, g, b) => {
            return Some(Err(format!(
                "unsupported 16-bit BMP layout (compression {c}, masks {r:x?} {g:x?} {b:x?})"
            )))
        }
    };
    if width <= 0 || height == 0 {
        return Some(Err(format!("BMP: invalid size {width}x{height}")));
    }
    let (w, h) = (width as usize, height.unsigned_abs() as usize);
    if let Err(e) = check_size(w, h) {
        return Some(Err(e));
    }
    let stride = (2 * w).div_ceil(4) * 4;
    let Some(pixels) = bytes.get(offset..).filter(|p| p.len() >= stride * h) else {
        return Some(Err("image file is truncated".into()));
    };
    let mut data = vec![0u8; 3 * w * h];
    for (y, row) in pixels.chunks_exact(stride).take(h).enumerate() {
        let y = if height > 0 { h - 1 - y } else { y }; // positive height: bottom-up
        let out = &mut data[3 * w * y..3 * w * (y + 1)];
        for (px, v) in out.chunks_exact_mut(3).zip(row.chunks_exact(2)) {
            let v = u16::from_le_bytes([v[0], v[1]]) as u32;
            let (r, g) = if green_bits == 5 {
                ((v >> 10) & 31, (v >> 5) & 31)
            } else {
                ((v >> 11) & 31, (v >> 5) & 63)
            };
            let gmax = (1 << green_bits) - 1;
            px.copy_from_slice(&[
                (r * 255 / 31) as u8,
                (g * 255 / gmax) as u8,
                ((v & 31) * 255 / 31) as u8,
            ]);
        }
    }
    Some(Ok(RgbImage {
        width: w,
        height: h,
        data,
    }))
}

/// Applies PIL's `convert("RGB")` to what the `image` crate decoded.
fn from_dynamic(img: DynamicImage) -> Result<RgbImage, String> {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let n = width * height;
    let mut data = Vec::with_capacity(3 * n);
    match img {
        DynamicImage::ImageLuma8(b) => b.iter().for_each(|&v| data.extend([v, v, v])),
        DynamicImage::ImageLumaA8(b) => b.chunks_exact(2).for_each(|p| data.extend([p[0]; 3])),
        DynamicImage::ImageRgb8(b) => data = b.into_raw(),
        DynamicImage::ImageRgba8(b) => b.chunks_exact(4).for_each(|p| data.extend(&p[..3])),
        // PIL's mode I;16: convert("RGB") clips each value to 0..=255.
        DynamicImage::ImageLuma16(b) => b.iter().for_each(|&v| data.extend([v.min(255) as u8; 3])),
        // PIL reads these with raw modes LA;16B, RGB;16B, RGBA;16B: the high byte.
        DynamicImage::ImageLumaA16(b) => b
            .chunks_exact(2)
            .for_each(|p| data.extend([(p[0] >> 8) as u8; 3])),
        DynamicImage::ImageRgb16(b) => b.iter().for_each(|&v| data.push((v >> 8) as u8)),
        DynamicImage::ImageRgba16(b) => b
            .chunks_exact(4)
            .for_each(|p| data.extend(p[..3].iter().map(|&v| (v >> 8) as u8))),
        other => return Err(format!("unsupported pixel type {:?}", other.color())),
    }
    if data.len() != 3 * n {
        return Err("decoder returned a short pixel buffer".into());
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// PBM/PGM/PPM (`P1`..`P6`) with PIL's rules: `maxval` 255 is taken as is; any
/// other `maxval` scales each sample to `round(v / maxval * 255)` (Python's
/// round-half-even, clipped to 255), except grayscale with `maxval` > 255, which
/// PIL reads as 32-bit `I` (`round(v / maxval * 65535)`) and clips to 255 when
/// converting to RGB. Bitmaps: 1 is black. Short data is an error.
fn decode_pnm(bytes: &[u8]) -> Result<RgbImage, String> {
    let kind = bytes[1] - b'0';
    let mut pos = 2;
    let mut token = || -> Result<usize, String> {
        let mut tok = Vec::new();
        while let Some(&c) = bytes.get(pos) {
            pos += 1;
            if c == b'#' {
                while pos < bytes.len() && !matches!(bytes[pos], b'\r' | b'\n') {
                    pos += 1;
                }
                pos += 1;
            } else if is_pnm_space(c) {
                if !tok.is_empty() {
                    break;
                }
            } else {
                tok.push(c);
            }
        }
        std::str::from_utf8(&tok)
            .ok()
            .and_then(|t| t.parse::<usize>().ok())
            .ok_or_else(|| format!("PNM header: bad number {:?}", String::from_utf8_lossy(&tok)))
    };
    if !bytes.get(2).is_some_and(|&c| is_pnm_space(c)) {
        return Err("unrecognised PNM magic number".into());
    }
    let (w, h) = (token()?, token()?);
    let maxval = if kind == 1 || kind == 4 { 1 } else { token()? };
    check_size(w, h)?;
    if !(1..65536).contains(&maxval) {
        return Err(format!("PNM header: maxval {maxval} is not in 1..=65535"));
    }
    let data = &bytes[pos.min(bytes.len())..];
    let (n, bands) = (w * h, if kind == 3 || kind == 6 { 3 } else { 1 });
    let wide_gray = bands == 1 && maxval > 255; // PIL mode I
    let out_max = if wide_gray { 65535.0 } else { 255.0 };
    let scale = |v: usize| -> u8 {
        if maxval == 255 {
            return v.min(255) as u8;
        }
        let s = (v as f64 / maxval as f64 * out_max).round_ties_even();
        s.min(255.0) as u8
    };
    let mut samples = Vec::with_capacity(n * bands);
    match kind {
        4 => {
            let stride = w.div_ceil(8);
            if data.len() < stride * h {
                return Err("image file is truncated".into());
            }
            for row in data.chunks_exact(stride).take(h) {
                samples.extend((0..w).map(|x| ((row[x / 8] >> (7 - x % 8)) & 1 == 0) as u8 * 255));
            }
        }
        5 | 6 => {
            let width = if maxval < 256 { 1 } else { 2 };
            if data.len() < n * bands * width {
                return Err("image file is truncated".into());
            }
            if width == 1 {
                samples.extend(data[..n * bands].iter().map(|&v| scale(v as usize)));
            } else {
                let words = data[..2 * n * bands].chunks_exact(2);
                samples.extend(words.map(|b| scale(u16::from_be_bytes([b[0], b[1]]) as usize)));
            }
        }
        _ => {
            let text = strip_pnm_comments(data);
            if kind == 1 {
                let bits = text.iter().filter(|c| !is_pnm_space(**c));
                for &c in bits.take(n) {
                    if c != b'0' && c != b'1' {
                        return Err(format!("invalid PBM token {:?}", c as char));
                    }
                    samples.push(if c == b'0' { 255 } else { 0 });
                }
            } else {
                for tok in text.split(|c| is_pnm_space(*c)).filter(|t| !t.is_empty()) {
                    let v = std::str::from_utf8(tok)
                        .ok()
                        .and_then(|t| t.parse::<usize>().ok());
                    match v {
                        Some(v) if v <= maxval => samples.push(scale(v)),
                        _ => {
                            return Err(format!(
                                "bad PNM sample {:?}",
                                String::from_utf8_lossy(tok)
                            ))
                        }
                    }
                    if samples.len() == n * bands {
                        break;
                    }
                }
            }
            if samples.len() < n * bands {
                return Err("not enough image data".into());
            }
        }
    }
    let data = if bands == 3 {
        samples
    } else {
        samples.iter().flat_map(|&v| [v, v, v]).collect()
    };
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

fn is_pnm_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The plain-format pixel data with `#` comments (to the end of the line) removed.
fn strip_pnm_comments(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut in_comment = false;
    for &c in data {
        if in_comment {
            in_comment = !matches!(c, b'\r' | b'\n');
            if !in_comment {
                out.push(b' ');
            }
        } else if c == b'#' {
            in_comment = true;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fixtures;

    #[test]
    fn every_fixture_decodes_like_pil_convert_rgb() {
        let (good, _) = fixtures::manifest();
        let mut report = Vec::new();
        for g in &good {
            let img = decode_file(&fixtures::dir().join(&g.file))
                .unwrap_or_else(|e| panic!("{}: {e}", g.file));
            assert_eq!((img.width, img.height), (g.width, g.height), "{}", g.file);
            let want = fixtures::reference(&format!("{}.rgb", g.file));
            let diff = fixtures::max_diff(&img.data, &want);
            if diff != 0 {
                let n = img.data.iter().zip(&want).filter(|(a, b)| a != b).count();
                report.push(format!("{}: max diff {diff}, {n} samples differ", g.file));
            }
        }
        assert!(
            report.is_empty(),
            "decoded pixels differ from PIL:\n{}",
            report.join("\n")
        );
    }

    #[test]
    fn broken_files_give_errors_naming_the_path() {
        let (_, bad) = fixtures::manifest();
        assert!(bad.len() >= 4);
        for (file, word) in &bad {
            let path = fixtures::dir().join(file);
            let msg = decode_file(&path).expect_err(file).to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(
                msg.contains(word.as_str()),
                "{file}: {msg:?} lacks {word:?}"
            );
        }
    }

    #[test]
    fn truncated_jpeg_is_an_error_at_any_cut() {
        let jpg = std::fs::read(fixtures::dir().join("rgb420.jpg")).expect("fixture");
        for cut in [1, 2, 3, 100, jpg.len() / 2] {
            let err = decode_bytes(&jpg[..jpg.len() - cut]).expect_err("truncated");
            assert!(err.contains("image file is truncated"), "{cut}: {err}");
        }
        let err = decode_bytes(&jpg[..300]).expect_err("header only");
        assert!(err.contains("JPEG header"), "{err}");
        // A file with an earlier warning (junk before EOI) and then cut short.
        let mut junk = jpg[..jpg.len() - 2].to_vec();
        junk.extend_from_slice(&[0, 1, 2, 0xFF, 0xD9]);
        assert!(reaches_eoi(&junk) && !reaches_eoi(&junk[..junk.len() - 1]));
        assert!(decode_bytes(&junk).is_ok());
        // Junk before the start-of-scan marker: libjpeg's first (kept) warning
        // is "extraneous bytes", so only the marker walk sees the cut.
        let sos = jpg.windows(2).position(|w| w == [0xFF, 0xDA]).expect("SOS");
        let mut early = jpg[..sos].to_vec();
        early.extend_from_slice(&[1, 2, 3]);
        early.extend_from_slice(&jpg[sos..]);
        assert!(decode_bytes(&early).is_ok());
        let err = decode_bytes(&early[..early.len() - 100]).expect_err("cut");
        assert!(
            err.contains("truncated") && err.contains("extraneous"),
            "{err}"
        );
        // Bytes after the end-of-image marker are ignored, as PIL ignores them.
        let mut longer = jpg.clone();
        longer.extend_from_slice(b"trailing garbage");
        assert_eq!(decode_bytes(&longer), decode_bytes(&jpg));
    }

    #[test]
    fn missing_file_and_unknown_formats() {
        let path = fixtures::dir().join("no_such_file.jpg");
        let msg = decode_file(&path).expect_err("missing").to_string();
        assert!(msg.contains("no_such_file.jpg"), "{msg}");
        for bytes in [
            &b"GIF89a\x01\x00\x01\x00"[..],
            b"P7 332\n",
            b"\xff\xd8",
            b"RIFF\0\0\0\0WAVE",
        ] {
            assert!(decode_bytes(bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn oversized_headers_are_errors_not_allocations() {
        let err = decode_bytes(b"P6 100000 100000 255\n").expect_err("bomb");
        assert!(err.contains("exceeds PIL's limit"), "{err}");
        let err = decode_bytes(b"P5 18446744073709551615 2 255\n").expect_err("overflow");
        assert!(err.contains("exceeds"), "{err}");
        assert!(decode_bytes(b"P5 0 3 255\n").is_err());
        assert!(decode_bytes(b"P5 2 2 255\n\x01\x02\x03")
            .expect_err("short")
            .contains("truncated"));
    }

    #[test]
    fn cmyk_conversion_matches_pil_formula() {
        // PIL: C' = 255 - sample, nk = 255 - K', R = clip(nk - MULDIV255(C', nk)).
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]); // C=M=Y=K=0
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 255]), [0, 0, 0]); // C=M=Y=255
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]); // K=255
        assert_eq!(cmyk_to_rgb(&[127, 200, 255, 128]), [64, 100, 128]);
    }
}
