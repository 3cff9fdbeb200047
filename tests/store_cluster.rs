//! The store as a fleet shares it: a real three-node Garage cluster
//! (`.ci/garage-cluster.sh`: `replication_factor = 3`, consistency mode
//! `consistent`, one node per zone) on loopback, with a node stopped and
//! started again, snapshots restored by a second process with empty local
//! state, owners sharing the bucket, and a put repeated over blocks that
//! only one node holds.
//!
//! Without Garage the test prints one SKIP line and passes, unless
//! `SNAPVM_REQUIRE_S3=1` (`bash .ci/store-s3.sh` installs it).
#![cfg(feature = "s3")]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::Cluster;
use snapvm::store::{
    Backend, BackendError, ConvergentStore, ManifestId, ManifestKey, Namespace, S3Backend,
    StoreConfig, StoreError,
};

const OWNER_A: [u8; 32] = [0xa1; 32];
const OWNER_B: [u8; 32] = [0xb2; 32];
const PREFIX: &str = "fleet/";
/// Set in the child process: what to restore (see `child_restore`).
const CHILD_ENV: &str = "SNAPVM_CLUSTER_CHILD";

fn store(backend: S3Backend, key: [u8; 32]) -> ConvergentStore {
    store_on(backend, key)
}

fn store_on(backend: impl Backend + 'static, key: [u8; 32]) -> ConvergentStore {
    let config = StoreConfig {
        block_size: 64 * 1024,
        ..StoreConfig::default()
    };
    ConvergentStore::new(&config, backend, ManifestKey::from_bytes(key)).unwrap()
}

fn garage_or_skip() -> Option<PathBuf> {
    let bin = cluster::garage_binary();
    if bin.is_none() {
        if std::env::var("SNAPVM_REQUIRE_S3").as_deref() == Ok("1") {
            panic!("SNAPVM_REQUIRE_S3=1 but no garage binary (run `bash .ci/store-s3.sh`)");
        }
        let _ = writeln!(
            std::io::stderr(),
            "SKIP store_cluster: no garage binary on PATH or in ~/.cargo/bin (bash .ci/store-s3.sh installs it)"
        );
    }
    bin
}

/// A fresh three-node cluster, or `None` in the child process (it only
/// restores) or without Garage (skipped, see [`garage_or_skip`]).
fn start_cluster() -> Option<Cluster> {
    if std::env::var_os(CHILD_ENV).is_some() {
        return None;
    }
    Some(Cluster::start(garage_or_skip()?).unwrap())
}

/// What the child process is asked to restore, and where from.
struct Restore {
    env_file: PathBuf,
    node: usize,
    data: ManifestId,
    data_seed: u64,
    snapshot: Option<ManifestId>,
}

/// Runs `child_restore` in a new process of this test binary: a machine
/// with nothing local, reading the bucket through node `restore.node`.
fn restore_in_another_process(restore: &Restore) {
    let spec = format!(
        "{}|{}|{}|{}|{}",
        restore.env_file.display(),
        restore.node,
        restore.data,
        restore.data_seed,
        restore.snapshot.map(|s| s.to_string()).unwrap_or_default()
    );
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_restore",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the restoring process did not finish in 3 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.success() && stdout.contains("RESTORED OK"),
        "restore through node {} failed ({status}):\n{stdout}\n{}",
        restore.node,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The second machine: empty local state (a new process, new backend and
/// store handles), restores a data set and a VM snapshot through one node.
#[test]
fn child_restore() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let env = cluster::parse_env(parts[0].as_ref()).unwrap();
    let node: usize = parts[1].parse().unwrap();
    let backend = cluster::ready_backend(&cluster::config_from(&env, node, PREFIX));
    let s = store(backend, OWNER_A);
    let data: ManifestId = parts[2].parse().unwrap();
    let seed: u64 = parts[3].parse().unwrap();
    assert_eq!(
        s.get_bytes(&data).unwrap(),
        common::pseudo_random(3 << 20, seed)
    );
    if !parts[4].is_empty() {
        let id: ManifestId = parts[4].parse().unwrap();
        let snapshot = snapvm::Snapshot::load_from_store(&s, &id).unwrap();
        let mut vm = snapvm::VmInstance::restore(&common::config("testguest"), &snapshot).unwrap();
        // The saved VM had counted once.
        assert_eq!(vm.invoke("counter", b"").unwrap(), 2u64.to_le_bytes());
    }
    println!("RESTORED OK");
}

/// Waits until `f` succeeds (bounded): a node that just came back answers
/// once it has reconnected to its peers.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T, StoreError>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if start.elapsed() > cluster::READY_TIMEOUT => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn a_three_node_cluster_with_a_node_down() {
    let Some(cluster) = start_cluster() else {
        return;
    };
    let kvm = snapvm::vm::check_kvm().is_ok();
    if !kvm {
        assert!(
            std::env::var_os("SNAPVM_REQUIRE_KVM").is_none(),
            "SNAPVM_REQUIRE_KVM is set but KVM is unusable"
        );
        let _ = writeln!(
            std::io::stderr(),
            "store_cluster: KVM is unavailable; restoring data sets only, no VM snapshot"
        );
    }

    // Machine 1 writes through node 1: a data set and a VM snapshot.
    let node1 = store(cluster.backend(1, PREFIX), OWNER_A);
    let data = node1
        .put_bytes(&common::pseudo_random(3 << 20, 1), b"image v1")
        .unwrap();
    let snapshot = kvm.then(|| {
        let mut vm = snapvm::VmInstance::new(&common::config("testguest")).unwrap();
        vm.invoke("counter", b"").unwrap();
        vm.snapshot().unwrap().save_to_store(&node1).unwrap()
    });

    // Machine 2, another process with nothing local, restores through node 2.
    let restore = |node, data: &snapvm::store::PutReport, seed| Restore {
        env_file: cluster.env_file(),
        node,
        data: data.manifest,
        data_seed: seed,
        snapshot,
    };
    restore_in_another_process(&restore(2, &data, 1));

    // Owner B shares the bucket: it dedups against A, cannot delete A's.
    let node2_b = store(cluster.backend(2, PREFIX), OWNER_B);
    let b_data = node2_b
        .put_bytes(&common::pseudo_random(3 << 20, 1), b"b's copy")
        .unwrap();
    assert_eq!(b_data.new_blocks, 0, "B's identical data is deduplicated");
    assert!(matches!(
        node2_b.delete(&data.manifest),
        Err(StoreError::NotOwner { manifest }) if manifest == data.manifest
    ));

    // Node 3 goes down. With replication factor 3 in consistent mode reads
    // and writes need 2 of 3 nodes: everything keeps working through the
    // other two.
    cluster.stop_node(3);
    let node2 = store(cluster.backend(2, PREFIX), OWNER_A);
    assert_eq!(
        node2.get_bytes(&data.manifest).unwrap(),
        common::pseudo_random(3 << 20, 1)
    );
    restore_in_another_process(&restore(2, &data, 1));
    let written_while_down = node1
        .put_bytes(&common::pseudo_random(3 << 20, 2), b"image v2")
        .unwrap();
    assert!(written_while_down.new_blocks > 0);
    let listed: Vec<ManifestId> = node2.list().unwrap().iter().map(|m| m.id).collect();
    assert!(listed.contains(&data.manifest) && listed.contains(&written_while_down.manifest));
    assert!(node2.verify().unwrap().is_clean());
    // Deleting and collecting work too; B's copy keeps the shared blocks.
    node1.delete(&data.manifest).unwrap();
    let gc = node2.gc().unwrap();
    assert_eq!(gc.deferred, None);
    assert_eq!(gc.deleted_blocks, 0, "B's manifest references them all");
    assert_eq!(
        node2_b.get_bytes(&b_data.manifest).unwrap(),
        common::pseudo_random(3 << 20, 1)
    );

    // Node 3 returns: nothing written is lost, and through node 3 itself
    // (which missed the writes) every data set reads back and verify is
    // clean.
    cluster.start_node(3);
    let node3 = store(cluster.backend(3, PREFIX), OWNER_A);
    let report = eventually("verify through node 3", || node3.verify());
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        node3.get_bytes(&written_while_down.manifest).unwrap(),
        common::pseudo_random(3 << 20, 2)
    );
    assert!(matches!(
        node3.get_bytes(&data.manifest),
        Err(StoreError::ManifestMissing { .. })
    ));
    restore_in_another_process(&restore(3, &written_while_down, 2));
    let node3_b = store(cluster.backend(3, PREFIX), OWNER_B);
    assert_eq!(
        node3_b.get_bytes(&b_data.manifest).unwrap(),
        common::pseudo_random(3 << 20, 1)
    );
}

/// Copies (`cp -a`) a node's Garage directories (`meta/`, `data/`) from
/// `from` to `to`.
fn copy_node_state(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for sub in ["meta", "data"] {
        let _ = std::fs::remove_dir_all(to.join(sub));
        let status = Command::new("cp")
            .arg("-a")
            .arg(from.join(sub))
            .arg(to.join(sub))
            .status()
            .unwrap();
        assert!(status.success(), "cp -a {}", from.join(sub).display());
    }
}

/// Issue 22: the store counts a block as stored only when the backend
/// acknowledged a write of it at its write quorum. Garage answers a HEAD
/// with "present" when a single node holds the object — as after a put
/// through node 1 during which nodes 2 and 3 died — and a put that trusted
/// that committed a manifest whose blocks nodes 2 and 3 could not serve.
///
/// The state is made exactly: nodes 2 and 3 are stopped and their state is
/// copied; the blocks of a data set are written through node 1 (as an
/// interrupted put leaves them, without a manifest); nodes 2 and 3 are
/// killed and get their old state back, so only node 1 holds the blocks. A
/// put through node 1 while they are down fails with a typed error; once
/// they are back, the put repeated must be readable, and `verify` clean,
/// through every node.
#[test]
fn a_put_repeated_over_blocks_only_one_node_holds_is_readable_through_every_node() {
    let Some(cluster) = start_cluster() else {
        return;
    };
    // Short client retries: a request to a cluster without quorum fails in
    // seconds, not the default half minute.
    let backend = |n| {
        let mut config = cluster.config(n, PREFIX);
        config.retry_timeout = Duration::from_secs(3);
        cluster::ready_backend(&config)
    };
    let data = common::pseudo_random(4 << 20, 22);
    // The block objects a put of `data` writes (convergent: the same in any
    // store with the same salts and block size).
    let memory = snapvm::store::MemoryBackend::new();
    store_on(memory.clone(), OWNER_A)
        .put_bytes(&data, b"")
        .unwrap();
    let blocks: Vec<_> = memory
        .list(Namespace::Blocks)
        .unwrap()
        .into_iter()
        .map(|name| (name, memory.get(&name, 1 << 20).unwrap().unwrap()))
        .collect();
    assert!(blocks.len() >= 64);

    let saved = tempfile::tempdir().unwrap();
    for n in [2, 3] {
        cluster.stop_node(n);
        copy_node_state(&cluster.node_dir(n), &saved.path().join(n.to_string()));
        cluster.start_node(n);
    }
    let raw1 = backend(1);
    let node1 = store(backend(1), OWNER_A);
    for (name, bytes) in &blocks {
        eventually("writing a block through node 1", || {
            raw1.put_if_absent(name, bytes)
                .map_err(|source| StoreError::Backend {
                    op: snapvm::store::Op::Put,
                    object: *name,
                    source,
                })
        });
    }
    // Nodes 2 and 3 crash and come back without those writes.
    cluster.kill_nodes(&[2, 3]);
    for n in [2, 3] {
        copy_node_state(&saved.path().join(n.to_string()), &cluster.node_dir(n));
    }
    let down = node1.put_bytes(&data, b"repeated");
    assert!(
        matches!(
            down,
            Err(StoreError::Backend {
                source: BackendError::S3(_),
                ..
            } | StoreError::List {
                source: BackendError::S3(_),
                ..
            })
        ),
        "a put without quorum: {down:?}"
    );
    cluster.start_node(2);
    cluster.start_node(3);
    // Now a HEAD through any node finds every block (node 1 holds it), but
    // a GET through node 2 or 3 does not: a put that skipped them on the
    // strength of the HEAD failed below with `StoreError::Missing`.
    let put = eventually("the repeated put", || node1.put_bytes(&data, b"repeated"));
    for n in 1..=3 {
        let s = store(backend(n), OWNER_A);
        assert!(s.get_bytes(&put.manifest).unwrap() == data, "node {n}");
        let report = s.verify().unwrap();
        assert!(report.is_clean(), "verify through node {n}: {report:?}");
    }
}

/// A put keeps many block PUTs in flight; when the cluster loses its write
/// quorum in the middle of one, the put fails with the S3 error of a block
/// and writes no manifest, and the same put succeeds once the nodes are
/// back.
#[test]
fn a_put_with_many_blocks_in_flight_that_loses_quorum_writes_no_manifest() {
    let Some(cluster) = start_cluster() else {
        return;
    };
    let backend = |n| {
        let mut config = cluster.config(n, "inflight/");
        config.retry_timeout = Duration::from_secs(3);
        cluster::ready_backend(&config)
    };
    let watch = backend(1);
    let node1 = store(backend(1), OWNER_A);
    let data = common::pseudo_random(64 << 20, 23);
    let result = std::thread::scope(|s| {
        let put = s.spawn(|| node1.put_bytes(&data, b"in flight"));
        // Nodes 2 and 3 die once the first blocks arrived.
        let start = Instant::now();
        while watch.list(Namespace::Blocks).map_or(0, |l| l.len()) < 8 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no block arrived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cluster.kill_nodes(&[2, 3]);
        put.join().unwrap()
    });
    match &result {
        Err(StoreError::Backend {
            op: snapvm::store::Op::Put,
            object,
            source: BackendError::S3(_),
        }) => assert_eq!(object.namespace, Namespace::Blocks, "{result:?}"),
        _ => panic!("a put that lost quorum mid-way: {result:?}"),
    }
    cluster.start_node(2);
    cluster.start_node(3);
    let manifests = eventually("listing manifests", || {
        watch
            .list(Namespace::Manifests)
            .map_err(|source| StoreError::List {
                namespace: "manifests",
                source,
            })
    });
    assert!(manifests.is_empty(), "a failed put wrote {manifests:?}");
    let put = eventually("the put again", || node1.put_bytes(&data, b"in flight"));
    assert!(node1.get_bytes(&put.manifest).unwrap() == data);
}
