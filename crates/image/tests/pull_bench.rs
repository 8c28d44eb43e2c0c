//! Cold-pull timing of a 100 MiB single-layer gzip image of incompressible data from a real
//! `docker-registry` (the figure issue 6 sets a target for). Ignored: run it in release mode,
//! `cargo test --release -p berth-image --test pull_bench -- --ignored --nocapture`.
//! `BERTH_BENCH_MIB` sizes the file, `BERTH_BENCH_RUNS` the number of cold pulls.

mod support;

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use berth_image::{ImageConfig, ImageStore, RegistryConfig};
use berth_snapshot::Snapshotter;
use support::{RealRegistry, TestLayer, push_image, sha};

/// Pseudo-random bytes (xorshift64*), fast enough that building the fixture is not the wait.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x6265_7274_6862_656e;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `data/` and `data/big.bin` of `len` random bytes, gzipped (level 1, as the bench does).
fn big_layer(len: usize) -> TestLayer {
    let mut builder = tar::Builder::new(Vec::with_capacity(len + 8192));
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_mtime(0);
    builder.append_data(&mut dir, "data/", &[][..]).unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o644);
    file.set_size(len as u64);
    file.set_uid(0);
    file.set_gid(0);
    file.set_mtime(0);
    builder.append_data(&mut file, "data/big.bin", &random_bytes(len)[..]).unwrap();
    let tar = builder.into_inner().unwrap();
    let diff_id = sha(&tar);
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(tar.len() + tar.len() / 100),
        flate2::Compression::fast(),
    );
    enc.write_all(&tar).unwrap();
    let blob = enc.finish().unwrap();
    TestLayer { media_type: "application/vnd.docker.image.rootfs.diff.tar.gzip", blob, diff_id }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run in release mode with --ignored --nocapture"]
async fn cold_pull_100mib() {
    let mib: usize =
        std::env::var("BERTH_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let runs: usize =
        std::env::var("BERTH_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let regdir = tempfile::tempdir().unwrap();
    let reg = RealRegistry::start(regdir.path()).await;
    let host = reg.host();
    let layer = tokio::task::spawn_blocking(move || big_layer(mib << 20)).await.unwrap();
    push_image(&host, "bench/big", "1.0", &[layer], "amd64", "0").await;
    let reference = format!("{host}/bench/big:1.0");
    let mut times = Vec::new();
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(redb::Database::create(dir.path().join("meta.redb")).unwrap());
        let snapshots = Arc::new(Snapshotter::open(dir.path().join("snapshots")).unwrap());
        let config = ImageConfig {
            content_dir: dir.path().join("content"),
            registry: RegistryConfig::default(),
            max_concurrent_downloads: 3,
        };
        let store = ImageStore::open(db, snapshots, config).unwrap();
        let started = Instant::now();
        store.pull(&reference, None).await.unwrap();
        let secs = started.elapsed().as_secs_f64();
        println!("cold pull {run}: {secs:.3} s");
        times.push(secs);
        drop(store);
        // Removing 200 MiB takes a moment; not part of the figure.
        tokio::task::spawn_blocking(move || drop(dir)).await.unwrap();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "cold pull of {mib} MiB: median {:.3} s, min {:.3} s",
        times[times.len() / 2],
        times[0]
    );
}
