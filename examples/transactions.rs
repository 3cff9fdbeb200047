//! Transactions retried by rewinding the VM.
//!
//! A host-side key-value store holds a counter. Several VMs — two worker
//! threads, each with its own VMs, so both cores contend — run the
//! `txguest` function `increment`: inside a transaction it reads the
//! counter (`kv_get`), writes it back plus one with compare-and-swap
//! (`kv_cas`, an *immediate* host function that answers `conflict` when
//! another VM wrote first) and sends a notification (`notify`, a
//! *deferred* host function). A conflict aborts the transaction; the
//! runner rewinds the VM to `tx::begin` and runs it again. The guest has no
//! retry loop.
//!
//! At the end the counter equals the number of successful requests
//! exactly, and every success delivered exactly one notification; failed
//! attempts delivered none.
//!
//! ```text
//! cargo run --release --example transactions -- [--requests N] [--vms-per-thread N]
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snapvm::policy::{RetryPolicy, Transaction, TxError};
use snapvm::{GuestProgram, VmConfig, VmInstance};

/// The host's key-value store: values with compare-and-swap.
#[derive(Default)]
struct Store {
    values: Mutex<HashMap<String, u64>>,
}

impl Store {
    fn get(&self, key: &str) -> u64 {
        self.values
            .lock()
            .expect("store lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Sets `key` to `new` if it holds `old`.
    fn compare_and_swap(&self, key: &str, old: u64, new: u64) -> bool {
        let mut values = self.values.lock().expect("store lock");
        let value = values.entry(key.to_string()).or_insert(0);
        if *value != old {
            return false;
        }
        *value = new;
        true
    }
}

fn word(bytes: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?,
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut requests: u64 = 400;
    let mut vms_per_thread = 3;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--requests" => requests = value.parse()?,
            "--vms-per-thread" => vms_per_thread = value.parse::<usize>()?.max(1),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    snapvm::vm::check_kvm()?;

    let store = Arc::new(Store::default());
    let notifications = Arc::new(Mutex::new(Vec::new()));
    let attempts_run = Arc::new(AtomicU64::new(0));
    let (s1, s2, n, a) = (
        Arc::clone(&store),
        Arc::clone(&store),
        Arc::clone(&notifications),
        Arc::clone(&attempts_run),
    );
    let path = std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join("txguest");
    let config = VmConfig::new(GuestProgram::from_file(path)?)
        .dirty_tracking(true)
        .host_function("kv_get", move |key| {
            a.fetch_add(1, Ordering::Relaxed);
            // Widen the window between read and write, so VMs conflict.
            std::thread::sleep(Duration::from_micros(200));
            Ok(s1.get(std::str::from_utf8(key)?).to_le_bytes().to_vec())
        })
        .host_function("kv_cas", move |input| {
            let (old, new) = (word(input, 0), word(input, 1));
            let (Some(old), Some(new)) = (old, new) else {
                return Err("kv_cas takes two words".into());
            };
            let swapped = s2.compare_and_swap("counter", old, new);
            Ok(if swapped {
                b"ok".to_vec()
            } else {
                b"conflict".to_vec()
            })
        })
        .deferred_host_function("notify", move |_caller, value| {
            n.lock()
                .expect("notifications")
                .push(word(value, 0).unwrap_or(0));
            Ok(Vec::new())
        });
    let ready = VmInstance::new(&config)?.snapshot()?;
    let tx = Transaction::new().retry(
        RetryPolicy::default()
            .max_attempts(8)
            .backoff(Duration::from_micros(100), Duration::from_millis(5)),
    );

    let start = Instant::now();
    let threads = 2;
    let results: Vec<(u64, u64, u64)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (config, ready, tx) = (&config, &ready, &tx);
                scope.spawn(move || {
                    let mut vms: Vec<VmInstance> = (0..vms_per_thread)
                        .map(|_| VmInstance::restore(config, ready).expect("restore"))
                        .collect();
                    let (mut ok, mut failed, mut retries) = (0, 0, 0);
                    for i in (t..requests as usize).step_by(threads) {
                        let vm = &mut vms[i % vms_per_thread];
                        match tx.invoke(vm, ready, "increment", b"") {
                            Ok(done) => {
                                ok += 1;
                                retries += done.attempts.len() as u64 - 1;
                            }
                            Err(TxError::RetriesExhausted { attempts }) => {
                                failed += 1;
                                retries += attempts.len() as u64 - 1;
                            }
                            Err(e) => panic!("request {i}: {e}"),
                        }
                        // Each request starts from the ready state.
                        vm.restore_in_place(ready).expect("reset");
                    }
                    (ok, failed, retries)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let elapsed = start.elapsed();
    let ok: u64 = results.iter().map(|r| r.0).sum();
    let failed: u64 = results.iter().map(|r| r.1).sum();
    let retries: u64 = results.iter().map(|r| r.2).sum();
    let counter = store.get("counter");
    let mut notes = notifications.lock().expect("notifications").clone();
    notes.sort_unstable();

    println!(
        "{requests} requests on {} VMs in {threads} threads, {:.2} s",
        threads * vms_per_thread,
        elapsed.as_secs_f64()
    );
    println!("successful:         {ok}");
    println!("retries exhausted:  {failed}");
    println!("retries (rewinds):  {retries}");
    println!(
        "attempts (kv_get):  {}",
        attempts_run.load(Ordering::Relaxed)
    );
    println!("counter:            {counter}");
    println!("notifications:      {}", notes.len());
    assert_eq!(counter, ok, "the counter equals the successful requests");
    // One notification per success, carrying each value 1..=counter once.
    assert_eq!(notes, (1..=counter).collect::<Vec<_>>());
    println!("counter == successes, one notification per success: ok");
    Ok(())
}
