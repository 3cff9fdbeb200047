//! The HTTP gateway example (`examples/gateway.rs`, compiled in here as a
//! module) on real KVM, over real TCP with a plain HTTP/1.1 client: bad
//! input, hostile guests, overload and shutdown.

mod common;

#[path = "../examples/gateway.rs"]
#[allow(dead_code, reason = "main and the argument parser are the binary's")]
mod gateway;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gateway::{Gateway, Route, Settings};

/// One gateway at a time: the tests count process-wide memory and file
/// descriptors, and the machine has few cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn settings() -> Settings {
    Settings {
        workers: 2,
        signals: false,
        ..Settings::default()
    }
}

fn start(settings: Settings) -> Gateway {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Gateway::start(settings, listener).unwrap()
}

/// Sends `raw` on a new connection and reads the whole answer.
fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(raw).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    answer
}

/// An HTTP/1.1 request on its own connection: (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    parse(&exchange(addr, &raw))
}

fn post(addr: SocketAddr, function: &str, body: &[u8]) -> (u16, Vec<u8>) {
    http(addr, "POST", &format!("/fn/{function}"), body)
}

/// Status and body of a `Connection: close` response.
fn parse(answer: &[u8]) -> (u16, Vec<u8>) {
    let text = String::from_utf8_lossy(answer);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    (status, answer[split + 4..].to_vec())
}

/// The value of an unlabelled metric in a `/metrics` answer.
fn metric(addr: SocketAddr, name: &str) -> Option<i64> {
    let (status, body) = http(addr, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    String::from_utf8(body)
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Runs `clients` threads at once, each calling `request(client, i)` for
/// `i` in `0..per_client`, and returns every answer, client by client.
fn concurrently<T: Send>(
    clients: u32,
    per_client: u32,
    request: impl Fn(u32, u32) -> T + Sync,
) -> Vec<T> {
    let request = &request;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|client| {
                s.spawn(move || {
                    (0..per_client)
                        .map(|i| request(client, i))
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

fn json_kind(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let start = text.find("\"error\":\"").expect("a JSON error body") + 9;
    text[start..].split('"').next().unwrap().to_string()
}

/// Resident memory of this process in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .expect("VmRSS")
}

/// Open file descriptors of this process: all, and those of KVM.
fn fds() -> (usize, usize) {
    let mut all = 0;
    let mut kvm = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        all += 1;
        if let Ok(target) = std::fs::read_link(entry.path()) {
            kvm += usize::from(target.to_string_lossy().contains("kvm"));
        }
    }
    (all, kvm)
}

#[test]
fn malformed_http_unknown_functions_and_large_bodies_get_4xx() {
    require_kvm!();
    let _serial = serial();
    let gateway = start(settings());
    let addr = gateway.addr();

    // Not HTTP at all, and a request line with no version.
    for garbage in [
        &b"\x16\x03\x01\x00\xa5garbage\r\n\r\n"[..],
        b"POST /fn/echo\r\n\r\n",
    ] {
        let answer = exchange(addr, garbage);
        assert!(
            answer.starts_with(b"HTTP/1.1 400"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    let (status, body) = post(addr, "no_such_function", b"x");
    assert_eq!(
        (status, json_kind(&body).as_str()),
        (404, "unknown_function")
    );
    // Only POST calls functions.
    assert_eq!(http(addr, "GET", "/fn/echo", b"").0, 405);
    assert_eq!(http(addr, "GET", "/nowhere", b"").0, 404);
    // One byte over the limit is refused before any VM sees it.
    let limit = settings().max_body;
    assert_eq!(post(addr, "echo", &vec![7; limit + 1]).0, 413);
    let (status, body) = post(addr, "echo", &vec![7; limit]);
    assert_eq!((status, body.len()), (200, limit));
    assert_eq!(
        post(addr, "echo", b"still serving"),
        (200, b"still serving".to_vec())
    );
}

#[test]
fn a_looping_guest_gets_504_within_twice_the_deadline_while_others_flow() {
    require_kvm!();
    let _serial = serial();
    let deadline = Duration::from_secs(1);
    let gateway = start(Settings {
        deadline,
        ..settings()
    });
    let addr = gateway.addr();
    let looping = std::thread::spawn(move || {
        let start = Instant::now();
        let (status, body) = post(addr, "infinite_loop", b"");
        (status, json_kind(&body), start.elapsed(), Instant::now())
    });
    // Meanwhile the other worker keeps answering.
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..20u32 {
        let input = i.to_le_bytes();
        assert_eq!(post(addr, "echo", &input), (200, input.to_vec()));
    }
    let echoes_done = Instant::now();
    let (status, kind, elapsed, loop_done) = looping.join().unwrap();
    assert_eq!((status, kind.as_str()), (504, "timeout"));
    assert!(elapsed < 2 * deadline, "504 after {elapsed:?}");
    assert!(echoes_done < loop_done, "the echoes waited for the loop");
    // The stopped VM was reset: every route still works.
    for _ in 0..4 {
        assert_eq!(
            post(addr, "counter", b""),
            (200, 1u64.to_le_bytes().to_vec())
        );
    }
}

#[test]
fn a_guest_panicking_on_every_tenth_request_fails_only_those() {
    require_kvm!();
    let _serial = serial();
    let gateway = start(settings());
    let addr = gateway.addr();
    let results = concurrently(4, 25, |client, i| {
        let n = client * 25 + i;
        let function = if n % 10 == 9 { "panic" } else { "echo" };
        let (status, body) = post(addr, function, &n.to_le_bytes());
        (n, status, body)
    });
    assert_eq!(results.len(), 100);
    for (n, status, body) in results {
        if n % 10 == 9 {
            assert_eq!((status, json_kind(&body).as_str()), (500, "guest_crash"));
            assert!(String::from_utf8_lossy(&body).contains("boom 42"));
        } else {
            assert_eq!(
                (status, body),
                (200, n.to_le_bytes().to_vec()),
                "request {n}"
            );
        }
    }
}

#[test]
fn a_flood_beyond_capacity_gets_503s_and_memory_stays_bounded() {
    require_kvm!();
    let _serial = serial();
    let queue = 4;
    let gateway = start(Settings {
        workers: 1,
        queue,
        deadline: Duration::from_secs(1),
        ..settings()
    });
    let addr = gateway.addr();
    let body = vec![0x5a; settings().max_body - 1];
    let flood = |rounds: usize| -> Vec<u16> {
        let mut statuses = Vec::new();
        for _ in 0..rounds {
            // The only worker is busy for a whole deadline...
            let busy = std::thread::spawn(move || post(addr, "infinite_loop", b"").0);
            std::thread::sleep(Duration::from_millis(100));
            // ...while 160 large requests arrive at once.
            let round = concurrently(40, 4, |_, _| post(addr, "echo", &body).0);
            assert_eq!(busy.join().unwrap(), 504);
            statuses.extend(round);
        }
        statuses
    };
    flood(1);
    let before = rss_kib();
    let statuses = flood(3);
    let after = rss_kib();
    assert!(
        statuses.iter().all(|s| [200, 503, 504].contains(s)),
        "{statuses:?}"
    );
    let refused = statuses.iter().filter(|&&s| s == 503).count();
    // While the worker is busy at most `queue` requests wait; the others
    // are refused at once (some rounds end after the worker is free again).
    assert!(
        refused >= statuses.len() / 2,
        "{refused} of {}",
        statuses.len()
    );
    eprintln!(
        "RSS {before} KiB before 3 floods, {after} KiB after; {refused} of {} refused",
        statuses.len()
    );
    // 480 requests of 64 KiB (30 MiB) passed through; what stays is bounded.
    assert!(
        after.saturating_sub(before) < 16 << 10,
        "RSS grew from {before} KiB to {after} KiB"
    );
    assert_eq!(post(addr, "echo", b"ok"), (200, b"ok".to_vec()));
}

#[test]
fn sigterm_during_load_finishes_requests_in_flight_and_frees_every_vm() {
    require_kvm!();
    let _serial = serial();
    let (fds_before, kvm_before) = fds();
    let testguest = common::guest_path("testguest");
    let mut routes = settings().routes;
    routes.push(Route::parse(&format!("alloc={}:alloc_mib", testguest.display())).unwrap());
    let gateway = start(Settings {
        routes,
        workers: 1,
        deadline: Duration::from_secs(20),
        signals: true,
        ..settings()
    });
    let addr = gateway.addr();
    assert!(
        fds().1 > kvm_before,
        "the gateway's VMs hold KVM descriptors"
    );
    const REQUESTS: i64 = 8;
    let clients: Vec<_> = (0..REQUESTS)
        .map(|_| std::thread::spawn(move || post(addr, "alloc", &[32])))
        .collect();
    // Signal once every request is in the server, at least one still in
    // flight (one worker serves them one by one, each writing 32 MiB of
    // guest memory, so usually all of them are).
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let in_flight = metric(addr, "gateway_in_flight").unwrap_or(0);
        let done = metric(
            addr,
            "gateway_requests_total{function=\"alloc\",status=\"200\"}",
        )
        .unwrap_or(0);
        if in_flight >= 1 && in_flight + done == REQUESTS {
            break;
        }
        assert!(Instant::now() < until, "requests never all in the server");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: sends SIGTERM to this process, whose handler the gateway
    // installed (Settings::signals) before `start` returned.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
    gateway.join().unwrap();
    for client in clients {
        assert_eq!(client.join().unwrap(), (200, Vec::new()));
    }
    // Stopped: nothing listens, and every VM is gone.
    assert!(TcpStream::connect(addr).is_err());
    let (fds_after, kvm_after) = fds();
    assert_eq!(kvm_after, kvm_before, "KVM descriptors leaked");
    // tokio keeps one process-wide pipe for signal delivery once a signal
    // handler was installed.
    assert!(
        fds_after <= fds_before + 2,
        "{fds_before} descriptors before, {fds_after} after"
    );
}
