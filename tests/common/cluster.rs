//! A three-node Garage cluster for tests and benchmarks, run by
//! `.ci/garage-cluster.sh` in a temporary directory and stopped on drop
//! (also when a test panics). Only the nodes the script started are
//! stopped, by their recorded pids.
#![allow(
    dead_code,
    reason = "the tests and the benchmark report use different parts"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snapvm::store::{Backend, Namespace, S3Backend, S3Config};

/// How long any wait for the cluster may take.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The Garage binary: `$SNAPVM_GARAGE`, `garage` on PATH, or
/// `~/.cargo/bin/garage`.
pub fn garage_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SNAPVM_GARAGE") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("garage"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME").or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into_os_string())
    }) {
        candidates.push(PathBuf::from(home).join("bin/garage"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A running cluster.
pub struct Cluster {
    garage: PathBuf,
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/garage-cluster.sh")
}

impl Cluster {
    /// Starts a three-node cluster with `garage` (the script bounds its
    /// own waits).
    pub fn start(garage: PathBuf) -> Result<Cluster, String> {
        Self::start_nodes(garage, 3)
    }

    /// Starts a cluster of `nodes` nodes (1 or 3), replication factor
    /// `nodes`.
    pub fn start_nodes(garage: PathBuf, nodes: usize) -> Result<Cluster, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut cluster = Cluster {
            garage,
            dir,
            env: HashMap::new(),
        };
        cluster.run(&["start", &nodes.to_string()])?;
        cluster.env = parse_env(&cluster.env_file())?;
        Ok(cluster)
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let cluster_dir = self.dir.path().join("cluster");
        let out = Command::new("bash")
            .arg(script())
            .arg(args[0])
            .arg(&cluster_dir)
            .args(&args[1..])
            .env("SNAPVM_GARAGE", &self.garage)
            .env("SNAPVM_GARAGE_TIMEOUT", READY_TIMEOUT.as_secs().to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {}: {e}", script().display()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "garage-cluster.sh {args:?} failed ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The file with the endpoints and credentials (`cluster.env`).
    pub fn env_file(&self) -> PathBuf {
        self.dir.path().join("cluster/cluster.env")
    }

    /// Stops node `n` (1 to 3).
    pub fn stop_node(&self, n: usize) {
        self.run(&["stop-node", &n.to_string()]).unwrap();
    }

    /// Kills nodes `nodes` at once with SIGKILL (a crash, not a shutdown).
    pub fn kill_nodes(&self, nodes: &[usize]) {
        let mut args = vec!["kill-nodes".to_string()];
        args.extend(nodes.iter().map(|n| n.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&args).unwrap();
    }

    /// Node `n`'s directory (its `meta/` and `data/` are Garage's).
    pub fn node_dir(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("cluster/node{n}"))
    }

    /// Starts node `n` again, with its data.
    pub fn start_node(&self, n: usize) {
        self.run(&["start-node", &n.to_string()]).unwrap();
    }

    /// Settings for node `n`'s S3 API, objects under `prefix`.
    pub fn config(&self, n: usize, prefix: &str) -> S3Config {
        config_from(&self.env, n, prefix)
    }

    /// A backend on node `n`, once its S3 API answers (bounded wait).
    pub fn backend(&self, n: usize, prefix: &str) -> S3Backend {
        ready_backend(&self.config(n, prefix))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.run(&["stop"]) {
            eprintln!("{e}");
        }
    }
}

/// Reads `cluster.env` (KEY=VALUE lines).
pub fn parse_env(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Settings for node `n` from a parsed `cluster.env`.
pub fn config_from(env: &HashMap<String, String>, n: usize, prefix: &str) -> S3Config {
    let var = |k: &str| {
        env.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("{k} missing from cluster.env"))
    };
    S3Config {
        endpoint: var(&format!("SNAPVM_S3_ENDPOINT_{n}")),
        region: var("SNAPVM_S3_REGION"),
        bucket: var("SNAPVM_S3_BUCKET"),
        prefix: prefix.into(),
        access_key_id: var("SNAPVM_S3_ACCESS_KEY_ID"),
        secret_access_key: var("SNAPVM_S3_SECRET_ACCESS_KEY"),
        allow_http: true,
        retry_timeout: snapvm::store::S3Config::DEFAULT_RETRY_TIMEOUT,
    }
}

/// A backend, once a listing through it succeeds (bounded wait).
pub fn ready_backend(config: &S3Config) -> S3Backend {
    let backend = S3Backend::new(config).unwrap();
    let start = Instant::now();
    while let Err(e) = backend.list(Namespace::Manifests) {
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "S3 API at {} not ready: {e}",
            config.endpoint
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    backend
}
