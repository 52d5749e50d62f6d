//! AES-256-GCM as fhirvault seals and opens resources (`Cipher::seal` / `Cipher::open`: a fresh
//! nonce, the row-bound AAD, one buffer), at resource sizes, against `openssl speed -evp
//! aes-256-gcm` at the same sizes in the same run (single-threaded both); and which of the CPU's
//! AES and carry-less multiply paths exist here (the `aes` crate picks AES-NI or, where present,
//! VAES with AVX-512 at run time; `polyval`, under `ghash`, picks PCLMULQDQ).
//!
//! Run: `cargo bench --bench crypto` (`BENCH_SECS`). Writes benches/results/crypto-<date>.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use fhirvault::crypto::Aad;
use serde_json::{json, Value};
use support::{env_num, throughput};

/// `openssl speed -evp aes-256-gcm` at `bytes`: bytes per second.
fn openssl_speed(bytes: usize, secs: u64) -> Option<f64> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-evp", "aes-256-gcm", "-seconds"])
        .arg(secs.to_string())
        .arg("-bytes")
        .arg(bytes.to_string())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with("AES-256-GCM") || l.starts_with("aes-256-gcm"))?;
    let k = line.split_whitespace().last()?.trim_end_matches('k');
    k.parse::<f64>().ok().map(|v| v * 1000.0)
}

/// The CPU features the AES-GCM paths depend on, as detected at run time.
fn cpu_features() -> Value {
    json!({
        "aes": std::arch::is_x86_feature_detected!("aes"),
        "pclmulqdq": std::arch::is_x86_feature_detected!("pclmulqdq"),
        "avx": std::arch::is_x86_feature_detected!("avx"),
        "vaes": std::arch::is_x86_feature_detected!("vaes"),
        "vpclmulqdq": std::arch::is_x86_feature_detected!("vpclmulqdq"),
        "avx512f": std::arch::is_x86_feature_detected!("avx512f"),
    })
}

fn main() {
    if !support::start() {
        return;
    }
    let secs = env_num("BENCH_SECS", 2);
    let dir = tempfile::tempdir().unwrap();
    let keys = fhirvault::crypto::KeyFile::open_or_create(&dir.path().join("k")).unwrap();
    let cipher = fhirvault::crypto::Cipher::from_provider(&keys).unwrap();
    let features = cpu_features();
    eprintln!("AES-256-GCM, {secs}s a figure; CPU {} {features}", support::cpu_model());
    let mut rows = Vec::new();
    for size in [256usize, 1024, 4096, 16384] {
        let plain = vec![b'x'; size];
        let aad = Aad {
            table: "resource_versions",
            resource_type: "Observation",
            logical_id: "0f6e5d4c-3b2a-4190-8f7e-6d5c4b3a2910",
            version_id: 1,
        };
        let sealed = cipher.seal(&aad, &plain).unwrap();
        let seal = throughput(
            1,
            secs,
            |_| (),
            |_, _| {
                std::hint::black_box(cipher.seal(&aad, &plain).unwrap());
            },
        );
        let open = throughput(
            1,
            secs,
            |_| (),
            |_, _| {
                std::hint::black_box(cipher.open(&aad, &sealed).unwrap());
            },
        );
        let (ours_seal, ours_open) = (seal * size as f64, open * size as f64);
        let openssl = openssl_speed(size, secs);
        eprintln!(
            "  {size:>5} B: seal {:>6.0} MB/s  open {:>6.0} MB/s  openssl {:>6.0} MB/s  seal/openssl {:.2}  open/openssl {:.2}",
            ours_seal / 1e6,
            ours_open / 1e6,
            openssl.unwrap_or(0.0) / 1e6,
            openssl.map(|o| ours_seal / o).unwrap_or(0.0),
            openssl.map(|o| ours_open / o).unwrap_or(0.0),
        );
        rows.push(json!({
            "bytes": size, "seal_per_sec": seal, "open_per_sec": open,
            "seal_bytes_per_sec": ours_seal, "open_bytes_per_sec": ours_open, "openssl_bytes_per_sec": openssl,
            "seal_ratio_vs_openssl": openssl.map(|o| ours_seal / o),
            "open_ratio_vs_openssl": openssl.map(|o| ours_open / o),
        }));
    }
    let mut out = support::provenance("crypto");
    out["cpu_features"] = features;
    out["sizes"] = Value::Array(rows);
    support::write_results("crypto", &out);
}
