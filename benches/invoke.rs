//! Criterion micro-benchmarks of the invoke path, for catching regressions:
//! an empty call, a 4 KiB echo and a 1 MiB echo into a caller buffer, each
//! on a warm, ready quickstart VM (throughput counts the input bytes). The headline figures with their in-run
//! baselines come from `cargo bench --bench report`.

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use snapvm::{GuestProgram, VmConfig, VmInstance};

fn quickstart() -> Option<VmInstance> {
    if let Err(e) = snapvm::vm::check_kvm() {
        if std::env::var_os("SNAPVM_REQUIRE_KVM").is_some() {
            panic!("SNAPVM_REQUIRE_KVM is set but KVM is unusable: {e}");
        }
        println!("skipping the invoke benchmarks: {e}");
        return None;
    }
    let path = Path::new(env!("SNAPVM_GUESTS_DIR")).join("quickstart");
    let program = GuestProgram::from_file(&path)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    let config = VmConfig::new(program).host_function("greeting", |_| Ok(b"Hello".to_vec()));
    Some(VmInstance::new(&config).expect("quickstart VM"))
}

fn invoke(c: &mut Criterion) {
    let Some(mut vm) = quickstart() else { return };
    let mut group = c.benchmark_group("invoke");

    group.bench_function("empty", |b| {
        b.iter(|| vm.invoke("empty", b"").expect("invoke empty"));
    });

    let small = vec![0x5A; 4 << 10];
    group.throughput(Throughput::Bytes(small.len() as u64));
    group.bench_function("echo_4kib", |b| {
        b.iter(|| vm.invoke("echo", &small).expect("invoke echo"));
    });

    let large = vec![0x5A; 1 << 20];
    let mut out = vec![0; large.len()];
    group.throughput(Throughput::Bytes(large.len() as u64));
    group.bench_function("echo_into_1mib", |b| {
        b.iter(|| {
            vm.invoke_into("echo", &large, &mut out)
                .expect("invoke echo")
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = invoke
}
criterion_main!(benches);
