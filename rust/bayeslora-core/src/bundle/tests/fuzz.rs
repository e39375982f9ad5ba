//! A seeded mutation fuzzer for the bundle loader: byte flips, interesting values, truncations,
//! insertions and splices of a valid bundle's three files. Every case runs on its own thread
//! under `catch_unwind` with a time limit, and must end in a typed error or a bundle that scores
//! a small input to finite values (or to a typed error): zero panics, zero hangs.
//!
//! `cargo test` runs [`DEFAULT_ITERS`] cases (a few seconds); set `BAYESLORA_FUZZ_ITERS` for a
//! longer run and `BAYESLORA_FUZZ_SEED` for other mutations (see README.md, "Tests").

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use super::{Fixture, CONFIG_FILE, META_FILE, WEIGHTS_FILE};
use crate::bundle::Bundle;
use crate::encoder::{Encoder, Noise};
use crate::error::ErrorKind;
use crate::mc::splitmix64;

/// Cases of a plain `cargo test`.
const DEFAULT_ITERS: u64 = 400;
/// A case that takes longer than this has hung.
const CASE_LIMIT: Duration = Duration::from_secs(20);
const FILES: [&str; 3] = [META_FILE, CONFIG_FILE, WEIGHTS_FILE];

/// A seeded stream of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = splitmix64(self.0);
        self.0
    }

    /// Uniform in `0..n` (n ≥ 1).
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap_or(u64::MAX)).unwrap_or(0)
    }
}

/// Texts a JSON number may be replaced with: the edges of every integer type, floats that
/// overflow f32 or f64, negatives, fractions, other types.
const JSON_VALUES: [&str; 24] = [
    "0",
    "1",
    "-1",
    "2",
    "3",
    "255",
    "65536",
    "1048577",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "1e-320",
    "3e38",
    "-3e38",
    "1e39",
    "0.5",
    "-0.0",
    "null",
    "\"x\"",
    "[]",
    "true",
];

/// Little-endian f32 values a weight may be replaced with.
const FLOATS: [f32; 8] = [
    3e38,
    -3e38,
    1e30,
    f32::NAN,
    f32::INFINITY,
    f32::MIN_POSITIVE,
    0.0,
    -1e-45,
];

/// One mutation of `files` (the three files' bytes), described for the report.
fn mutate(rng: &mut Rng, files: &mut [Vec<u8>; 3]) -> String {
    let which = rng.below(3);
    let other = rng.below(3);
    let (src, f) = (files[other].clone(), &mut files[which]);
    let name = FILES[which];
    let len = f.len();
    match rng.below(9) {
        0 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let at = rng.below(len);
                f[at] ^= 1 << rng.below(8);
            }
            format!("{name}: {n} bit flips")
        }
        1 => {
            let at = rng.below(len);
            f[at] = u8::try_from(rng.below(256)).unwrap_or(0);
            format!("{name}: byte {at} replaced")
        }
        2 => {
            let keep = rng.below(len);
            f.truncate(keep);
            format!("{name}: truncated to {keep} bytes")
        }
        3 => {
            // a number in a JSON file (or anywhere) replaced by an interesting value
            let digits: Vec<usize> = (0..len)
                .filter(|&i| f[i].is_ascii_digit() && (i == 0 || !f[i - 1].is_ascii_digit()))
                .collect();
            if digits.is_empty() {
                return format!("{name}: no number to replace");
            }
            let start = digits[rng.below(digits.len())];
            let mut end = start;
            while end < len && (f[end].is_ascii_digit() || b".eE-+".contains(&f[end])) {
                end += 1;
            }
            let v = JSON_VALUES[rng.below(JSON_VALUES.len())];
            f.splice(start..end, v.bytes());
            format!("{name}: number at {start} replaced by {v}")
        }
        4 => {
            // 4 bytes of the tensor data replaced by a float (the bundle often still loads)
            let w = &mut files[2];
            let header = w
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
                .and_then(|h| usize::try_from(h).ok())
                .map_or(0, |h| h.saturating_add(8));
            let v = FLOATS[rng.below(FLOATS.len())];
            let room = w.len().saturating_sub(header.saturating_add(4)) / 2;
            let at = header.saturating_add(rng.below(room) * 2);
            if at.saturating_add(4) <= w.len() {
                w[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            format!("{WEIGHTS_FILE}: f32 {v} at {at}")
        }
        5 => {
            // the safetensors header length (first 8 bytes) changed
            let v = match rng.below(4) {
                0 => 0u64,
                1 => u64::MAX,
                2 => u64::try_from(len).unwrap_or(0),
                _ => rng.next() % 4096,
            };
            if len >= 8 {
                f[..8].copy_from_slice(&v.to_le_bytes());
            }
            format!("{name}: first 8 bytes = {v}")
        }
        6 => {
            // a piece of some file copied over another place
            let from = rng.below(src.len());
            let n = 1 + rng.below(64);
            let piece = &src[from..(from + n).min(src.len())];
            let at = rng.below(len);
            let end = (at + piece.len()).min(len);
            f[at..end].copy_from_slice(&piece[..end - at]);
            format!(
                "{name}: {} bytes of {} spliced at {at}",
                end - at,
                FILES[other]
            )
        }
        7 => {
            // a piece of some file inserted
            let from = rng.below(src.len());
            let n = 1 + rng.below(64);
            let piece: Vec<u8> = src[from..(from + n).min(src.len())].to_vec();
            let at = rng.below(len + 1);
            f.splice(at..at, piece.iter().copied());
            format!(
                "{name}: {} bytes of {} inserted at {at}",
                piece.len(),
                FILES[other]
            )
        }
        _ => {
            // a range deleted
            let at = rng.below(len);
            let n = 1 + rng.below(32);
            let end = (at + n).min(len);
            f.drain(at..end);
            format!("{name}: bytes {at}..{end} deleted")
        }
    }
}

/// Whether the case's bundle loaded and was scored, or what it ended in if not acceptable.
fn run_case(dir: &Path) -> Result<bool, String> {
    let bundle = match Bundle::open(dir) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::Bundle => return Ok(false),
        Err(e) => return Err(format!("load: {:?} error {e}", e.kind())),
    };
    let enc = match Encoder::new(&bundle) {
        Ok(enc) => enc,
        Err(e) if e.kind() == ErrorKind::Bundle => return Ok(false),
        Err(e) => return Err(format!("build: {:?} error {e}", e.kind())),
    };
    let seqs = match enc.prepare(&[1, 3, 2, 0], &[1, 1, 1, 0], 1, 4) {
        Ok(s) => s,
        // a mutated config may shrink the vocabulary or positions below the input
        Err(e) if e.kind() == ErrorKind::Value => return Ok(false),
        Err(e) => return Err(format!("prepare: {:?} error {e}", e.kind())),
    };
    for noise in [
        Noise::Mean,
        Noise::Sampled {
            samples: 3,
            seed: 1,
        },
    ] {
        match enc.score(&seqs, noise) {
            Ok(cols) => {
                let all = cols
                    .probs
                    .iter()
                    .chain(&cols.confidence)
                    .chain(&cols.entropy)
                    .chain(&cols.expected_entropy)
                    .chain(&cols.mutual_info)
                    .chain(&cols.variance);
                if let Some(v) = all.copied().find(|v| !v.is_finite()) {
                    return Err(format!("score: {v} in the result"));
                }
            }
            // non-finite logits are refused by name
            Err(e) if e.kind() == ErrorKind::Value && e.to_string().contains("input 0") => {}
            Err(e) => return Err(format!("score: {:?} error {e}", e.kind())),
        }
    }
    Ok(true)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

#[test]
fn mutated_bundles_fail_typed_or_score_finite() {
    let iters = env_u64("BAYESLORA_FUZZ_ITERS", DEFAULT_ITERS);
    let seed = env_u64("BAYESLORA_FUZZ_SEED", 0x5eed);
    let mut rng = Rng(seed);
    // the valid bundles' bytes: f32 and bf16 storage
    let mut originals = Vec::new();
    for bf16 in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut f = Fixture::valid();
        if bf16 {
            f.store_as_bf16();
        }
        f.write(dir.path());
        let read = |name| std::fs::read(dir.path().join(name)).expect("read");
        originals.push([read(META_FILE), read(CONFIG_FILE), read(WEIGHTS_FILE)]);
    }
    let mut failures = Vec::new();
    let mut loaded = 0u64;
    for case in 0..iters {
        let mut files = originals[rng.below(originals.len())].clone();
        let mut what = Vec::new();
        for _ in 0..1 + rng.below(3) {
            what.push(mutate(&mut rng, &mut files));
        }
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, bytes) in FILES.iter().zip(&files) {
            std::fs::write(dir.path().join(name), bytes).expect("write");
        }
        let (tx, rx) = mpsc::channel();
        let path = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let out = catch_unwind(AssertUnwindSafe(|| run_case(&path)));
            let _ = tx.send(out);
        });
        let verdict = match rx.recv_timeout(CASE_LIMIT) {
            Ok(Ok(Ok(scored))) => {
                loaded += u64::from(scored);
                continue;
            }
            Ok(Ok(Err(e))) => e,
            Ok(Err(_)) => "panicked".to_string(),
            Err(_) => {
                // leave the dir for the hung thread; report
                std::mem::forget(dir);
                "hung".to_string()
            }
        };
        failures.push(format!(
            "case {case} (seed {seed:#x}): {} -> {verdict}",
            what.join("; ")
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {iters} mutated bundles failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("fuzz: {iters} cases, {loaded} loaded and scored, seed {seed:#x}");
    // the mutations are not all fatal: some bundles still load (and were scored)
    assert!(iters < 50 || loaded > 0, "no mutated bundle loaded");
}
