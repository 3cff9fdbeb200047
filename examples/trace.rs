//! Guest profiles: carry what one short-lived VM compiled into the next.
//!
//! The regex guest (guests/regexguest) compiles a set of log-scanning
//! patterns into one DFA at init — real work, tens of milliseconds — and
//! exports the serialized DFA as its profile. This example keeps profiles
//! in a persistent `TraceCache` directory, boots the guest for one tenant
//! twice (the second boot imports the DFA instead of compiling it), shows
//! that another tenant starts cold, and compares both with restoring the
//! ready VM from a snapshot.
//!
//! ```text
//! cargo run --release --example trace
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use snapvm::trace::{ProfileScope, TraceCache};
use snapvm::{GuestProgram, VmConfig, VmInstance};

/// Prints warnings (a rejected profile, for instance).
struct PrintLogger;

impl log::Log for PrintLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            println!(
                "  [{} {}] {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

const LOG: &[u8] = b"2024-05-01 10:00:00 GET /index.html 10.0.0.1 user=alice\n\
2024-05-01 10:00:01 POST /login token=abc123 ERROR refused\n\
HTTP/1.1\" 503 from 192.168.1.20 panic\n";

/// Boots a VM, scans `LOG` once, and reports how init got its DFA.
fn first_call(config: &VmConfig) -> Result<(Duration, String, Vec<u8>), snapvm::Error> {
    let start = Instant::now();
    let mut vm = VmInstance::new(config)?;
    let counts = vm.invoke("scan", LOG)?;
    let took = start.elapsed();
    let source = String::from_utf8_lossy(&vm.invoke("source", b"")?).into_owned();
    Ok((took, source, counts))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    log::set_logger(&PrintLogger).expect("the first logger of this process");
    log::set_max_level(log::LevelFilter::Warn);
    if let Err(e) = snapvm::vm::check_kvm() {
        eprintln!("snapvm needs KVM: {e}");
        std::process::exit(2);
    }

    let path = std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join("regexguest");
    let program = GuestProgram::from_file(&path)?;
    let dir = std::env::temp_dir().join(format!("snapvm-trace-example-{}", std::process::id()));
    // A persistent cache: one checksummed file per entry, bounded to 64 MiB.
    let cache = Arc::new(TraceCache::open(&dir, 64 << 20)?);
    let for_tenant = |tenant: &str| {
        VmConfig::new(program.clone()).profiles(ProfileScope::new(Arc::clone(&cache), tenant))
    };

    let (cold, source, counts) = first_call(&for_tenant("acme"))?;
    println!("acme, first environment:  {cold:>10.2?} ({source})");
    let (warm, source, again) = first_call(&for_tenant("acme"))?;
    println!("acme, second environment: {warm:>10.2?} ({source})");
    assert_eq!(
        counts, again,
        "the imported DFA finds what the compiled one found"
    );
    println!(
        "  profile speedup: {:.1}x",
        cold.as_secs_f64() / warm.as_secs_f64()
    );
    let (other, source, _) = first_call(&for_tenant("globex"))?;
    println!("globex, first environment: {other:>9.2?} ({source}: no profile crosses tenants)");

    // Reopening the directory (a new process would do the same) finds them.
    drop(cache);
    let reopened = TraceCache::open(&dir, 64 << 20)?;
    println!(
        "cache directory holds {} profiles ({} bytes)",
        reopened.len(),
        reopened.used_bytes()
    );

    // What a ready-state snapshot saves: no init at all.
    let config = VmConfig::new(program);
    let ready = VmInstance::new(&config)?.snapshot()?;
    let start = Instant::now();
    let mut vm = VmInstance::restore(&config, &ready)?;
    vm.invoke("scan", LOG)?;
    println!("restored from a snapshot:  {:>10.2?}", start.elapsed());

    let counts: Vec<u32> = counts
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let patterns = String::from_utf8(vm.invoke("patterns", b"")?)?;
    for (pattern, count) in patterns.lines().zip(counts) {
        println!("  {count} line(s) match {pattern}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
