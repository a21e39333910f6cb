//! Video frames through the ffmpeg CLI (`ffprobe` for the frame count, `ffmpeg` with a
//! `select` filter for the chosen frames as raw RGB), sampled as InternVL's
//! `read_frames_decord` + `get_frame_indices(sample='rand')` do:
//! a frame count uniform in [min_num_frame, max_num_frame], the video split into that many
//! equal intervals (`linspace(0, vlen, n+1).astype(int)`), one random frame from each
//! `range(start, next - 1)`; when a range is empty, a sorted random subset instead.

use std::path::Path;
use std::process::{Command, Stdio};

use image::RgbImage;

use crate::rng::Rng;

/// Frame count and size of the first video stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoInfo {
    pub frames: usize,
    pub width: u32,
    pub height: u32,
}

/// How often a decoder killed by a signal is run again before its record counts as bad.
const SIGNAL_RETRIES: usize = 3;

/// Runs `cmd` to its output. A decoder killed by a signal says nothing about the file: the
/// signal was meant for the rank's process group, which the decoder shares (the launcher's
/// SIGTERM on `launch stop` or a preemption, which the rank answers by stopping after its
/// step, and which must not turn a good video into a bad record): it runs again, up to
/// [`SIGNAL_RETRIES`] times.
fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, String> {
    use std::os::unix::process::ExitStatusExt;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut retries = 0;
    loop {
        let out = cmd.output().map_err(|e| format!("cannot run {what} (is ffmpeg installed?): {e}"))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        // Killed by a signal, or ffmpeg's own exit on a signal it caught (SIGTERM, SIGINT: code
        // 255, "received signal" at a log level we do not print): not the file's fault.
        let interrupted = out.status.signal().is_some() || out.status.code() == Some(255);
        if interrupted && retries < SIGNAL_RETRIES {
            retries += 1;
            continue;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{what} failed ({}): {}", out.status, err.trim().lines().last().unwrap_or("")));
    }
}

pub fn probe(path: &Path) -> Result<VideoInfo, String> {
    let out = run(
        Command::new("ffprobe")
            .args(["-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries"])
            .args(["stream=width,height,nb_read_packets", "-of", "csv=p=0"])
            .arg(path),
        "ffprobe",
    )?;
    let text = String::from_utf8_lossy(&out);
    let fields: Vec<&str> = text.trim().split(',').collect();
    let parse = |i: usize| fields.get(i).and_then(|s| s.trim().parse::<u64>().ok());
    match (parse(0), parse(1), parse(2)) {
        (Some(w), Some(h), Some(n)) if w > 0 && h > 0 && n > 0 => {
            Ok(VideoInfo { width: w as u32, height: h as u32, frames: n as usize })
        }
        _ => Err(format!("ffprobe found no decodable video stream (it printed {:?})", text.trim())),
    }
}

/// `numpy.linspace(0, vlen, n + 1).astype(int)`.
fn linspace_int(vlen: usize, n: usize) -> Vec<usize> {
    (0..=n).map(|k| (vlen as f64 * k as f64 / n as f64) as usize).collect()
}

/// The frame indices InternVL's 'rand' sampling picks for `num_frames` out of `vlen`.
pub fn frame_indices(num_frames: usize, vlen: usize, rng: &mut Rng) -> Vec<usize> {
    let n = num_frames.min(vlen).max(1);
    let edges = linspace_int(vlen, n);
    let ranges: Vec<(usize, usize)> = (0..n).map(|k| (edges[k], edges[k + 1].saturating_sub(1))).collect();
    if ranges.iter().all(|&(a, b)| a < b) {
        return ranges.iter().map(|&(a, b)| a + rng.below((b - a) as u64) as usize).collect();
    }
    // random.choice on an empty range raises; the reference then takes a sorted random subset.
    let mut all: Vec<usize> = (0..vlen).collect();
    rng.shuffle(&mut all);
    all.truncate(n);
    all.sort_unstable();
    all
}

/// Decodes the frames at `indices` (sorted, distinct) as RGB images.
pub fn read_frames(path: &Path, info: VideoInfo, indices: &[usize]) -> Result<Vec<RgbImage>, String> {
    let select: Vec<String> = indices.iter().map(|i| format!("eq(n\\,{i})")).collect();
    let filter = format!("select='{}'", select.join("+"));
    let out = run(
        Command::new("ffmpeg").args(["-nostdin", "-v", "error", "-i"]).arg(path).args([
            "-vf",
            &filter,
            "-fps_mode",
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "pipe:1",
        ]),
        "ffmpeg",
    )?;
    let frame = info.width as usize * info.height as usize * 3;
    if out.len() != frame * indices.len() {
        return Err(format!(
            "ffmpeg gave {} bytes for {} frames of {}x{} (expected {})",
            out.len(),
            indices.len(),
            info.width,
            info.height,
            frame * indices.len()
        ));
    }
    Ok(out
        .chunks_exact(frame)
        .map(|c| RgbImage::from_raw(info.width, info.height, c.to_vec()).expect("chunk sized for a frame"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoder_killed_by_a_signal_runs_again_and_a_failing_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("ran");
        // Killed by SIGTERM the first time (as the rank's process group is on a stop), fine then.
        let script = format!("if [ -e '{0}' ]; then printf ok; else touch '{0}'; kill -TERM $$; fi", mark.display());
        assert_eq!(run(Command::new("sh").args(["-c", &script]), "decoder").unwrap(), b"ok");
        // Killed every time: an error after the retries, naming the signal.
        let e = run(Command::new("sh").args(["-c", "kill -TERM $$"]), "decoder").unwrap_err();
        assert!(e.contains("decoder failed") && e.contains("SIGTERM"), "{e}");
        // ffmpeg's exit on a signal it caught (code 255) runs again too.
        let script = format!("if [ -e '{0}2' ]; then printf ok; else touch '{0}2'; exit 255; fi", mark.display());
        assert_eq!(run(Command::new("sh").args(["-c", &script]), "decoder").unwrap(), b"ok");
        // Another exit code is the file's problem: no retry.
        let e = run(Command::new("sh").args(["-c", "echo broken >&2; exit 1"]), "decoder").unwrap_err();
        assert!(e.contains("exit status: 1") && e.contains("broken"), "{e}");
    }

    #[test]
    fn indices_fall_in_the_reference_ranges() {
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let idx = frame_indices(4, 40, &mut rng);
            assert_eq!(idx.len(), 4);
            for (k, &i) in idx.iter().enumerate() {
                // linspace(0, 40, 5) = 0, 10, 20, 30, 40; range(a, b - 1)
                assert!(i >= k * 10 && i < k * 10 + 9, "{idx:?}");
            }
        }
        // More frames wanted than the video has: every interval has one frame, ranges are
        // empty, the fallback gives a sorted distinct subset.
        let idx = frame_indices(12, 5, &mut rng);
        assert_eq!(idx, [0, 1, 2, 3, 4]);
        let idx = frame_indices(3, 7, &mut rng);
        assert_eq!(idx.len(), 3);
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
    }
}
