//! Fleet figures: the store on Garage, a single node beside a three-node
//! cluster (`replication_factor = 3`, consistency mode `consistent`) with
//! all nodes up and with one node down. Each cluster is started and stopped
//! here by `.ci/garage-cluster.sh`; without Garage (or without the `s3`
//! feature) the section prints one "skipped" line.
//!
//! - `store.s3_put_mbps`: `ConvergentStore::put` of a data set of new
//!   random bytes (2 MiB with `--quick`, else 4 MiB; 64 KiB blocks, default
//!   two ingest threads) through node 1's S3 API. Baseline: the same on a
//!   single node, `store.s3_put_mbps_1node`. `store.s3_put_mbps_node_down`:
//!   the same with node 3 stopped, same baseline.
//! - `store.s3_restore_ms`: a VM snapshot (the `testguest` program, 64 MiB
//!   of memory, a few hundred KiB of it written) saved through node 1,
//!   restored through node 2 by a fresh machine: a new `S3Backend` and
//!   store handle (nothing cached), `Snapshot::load_from_store`,
//!   `VmInstance::restore` and one call. On a cluster every small object
//!   costs a few round trips between nodes, so this is dominated by
//!   latency, not bandwidth. Baseline `store.s3_restore_ms_1node` (node 1 of a single
//!   node). `store.s3_restore_ms_node_down`: with node 3 stopped. Without
//!   KVM the restore figures are skipped.
//!
//! No targets: these figures inform on the price of replication.

use super::{Ctx, Figure};

#[cfg(feature = "s3")]
#[path = "../../tests/common/cluster.rs"]
mod cluster;

/// Measures the fleet figures, or says why they are skipped.
pub fn measure(ctx: &Ctx) -> Vec<Figure> {
    #[cfg(feature = "s3")]
    {
        s3::measure(ctx)
    }
    #[cfg(not(feature = "s3"))]
    {
        let _ = ctx;
        println!(
            "note: store.s3_* skipped: built without the s3 feature \
             (cargo bench --features s3 --bench report)"
        );
        Vec::new()
    }
}

#[cfg(feature = "s3")]
mod s3 {
    use std::time::Instant;

    use super::cluster::{self, Cluster};
    use snapvm::store::{ConvergentStore, ManifestKey, S3Backend, StoreConfig};

    use super::super::{Ctx, Figure, Stats};

    const OWNER: [u8; 32] = [0x5e; 32];

    fn store(backend: S3Backend) -> ConvergentStore {
        ConvergentStore::new(
            &StoreConfig::default(),
            backend,
            ManifestKey::from_bytes(OWNER),
        )
        .expect("store")
    }

    /// `len` pseudo-random bytes, different per seed.
    fn data(len: usize, seed: u64) -> Vec<u8> {
        super::super::common::pseudo_random(len, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    struct Samples {
        put_mbps: Vec<f64>,
        restore_ms: Vec<f64>,
    }

    /// Puts through node 1 and restores through `restore_node`, `samples`
    /// times each. `seed` keeps every put's data new to the bucket.
    fn run(ctx: &Ctx, cluster: &Cluster, restore_node: usize, seed: u64) -> Samples {
        let len = if ctx.quick { 2 << 20 } else { 4 << 20 };
        let samples = ctx.samples(5, 3);
        let prefix = "bench/";
        let writer = store(cluster.backend(1, prefix));
        let put_mbps = (0..samples)
            .map(|i| {
                let bytes = data(len, seed * 1000 + i as u64);
                let start = Instant::now();
                writer.put_bytes(&bytes, b"").expect("put");
                len as f64 / 1e6 / start.elapsed().as_secs_f64()
            })
            .collect();

        let mut restore_ms = Vec::new();
        if snapvm::vm::check_kvm().is_ok() {
            let guest = std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join("testguest");
            let program = snapvm::GuestProgram::from_file(guest).expect("testguest");
            let config = snapvm::VmConfig::new(program);
            let mut vm = snapvm::VmInstance::new(&config).expect("boot");
            for _ in 0..seed {
                vm.invoke("counter", b"").expect("counter");
            }
            let id = vm
                .snapshot()
                .expect("snapshot")
                .save_to_store(&writer)
                .expect("save");
            drop(vm);
            let restore_config = cluster.config(restore_node, prefix);
            // The API answers (a node just stopped is noticed by the others).
            drop(cluster.backend(restore_node, prefix));
            for _ in 0..samples {
                let start = Instant::now();
                let fresh = store(S3Backend::new(&restore_config).expect("backend"));
                let snapshot = snapvm::Snapshot::load_from_store(&fresh, &id).expect("load");
                let mut vm = snapvm::VmInstance::restore(&config, &snapshot).expect("restore");
                let value = vm.invoke("counter", b"").expect("counter");
                assert_eq!(value, (seed + 1).to_le_bytes(), "restored state");
                restore_ms.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        Samples {
            put_mbps,
            restore_ms,
        }
    }

    pub fn measure(ctx: &Ctx) -> Vec<Figure> {
        let Some(garage) = cluster::garage_binary() else {
            println!("note: store.s3_* skipped: garage not installed (bash .ci/store-s3.sh)");
            return Vec::new();
        };
        if snapvm::vm::check_kvm().is_err() {
            assert!(
                std::env::var_os("SNAPVM_REQUIRE_KVM").is_none(),
                "KVM required"
            );
            println!("note: store.s3_restore_ms* skipped: KVM is unavailable");
        }
        let single = Cluster::start_nodes(garage.clone(), 1).expect("single Garage node");
        let mut one = run(ctx, &single, 1, 1);
        drop(single);
        let three = Cluster::start(garage).expect("three-node Garage cluster");
        let mut all = run(ctx, &three, 2, 2);
        three.stop_node(3);
        let mut down = run(ctx, &three, 2, 3);
        drop(three);

        let put1 = Figure::of(
            "store.s3_put_mbps_1node",
            &Stats::of(&mut one.put_mbps),
            "MB/s",
        );
        let mut figures = vec![
            Figure::of("store.s3_put_mbps", &Stats::of(&mut all.put_mbps), "MB/s").against(&put1),
            Figure::of(
                "store.s3_put_mbps_node_down",
                &Stats::of(&mut down.put_mbps),
                "MB/s",
            )
            .against(&put1),
        ];
        figures.insert(0, put1);
        if !one.restore_ms.is_empty() {
            let restore1 = Figure::of(
                "store.s3_restore_ms_1node",
                &Stats::of(&mut one.restore_ms),
                "ms",
            );
            figures.push(
                Figure::of("store.s3_restore_ms", &Stats::of(&mut all.restore_ms), "ms")
                    .against(&restore1),
            );
            figures.push(
                Figure::of(
                    "store.s3_restore_ms_node_down",
                    &Stats::of(&mut down.restore_ms),
                    "ms",
                )
                .against(&restore1),
            );
            figures.insert(figures.len() - 2, restore1);
        }
        figures
    }
}
