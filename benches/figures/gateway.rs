//! Gateway figures: the HTTP gateway of `examples/gateway.rs` (compiled in
//! here) under `wrk`, serving the testguest's `echo` with a reset after
//! every request (`Always`), against the same gateway serving a native
//! `echo` (`--native`: same HTTP stack, queue and worker threads, no VM).
//!
//! - `gateway.native_rps`, `gateway.rps_ratio`: requests per second of
//!   `wrk -t1 -c16 -d{1,3}s -s benches/gateway.lua` (a small POST body);
//!   the ratio is VM ÷ native, target `>= 0.35`. One run each (wrk's own
//!   numbers), so no spread; `benches/gateway.sh` runs it longer.
//! - `gateway.p50_us`, `gateway.p99_us` (VM) and
//!   `gateway.native_p50_us`, `gateway.native_p99_us`: wrk's latency
//!   percentiles of the same runs.
//!
//! Skipped, with a line saying so, when `wrk` is not installed
//! (`apt-get install wrk`, or run `benches/gateway.sh`, which installs it).

#[path = "../../examples/gateway.rs"]
#[allow(dead_code, reason = "main and the argument parser are the binary's")]
mod server;

use std::process::Command;

use super::{Ctx, Figure, Target};

/// What one wrk run measured.
struct Load {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Measures the gateway figures, or none when KVM or wrk is missing.
pub fn measure(ctx: &Ctx) -> Vec<Figure> {
    if snapvm::vm::check_kvm().is_err() {
        return Vec::new();
    }
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("skipped the gateway figures: wrk is not installed (apt-get install wrk)");
        return Vec::new();
    }
    let seconds = if ctx.quick { 1 } else { 3 };
    let (Some(vm), Some(native)) = (load(false, seconds), load(true, seconds)) else {
        return Vec::new();
    };
    let native_rps = Figure::plain("gateway.native_rps", native.rps, "req/s");
    vec![
        native_rps.clone(),
        Figure::plain("gateway.rps_ratio", vm.rps, "req/s")
            .against(&native_rps)
            .target(Target::AtLeast(0.35)),
        Figure::plain("gateway.p50_us", vm.p50_us, "us"),
        Figure::plain("gateway.p99_us", vm.p99_us, "us"),
        Figure::plain("gateway.native_p50_us", native.p50_us, "us"),
        Figure::plain("gateway.native_p99_us", native.p99_us, "us"),
    ]
}

/// Starts the gateway on a free loopback port, runs wrk, stops it.
fn load(native: bool, seconds: u32) -> Option<Load> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("loopback port");
    let settings = server::Settings {
        native,
        signals: false,
        ..server::Settings::default()
    };
    let mut gateway = match server::Gateway::start(settings, listener) {
        Ok(gateway) => gateway,
        Err(e) => {
            println!("skipped the gateway figures: {e}");
            return None;
        }
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/gateway.lua");
    let output = Command::new("wrk")
        .args([
            "-t1",
            "-c16",
            &format!("-d{seconds}s"),
            "--timeout",
            "5s",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://{}/fn/echo", gateway.addr()))
        .output();
    gateway.stop();
    let _ = gateway.join();
    let text = String::from_utf8_lossy(&output.ok()?.stdout).into_owned();
    let line = text.lines().find_map(|l| l.strip_prefix("RESULT "))?;
    let field = |name: &str| -> Option<f64> {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    if field("errors")? + field("non2xx")? > 0.0 {
        println!("gateway figures: wrk saw failed requests: {line}");
    }
    Some(Load {
        rps: field("requests")? / field("duration_us")? * 1e6,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
    })
}
