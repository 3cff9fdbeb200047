//! The S3 backend against a real S3-compatible server: Garage, started by
//! this test on loopback ports in a temporary directory (single node,
//! `replication_factor = 1`), and killed at the end.
//!
//! Garage comes from `bash .ci/store-s3.sh` (or `cargo install --locked
//! garage@2.5.0 --no-default-features --features bundled-libs,lmdb`). Without
//! it the test prints one SKIP line and passes, unless `SNAPVM_REQUIRE_S3=1`.
#![cfg(feature = "s3")]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapvm::store::{
    Backend, BackendError, ConvergentStore, Entry, ManifestKey, Namespace, ObjectName, Problem,
    PutOutcome, S3Backend, S3Config, StoreConfig, StoreError,
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running single-node Garage; killed on drop (also when a test panics).
struct Garage {
    bin: PathBuf,
    config: PathBuf,
    child: Child,
    s3_port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Garage {
    fn start(bin: PathBuf) -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let (rpc, s3) = (free_port(), free_port());
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).unwrap();
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
"#,
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start garage");
        let garage = Garage {
            bin,
            config,
            child,
            s3_port: s3,
            _dir: dir,
        };
        garage.setup();
        garage
    }

    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "garage {args:?}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn cli_retry(&self, args: &[&str]) -> String {
        let start = Instant::now();
        loop {
            match self.cli(args) {
                Ok(out) => return out,
                Err(e) if start.elapsed() > Duration::from_secs(60) => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn setup(&self) {
        let node = self.cli_retry(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        self.cli_retry(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        self.cli_retry(&["layout", "apply", "--version", "1"]);
        self.cli_retry(&["bucket", "create", "snapvm-test"]);
        let key = self.cli_retry(&["key", "create", "snapvm-test"]);
        self.cli_retry(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            "snapvm-test",
            "--key",
            "snapvm-test",
        ]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name:?} in `garage key create` output:\n{key}"))
        };
        std::fs::write(
            self.config.with_file_name("key"),
            format!("{}\n{}\n", field("Key ID:"), field("Secret key:")),
        )
        .unwrap();
    }

    fn s3_config(&self, prefix: &str) -> S3Config {
        let key = std::fs::read_to_string(self.config.with_file_name("key")).unwrap();
        let mut lines = key.lines();
        S3Config {
            endpoint: format!("http://127.0.0.1:{}", self.s3_port),
            region: "garage".into(),
            bucket: "snapvm-test".into(),
            prefix: prefix.into(),
            access_key_id: lines.next().unwrap().into(),
            secret_access_key: lines.next().unwrap().into(),
            allow_http: true,
            retry_timeout: snapvm::store::S3Config::DEFAULT_RETRY_TIMEOUT,
        }
    }

    /// A backend handle, once the S3 API answers (the layout takes a moment).
    fn backend(&self, prefix: &str) -> S3Backend {
        let backend = S3Backend::new(&self.s3_config(prefix)).unwrap();
        let start = Instant::now();
        while let Err(e) = backend.list(Namespace::Blocks) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "S3 API not ready: {e}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        backend
    }
}

fn store(backend: S3Backend, key: [u8; 32]) -> ConvergentStore {
    let config = StoreConfig {
        block_size: 64 * 1024,
        ..StoreConfig::default()
    };
    ConvergentStore::new(&config, backend, ManifestKey::from_bytes(key)).unwrap()
}

#[test]
fn s3_backend_against_garage() {
    let Some(bin) = cluster::garage_binary() else {
        if std::env::var("SNAPVM_REQUIRE_S3").as_deref() == Ok("1") {
            panic!("SNAPVM_REQUIRE_S3=1 but no garage binary (run `bash .ci/store-s3.sh`)");
        }
        // Straight to fd 2: the harness captures print macros.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP store_s3: no garage binary on PATH or in ~/.cargo/bin (bash .ci/store-s3.sh installs it)"
        );
        return;
    };
    let garage = Garage::start(bin);

    backend_contract(&garage.backend("contract/"));
    fleet(&garage);
    fleet_snapshot(&garage);
    fleet_on_demand(&garage);
}

/// The request of the on-demand fleet case: 64 pages, in runs of 16.
const TOUCH: [u8; 8] = [64, 0, 0, 0, 16, 0, 0, 0];

/// Machine A saves a snapshot; machine B, another process with an empty
/// block cache, restores it straight from the bucket, on demand.
fn fleet_on_demand(garage: &Garage) {
    if snapvm::vm::check_kvm().is_err() {
        assert!(
            std::env::var_os("SNAPVM_REQUIRE_KVM").is_none(),
            "KVM required"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIP fleet_on_demand: KVM is unavailable"
        );
        return;
    }
    let owner = [10u8; 32];
    let machine_a = store(garage.backend("ondemand/"), owner);
    let config = testguest();
    let mut vm = snapvm::VmInstance::new(&config).unwrap();
    vm.invoke("fill_region", &[8, 0, 5]).unwrap();
    let snapshot = vm.snapshot().unwrap();
    let id = snapshot.save_to_store(&machine_a).unwrap();
    let expected = snapvm::VmInstance::restore(&config, &snapshot)
        .unwrap()
        .invoke("touch_region", &TOUCH)
        .unwrap();
    let data_blocks = machine_a.manifest(&id).unwrap().refs().len();

    let s3 = garage.s3_config("ondemand/");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "on_demand_child", "--nocapture"])
        .env("SNAPVM_CHILD_ENDPOINT", &s3.endpoint)
        .env("SNAPVM_CHILD_KEY_ID", &s3.access_key_id)
        .env("SNAPVM_CHILD_SECRET", &s3.secret_access_key)
        .env("SNAPVM_CHILD_MANIFEST", id.to_string())
        .env(
            "SNAPVM_CHILD_EXPECTED",
            u64::from_le_bytes(expected.try_into().unwrap()).to_string(),
        )
        .env("SNAPVM_CHILD_BLOCKS", data_blocks.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn testguest() -> snapvm::VmConfig {
    let guest = std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join("testguest");
    snapvm::VmConfig::new(snapvm::GuestProgram::from_file(guest).unwrap())
        .timeout(Some(Duration::from_secs(120)))
}

/// Machine B of [`fleet_on_demand`]: run by it as a child process.
#[test]
#[ignore = "the child process of s3_backend_against_garage's on-demand fleet case"]
fn on_demand_child() {
    let var = |name| std::env::var(name).unwrap();
    let config = S3Config {
        endpoint: var("SNAPVM_CHILD_ENDPOINT"),
        region: "garage".into(),
        bucket: "snapvm-test".into(),
        prefix: "ondemand/".into(),
        access_key_id: var("SNAPVM_CHILD_KEY_ID"),
        secret_access_key: var("SNAPVM_CHILD_SECRET"),
        allow_http: true,
        retry_timeout: snapvm::store::S3Config::DEFAULT_RETRY_TIMEOUT,
    };
    let machine_b = std::sync::Arc::new(store(S3Backend::new(&config).unwrap(), [10u8; 32]));
    let id: snapvm::store::ManifestId = var("SNAPVM_CHILD_MANIFEST").parse().unwrap();
    let snapshot = snapvm::Snapshot::open_from_store(
        &machine_b,
        &id,
        &snapvm::snapshot::OnDemandConfig::default(),
    )
    .unwrap();
    let mut vm = snapvm::VmInstance::restore(&testguest(), &snapshot).unwrap();
    let out = vm.invoke("touch_region", &TOUCH).unwrap();
    let expected: u64 = var("SNAPVM_CHILD_EXPECTED").parse().unwrap();
    assert_eq!(u64::from_le_bytes(out.try_into().unwrap()), expected);
    // Started before the snapshot arrived: only what it touched came.
    let total: u64 = var("SNAPVM_CHILD_BLOCKS").parse().unwrap();
    let fetched = snapshot.blocks_fetched().unwrap();
    assert!(fetched > 0 && fetched < total / 2, "{fetched} of {total}");
}

/// A VM snapshot saved by one machine restores on another sharing the bucket.
fn fleet_snapshot(garage: &Garage) {
    if snapvm::vm::check_kvm().is_err() {
        assert!(
            std::env::var_os("SNAPVM_REQUIRE_KVM").is_none(),
            "KVM required"
        );
        let _ = writeln!(std::io::stderr(), "SKIP fleet_snapshot: KVM is unavailable");
        return;
    }
    let owner = [9u8; 32];
    let machine_a = store(garage.backend("snapshots/"), owner);
    let machine_b = store(garage.backend("snapshots/"), owner);
    let guest = std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join("testguest");
    let config = snapvm::VmConfig::new(snapvm::GuestProgram::from_file(guest).unwrap());
    let mut vm = snapvm::VmInstance::new(&config).unwrap();
    vm.invoke("counter", b"").unwrap();
    let id = vm.snapshot().unwrap().save_to_store(&machine_a).unwrap();
    drop(vm);

    let snapshot = snapvm::Snapshot::load_from_store(&machine_b, &id).unwrap();
    let mut restored = snapvm::VmInstance::restore(&config, &snapshot).unwrap();
    assert_eq!(restored.invoke("counter", b"").unwrap(), 2u64.to_le_bytes());
}

/// The Backend trait's promises, on raw objects.
fn backend_contract(b: &S3Backend) {
    let name = ObjectName {
        namespace: Namespace::Manifests,
        id: [0xab; 32],
    };
    assert_eq!(b.get(&name, 100).unwrap(), None);
    assert!(!b.has(&name).unwrap());
    assert_eq!(
        b.put_if_absent(&name, b"hello").unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(
        b.put_if_absent(&name, b"hello").unwrap(),
        PutOutcome::AlreadyPresent
    );
    assert!(b.has(&name).unwrap());
    assert_eq!(b.get(&name, 5).unwrap().unwrap(), b"hello");
    assert!(matches!(
        b.get(&name, 4),
        Err(BackendError::TooLarge { len: 5, limit: 4 })
    ));
    assert_eq!(b.list(Namespace::Manifests).unwrap(), vec![name]);
    assert!(b.list(Namespace::Blocks).unwrap().is_empty());
    b.delete(&name).unwrap();
    b.delete(&name).unwrap();
    assert!(!b.has(&name).unwrap());
}

/// Two machines (separate backend and store handles) sharing one bucket.
fn fleet(garage: &Garage) {
    let owner = [7u8; 32];
    let machine_a = store(garage.backend("fleet/"), owner);
    let machine_b = store(garage.backend("fleet/"), owner);

    let mut image = common::pseudo_random(3 << 20, 1);
    image[1 << 20..(1 << 20) + 256 * 1024].fill(0); // four zero blocks
    image.extend_from_slice(b"tail that is not a whole block");
    let put = machine_a.put_bytes(&image, b"runtime v1").unwrap();
    assert_eq!(put.blocks, 49);
    assert_eq!(put.zero_blocks, 4);
    assert_eq!(put.new_blocks, 45);

    // Machine B reads what A wrote, and deduplicates against it.
    assert_eq!(machine_b.get_bytes(&put.manifest).unwrap(), image);
    let listed = machine_b.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].metadata, b"runtime v1");
    let mut image2 = image.clone();
    image2[..1000].fill(0xee); // one block differs
    let put2 = machine_b.put_bytes(&image2, b"runtime v1 + state").unwrap();
    assert_eq!(put2.new_blocks, 1);
    assert!(machine_a.verify().unwrap().is_clean());

    // Delete A's data set; B's gc removes exactly the block only A used.
    machine_a.delete(&put.manifest).unwrap();
    let gc = machine_b.gc().unwrap();
    assert_eq!(gc.deferred, None);
    assert_eq!(gc.deleted_blocks, 1);
    assert_eq!(machine_a.get_bytes(&put2.manifest).unwrap(), image2);
    let report = machine_a.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.blocks, 45);

    // A block lost from the bucket is reported, by get and by verify.
    let m = machine_a.manifest(&put2.manifest).unwrap();
    let Some(Entry::Data { id, .. }) = m.entries.iter().find(|e| matches!(e, Entry::Data { .. }))
    else {
        unreachable!()
    };
    machine_a.backend().delete(&ObjectName::block(id)).unwrap();
    assert!(
        matches!(machine_b.get_bytes(&put2.manifest), Err(StoreError::Missing { block }) if block == *id)
    );
    let report = machine_b.verify().unwrap();
    assert_eq!(
        report.problems,
        vec![Problem::MissingBlock {
            block: *id,
            manifest: put2.manifest
        }]
    );
    // Repeating the put repairs it.
    machine_b.put_bytes(&image2, b"runtime v1 + state").unwrap();
    assert!(machine_b.verify().unwrap().is_clean());
}
