//! A command-line front end to `ConvergentStore`.
//!
//! ```text
//! cargo run --example store -- --dir /tmp/s put image.bin --meta "runtime v1"
//! cargo run --example store -- --dir /tmp/s ls
//! cargo run --example store -- --dir /tmp/s get <manifest id> out.bin
//! cargo run --example store -- --dir /tmp/s rm <manifest id>
//! cargo run --example store -- --dir /tmp/s verify
//! cargo run --example store -- --dir /tmp/s gc
//! cargo run --example store -- blocksizes a.img b.img     # dedup vs metadata table
//! ```
//!
//! The owner's manifest key lives in `<dir>/../<dir name>.key` unless
//! `--key FILE` says otherwise; it is created (mode 0600) on first use. With
//! `--features s3`, `--s3` uses a bucket instead of `--dir`, configured by
//! `SNAPVM_S3_ENDPOINT`, `SNAPVM_S3_BUCKET`, `SNAPVM_S3_REGION`,
//! `SNAPVM_S3_ACCESS_KEY_ID`, `SNAPVM_S3_SECRET_ACCESS_KEY` and optionally
//! `SNAPVM_S3_PREFIX` (and `--key` is required).

use std::error::Error;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use snapvm::store::sizing::{block_size_table, Table};
use snapvm::store::{
    Backend, ConvergentStore, FsBackend, ManifestId, ManifestKey, Problem, StoreConfig, SweepWait,
};

const USAGE: &str = "usage: store (--dir DIR | --s3) [--key FILE] [--block-size BYTES] COMMAND
commands:
  put FILE [--meta TEXT]   store FILE, print its manifest id
  get ID OUT               write data set ID to OUT (- for stdout)
  ls                       list your data sets
  rm ID                    delete one of your data sets (only its owner's key can; gc frees its blocks)
  verify                   read every block and manifest, report problems
  gc                       remove blocks no manifest references
  blocksizes FILE...       dedup vs metadata overhead per block size (stores nothing)";

struct Args {
    dir: Option<PathBuf>,
    s3: bool,
    key: Option<PathBuf>,
    block_size: Option<usize>,
    meta: Vec<u8>,
    rest: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        dir: None,
        s3: false,
        key: None,
        block_size: None,
        meta: Vec::new(),
        rest: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--dir" => a.dir = Some(value("--dir")?.into()),
            "--key" => a.key = Some(value("--key")?.into()),
            "--meta" => a.meta = value("--meta")?.into_bytes(),
            "--block-size" => {
                a.block_size = Some(
                    value("--block-size")?
                        .parse()
                        .map_err(|e| format!("--block-size: {e}"))?,
                )
            }
            "--s3" => a.s3 = true,
            "-h" | "--help" => return Err(String::new()),
            _ => a.rest.push(arg),
        }
    }
    Ok(a)
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn count_bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} objects")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn load_or_create_key(path: &Path) -> Result<ManifestKey, Box<dyn Error>> {
    match fs::read(path) {
        Ok(bytes) => {
            let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
                format!(
                    "{}: a manifest key file holds exactly 32 bytes",
                    path.display()
                )
            })?;
            Ok(ManifestKey::from_bytes(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = ManifestKey::generate()?;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(key.as_bytes())?;
            f.sync_all()?;
            eprintln!("created manifest key {}", path.display());
            Ok(key)
        }
        Err(e) => Err(format!("{}: {e}", path.display()).into()),
    }
}

fn backend(args: &Args) -> Result<(Box<dyn Backend>, PathBuf), Box<dyn Error>> {
    if args.s3 {
        #[cfg(feature = "s3")]
        {
            let var = |n: &str| std::env::var(n).map_err(|_| format!("{n} is not set"));
            let config = snapvm::store::S3Config {
                endpoint: var("SNAPVM_S3_ENDPOINT")?,
                bucket: var("SNAPVM_S3_BUCKET")?,
                region: var("SNAPVM_S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
                prefix: var("SNAPVM_S3_PREFIX").unwrap_or_default(),
                access_key_id: var("SNAPVM_S3_ACCESS_KEY_ID")?,
                secret_access_key: var("SNAPVM_S3_SECRET_ACCESS_KEY")?,
                allow_http: true,
                retry_timeout: snapvm::store::S3Config::DEFAULT_RETRY_TIMEOUT,
            };
            let key = args.key.clone().ok_or("--s3 needs --key FILE")?;
            return Ok((Box::new(snapvm::store::S3Backend::new(&config)?), key));
        }
        #[cfg(not(feature = "s3"))]
        return Err("--s3 needs the example built with --features s3".into());
    }
    let dir = args.dir.clone().ok_or("give --dir DIR (or --s3)")?;
    let key = args.key.clone().unwrap_or_else(|| {
        let name = dir
            .file_name()
            .map_or("store".into(), |n| n.to_string_lossy().into_owned());
        dir.with_file_name(format!("{name}.key"))
    });
    Ok((Box::new(FsBackend::open(&dir)?), key))
}

fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let (cmd, operands) = args.rest.split_first().ok_or("no command")?;
    if cmd == "blocksizes" {
        let images: Vec<Vec<u8>> = operands.iter().map(fs::read).collect::<Result<_, _>>()?;
        let refs: Vec<&[u8]> = images.iter().map(|i| &i[..]).collect();
        let sizes = [4096, 16384, 65536, 262144, 1 << 20];
        print!("{}", Table(&block_size_table(&refs, &sizes)));
        return Ok(ExitCode::SUCCESS);
    }
    let (backend, key_path) = backend(&args)?;
    let key = load_or_create_key(&key_path)?;
    let mut config = StoreConfig::default();
    if let Some(bs) = args.block_size {
        config.block_size = bs;
    }
    // A put waiting for another process's gc shows it on the put's bar.
    let put_bar = Arc::new(Mutex::new(None::<ProgressBar>));
    config.on_wait = Some({
        let put_bar = put_bar.clone();
        Arc::new(move |w: &SweepWait| {
            if let Some(bar) = &*put_bar.lock().unwrap_or_else(|p| p.into_inner()) {
                if w.over {
                    bar.set_message("put");
                } else {
                    bar.set_message(format!(
                        "put: waiting {:.0?}/{:.0?} for gc by {}",
                        w.waited, w.limit, w.holder
                    ));
                }
            }
        })
    });
    let store = ConvergentStore::new(&config, backend, key)?;
    match (cmd.as_str(), operands) {
        ("put", [file]) => {
            let f = File::open(file)?;
            let bar = bar(f.metadata()?.len(), "put");
            *put_bar.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar.clone());
            let report = store.put(bar.wrap_read(f), &args.meta)?;
            bar.finish_and_clear();
            eprintln!(
                "{} bytes in {} blocks ({} zero), {} new blocks, {} bytes written",
                report.len, report.blocks, report.zero_blocks, report.new_blocks, report.new_bytes
            );
            println!("{}", report.manifest);
        }
        ("get", [id, out]) => {
            let id: ManifestId = id.parse()?;
            let len = store.manifest(&id)?.total_len;
            let bar = bar(len, "get");
            if out == "-" {
                store.get(&id, bar.wrap_write(std::io::stdout().lock()))?;
            } else {
                store.get(&id, bar.wrap_write(BufWriter::new(File::create(out)?)))?;
            }
            bar.finish_and_clear();
        }
        ("ls", []) => {
            for m in store.list()? {
                println!(
                    "{}  {:>14}  {:>6} blocks  {}",
                    m.id,
                    m.len,
                    m.blocks,
                    String::from_utf8_lossy(&m.metadata)
                );
            }
        }
        ("rm", [id]) => store.delete(&id.parse()?)?,
        ("verify", []) => {
            let bar = count_bar("verify");
            let report = store.verify_with_progress(&mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            println!(
                "{} manifests, {} blocks ({} bytes) checked, {} unreferenced",
                report.manifests, report.blocks, report.block_bytes, report.unreferenced_blocks
            );
            for p in &report.problems {
                match p {
                    Problem::CorruptBlock { block } => println!("corrupt block {block}"),
                    Problem::MissingBlock { block, manifest } => {
                        println!("missing block {block} (referenced by {manifest})")
                    }
                    Problem::CorruptManifest {
                        manifest,
                        error: Some(e),
                    } => {
                        println!("corrupt manifest {manifest}: {e}")
                    }
                    Problem::CorruptManifest {
                        manifest,
                        error: None,
                    } => {
                        println!("corrupt manifest {manifest}: bytes do not hash to its id")
                    }
                    other => println!("{other:?}"),
                }
            }
            if !report.is_clean() {
                return Ok(ExitCode::from(2));
            }
        }
        ("gc", []) => {
            let bar = count_bar("gc");
            let report = store.gc_with_progress(&mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            if let Some(n) = report.deferred {
                println!("deferred: {n} put(s) in flight; try again later");
            } else {
                println!(
                    "{} manifests, {} blocks, {} deleted, {} expired markers, {} leftovers removed",
                    report.manifests,
                    report.blocks,
                    report.deleted_blocks,
                    report.expired_markers,
                    report.incomplete_removed
                );
            }
        }
        _ => return Err(format!("bad command or arguments: {cmd} {operands:?}").into()),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) if !a.rest.is_empty() => a,
        Ok(_) | Err(_) => {
            eprintln!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
