//! The snapvm quick start: boot a micro-VM running the `quickstart` guest
//! (guests/quickstart), call its functions, capture its ready state, restore
//! copies of it to serve requests, and print what each step costs.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::time::{Duration, Instant};

use snapvm::snapshot::ShellPool;
use snapvm::{GuestProgram, Snapshot, VmConfig, VmInstance};

/// Prints guest log messages (they arrive through the `log` facade).
struct PrintLogger;

impl log::Log for PrintLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
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

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    log::set_logger(&PrintLogger).expect("the first logger of this process");
    log::set_max_level(log::LevelFilter::Info);

    if let Err(e) = snapvm::vm::check_kvm() {
        eprintln!("snapvm needs KVM: {e}");
        std::process::exit(2);
    }

    // 1. A guest program: a static ELF built from guests/quickstart.
    let path = std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join("quickstart");
    let program = GuestProgram::from_file(&path)?;
    let config = VmConfig::new(program)
        .memory_size(64 << 20)
        .timeout(Some(Duration::from_secs(1)))
        .host_function("greeting", |_input| Ok(b"Hello".to_vec()));

    // 2. Boot: map memory, load the ELF, enter long mode at CPL3, run init.
    let start = Instant::now();
    let mut vm = VmInstance::new(&config)?;
    println!("booted a 64 MiB VM to ready in {:?}", start.elapsed());
    let mut functions: Vec<_> = vm.functions().collect();
    functions.sort();
    println!("guest exports: {}", functions.join(", "));

    // 3. Call guest functions: bytes in, bytes out.
    let out = vm.invoke("reverse", b"snapvm")?;
    println!("reverse(\"snapvm\") = {:?}", String::from_utf8_lossy(&out));
    let out = vm.invoke("greet", b"world")?;
    println!("greet(\"world\") = {:?}", String::from_utf8_lossy(&out));

    // 4. What a call costs: one VM exit per invoke.
    let samples: Vec<Duration> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            vm.invoke("empty", b"").expect("empty call");
            t.elapsed()
        })
        .collect();
    println!(
        "empty invoke: median {:?} over {} calls",
        median(samples),
        2000
    );

    let input = vec![0x5Au8; 1 << 20];
    let mut output = vec![0u8; 1 << 20];
    let samples: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            vm.invoke_into("echo", &input, &mut output).expect("echo");
            t.elapsed()
        })
        .collect();
    println!("1 MiB in + 1 MiB out: median {:?}", median(samples));

    // 5. Guest failures are typed errors, never host crashes.
    match vm.invoke("no_such_function", b"") {
        Err(e) => println!("unknown function -> {e}"),
        Ok(_) => unreachable!("the guest exports no such function"),
    }
    println!(
        "VM state: {:?}, {} calls served",
        vm.state(),
        vm.stats().invocations
    );

    // 6. Capture the ready state: a fresh VM right after init.
    let mut template = VmInstance::new(&config)?;
    let start = Instant::now();
    let ready = template.snapshot()?;
    println!(
        "\nsnapshot of the ready VM in {:?} ({} KiB of non-zero pages stored)",
        start.elapsed(),
        ready.stored_bytes() / 1024
    );
    let path = std::env::temp_dir().join(format!("snapvm-quickstart-{}.snap", std::process::id()));
    ready.save(&path)?;
    let start = Instant::now();
    let ready = Snapshot::load(&path)?;
    println!(
        "saved to {} and loaded back in {:?}",
        path.display(),
        start.elapsed()
    );

    // 7. Serve requests from restored copies: each is a new VM with its own
    //    entropy and generation, restored instead of booted.
    let mut restore_times = Vec::new();
    for i in 0..8 {
        let start = Instant::now();
        let mut copy = VmInstance::restore(&config, &ready)?;
        let out = copy.invoke("reverse", format!("request {i}").as_bytes())?;
        restore_times.push(start.elapsed());
        if i < 3 {
            println!(
                "  copy {i}: generation {} answered {:?}",
                copy.generation(),
                String::from_utf8_lossy(&out)
            );
        }
    }
    println!(
        "restore + first request: median {:?} (8 copies)",
        median(restore_times)
    );

    // 8. A pool of pre-created VM shells takes VM creation off the request path.
    let pool = ShellPool::for_snapshot(&config, &ready, 4)?;
    let mut pooled_times = Vec::new();
    for _ in 0..4 {
        let start = Instant::now();
        let mut copy = pool.restore(&ready)?;
        copy.invoke("empty", b"")?;
        pooled_times.push(start.elapsed());
        // Tearing a VM down is slower than restoring one: the pool does it.
        pool.recycle(copy);
    }
    println!(
        "pooled restore + first request: median {:?}",
        median(pooled_times)
    );
    std::fs::remove_file(&path)?;
    Ok(())
}
