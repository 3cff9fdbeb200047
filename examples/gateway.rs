//! An HTTP executor: guest functions served over HTTP/1.1, one VM-isolated
//! call per request. The reference design of `docs/executor.md`.
//!
//! ```text
//! cargo run --release --example gateway -- [--listen 127.0.0.1:8080]
//!     [--fn NAME=GUEST:FUNCTION[@POLICY]]... [--workers N] [--io-threads N]
//!     [--queue N] [--max-body BYTES] [--deadline-ms MS] [--memory-mib MiB] [--native]
//! ```
//!
//! `POST /fn/NAME` calls guest function `FUNCTION` of the guest program at
//! path `GUEST` with the request body as input and answers its output.
//! `POLICY` is the route's restore policy: `always` (the default: every
//! request starts from the ready state), `never`, `every:N` or
//! `garbage:MiB`. Without `--fn`, the test guest's `echo`, `counter`,
//! `panic` and `infinite_loop` are served. `GET /metrics` answers the
//! Prometheus (OpenMetrics) text format. `--native` serves the same
//! routes with host functions instead of VMs (`echo` and `counter` only),
//! the baseline of the benchmark in `benches/gateway.sh`.
//!
//! Threads: the tokio runtime (`--io-threads`) only parses HTTP and queues
//! jobs; `--workers` dedicated threads take jobs from one bounded queue and
//! run them on VMs lent by one [`ReadyPool`] per route. Failures:
//! unknown route 404, body over `--max-body` 413, queue full 503, deadline
//! passed 504 (a guest still running is stopped by its VM timeout), guest
//! crash 500 (the VM is reset before its next request), all with a JSON
//! body `{"error": KIND, "message": TEXT}`. SIGTERM or SIGINT stops
//! accepting, lets requests in flight finish, then joins the workers.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use snapvm::policy::{Always, EveryN, GuestGarbageAbove, Never, RestorePolicy};
use snapvm::{ErrorKind, GuestProgram, ReadyPool, Snapshot, VmConfig, VmInstance};

/// A route's restore policy, as given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Reset after every request.
    Always,
    /// Never reset (except after a crash).
    Never,
    /// Reset every N requests.
    EveryN(u64),
    /// Reset when the guest's garbage exceeds this many MiB.
    GarbageMib(u64),
}

impl Policy {
    /// Parses `always`, `never`, `every:N` or `garbage:MiB`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let number = |n: &str| n.parse::<u64>().map_err(|e| format!("{text}: {e}"));
        match text.split_once(':') {
            None if text == "always" => Ok(Self::Always),
            None if text == "never" => Ok(Self::Never),
            Some(("every", n)) => Ok(Self::EveryN(number(n)?.max(1))),
            Some(("garbage", mib)) => Ok(Self::GarbageMib(number(mib)?)),
            _ => Err(format!(
                "unknown policy {text:?}: always, never, every:N or garbage:MiB"
            )),
        }
    }

    fn build(self) -> Box<dyn RestorePolicy> {
        match self {
            Self::Always => Box::new(Always),
            Self::Never => Box::new(Never),
            Self::EveryN(n) => Box::new(EveryN(n)),
            Self::GarbageMib(mib) => Box::new(GuestGarbageAbove(mib << 20)),
        }
    }
}

/// One `POST /fn/NAME` route.
#[derive(Clone, Debug)]
pub struct Route {
    /// The NAME in the URL.
    pub name: String,
    /// The guest program's file.
    pub guest: PathBuf,
    /// The guest function called.
    pub function: String,
    /// When the VM is reset.
    pub policy: Policy,
}

impl Route {
    /// Parses `NAME=GUEST:FUNCTION[@POLICY]`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let bad = || format!("route {spec:?} is not NAME=GUEST:FUNCTION[@POLICY]");
        let (spec_only, policy) = match spec.rsplit_once('@') {
            Some((rest, policy)) => (rest, Policy::parse(policy)?),
            None => (spec, Policy::Always),
        };
        let (name, target) = spec_only.split_once('=').ok_or_else(bad)?;
        let (guest, function) = target.rsplit_once(':').ok_or_else(bad)?;
        if name.is_empty() || guest.is_empty() || function.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            name: name.into(),
            guest: guest.into(),
            function: function.into(),
            policy,
        })
    }
}

/// How the gateway runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The routes served.
    pub routes: Vec<Route>,
    /// Threads running VMs.
    pub workers: usize,
    /// Threads of the async runtime (HTTP only).
    pub io_threads: usize,
    /// Requests waiting for a worker at most; more get 503.
    pub queue: usize,
    /// Largest request body; larger ones get 413.
    pub max_body: usize,
    /// Longest a request may take, queueing included; then 504.
    pub deadline: Duration,
    /// Guest memory of each VM.
    pub memory_size: u64,
    /// Serve native host functions instead of VMs (benchmark baseline).
    pub native: bool,
    /// Stop on SIGTERM and SIGINT (besides [`Gateway::stop`]).
    pub signals: bool,
}

impl Default for Settings {
    fn default() -> Self {
        let testguest = PathBuf::from(env!("SNAPVM_GUESTS_DIR")).join("testguest");
        let route = |name: &str| Route {
            name: name.into(),
            guest: testguest.clone(),
            function: name.into(),
            policy: Policy::Always,
        };
        Self {
            routes: ["echo", "counter", "panic", "infinite_loop"]
                .into_iter()
                .map(route)
                .collect(),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            io_threads: 1,
            queue: 256,
            max_body: 64 << 10,
            deadline: Duration::from_secs(1),
            memory_size: 64 << 20,
            native: false,
            signals: true,
        }
    }
}

/// A function compiled into the host.
type NativeFn = fn(&[u8]) -> Vec<u8>;

/// What serves a route.
enum Backend {
    Vm(Box<ReadyPool<Box<dyn RestorePolicy>>>),
    Native(NativeFn),
}

/// The native version of the test guest's functions (`--native`).
fn native_function(name: &str) -> Option<NativeFn> {
    match name {
        "echo" => Some(|input| input.to_vec()),
        // Under `Always` the guest's counter answers 1 every time.
        "counter" => Some(|_| 1u64.to_le_bytes().to_vec()),
        _ => None,
    }
}

struct Function {
    route: Route,
    backend: Backend,
}

/// A request waiting for a worker.
struct Job {
    function: usize,
    body: Bytes,
    deadline: Instant,
    reply: tokio::sync::oneshot::Sender<Reply>,
}

/// A worker's answer.
enum Reply {
    Output(Vec<u8>),
    Failed {
        status: StatusCode,
        kind: &'static str,
        message: String,
    },
}

/// The bounded queue between the HTTP handlers and the workers.
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`, or gives it back if the queue is full or closed.
    fn push(&self, job: Job) -> Result<(), Job> {
        let mut state = self.lock();
        if state.closed || state.jobs.len() >= self.capacity {
            return Err(job);
        }
        state.jobs.push_back(job);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job; `None` once the queue is closed and empty.
    fn pop(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    fn len(&self) -> usize {
        self.lock().jobs.len()
    }
}

type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    // 25 µs .. ~3.3 s.
    Histogram::new(exponential_buckets(25e-6, 2.0, 18))
}

struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    resets: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    pool_idle: Family<Labels, Gauge<i64, AtomicI64>>,
    pool_vms_created: Family<Labels, Gauge<i64, AtomicI64>>,
    pool_shells: Family<Labels, Gauge<i64, AtomicI64>>,
    queue_depth: Gauge<i64, AtomicI64>,
    in_flight: Gauge<i64, AtomicI64>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("gateway");
        let requests = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let resets = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let pool_idle = Family::default();
        let pool_vms_created = Family::default();
        let pool_shells = Family::default();
        let queue_depth = Gauge::default();
        let in_flight = Gauge::default();
        registry.register(
            "requests",
            "Requests by function and status code",
            requests.clone(),
        );
        registry.register(
            "errors",
            "Failed requests by function and kind",
            errors.clone(),
        );
        registry.register("resets", "VM resets to the ready state", resets.clone());
        registry.register(
            "request_duration_seconds",
            "Time from request to response",
            latency.clone(),
        );
        registry.register("pool_idle_vms", "Ready VMs waiting", pool_idle.clone());
        registry.register(
            "pool_created_vms",
            "VMs restored from the snapshot",
            pool_vms_created.clone(),
        );
        registry.register(
            "pool_warm_shells",
            "Warm shells for new VMs",
            pool_shells.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a worker",
            queue_depth.clone(),
        );
        registry.register(
            "in_flight",
            "Function requests being served",
            in_flight.clone(),
        );
        Self {
            registry,
            requests,
            errors,
            resets,
            latency,
            pool_idle,
            pool_vms_created,
            pool_shells,
            queue_depth,
            in_flight,
        }
    }
}

/// Everything handlers and workers share.
struct App {
    functions: Vec<Function>,
    by_name: HashMap<String, usize>,
    queue: Queue,
    deadline: Duration,
    metrics: Metrics,
}

/// A JSON error response.
fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = format!(
        "{{\"error\":{},\"message\":{}}}\n",
        json_string(kind),
        json_string(message)
    );
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

async fn call(State(app): State<Arc<App>>, Path(name): Path<String>, body: Bytes) -> Response {
    let start = Instant::now();
    let Some(&function) = app.by_name.get(&name) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "unknown_function",
            &format!("no function {name:?}"),
        );
    };
    let deadline = start + app.deadline;
    // Counted until the handler ends, also when the client goes away.
    let _in_flight = InFlight::enter(&app.metrics.in_flight);
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = Job {
        function,
        body,
        deadline,
        reply,
    };
    let reply = if app.queue.push(job).is_err() {
        Reply::Failed {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "overloaded",
            message: "the request queue is full".into(),
        }
    } else {
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Reply::Failed {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "shutting_down",
                message: "the worker stopped".into(),
            },
            Err(_) => Reply::Failed {
                status: StatusCode::GATEWAY_TIMEOUT,
                kind: "timeout",
                message: format!("no answer within {:?}", app.deadline),
            },
        }
    };
    let metrics = &app.metrics;
    let route = &app.functions[function].route.name;
    let response = match reply {
        Reply::Output(out) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            out,
        )
            .into_response(),
        Reply::Failed {
            status,
            kind,
            message,
        } => {
            tracing::warn!(function = %route, status = status.as_u16(), kind, %message, "request failed");
            metrics
                .errors
                .get_or_create(&vec![("function", route.clone()), ("kind", kind.into())])
                .inc();
            error_response(status, kind, &message)
        }
    };
    let labels = vec![
        ("function", route.clone()),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics.requests.get_or_create(&labels).inc();
    metrics
        .latency
        .get_or_create(&vec![("function", route.clone())])
        .observe(start.elapsed().as_secs_f64());
    response
}

/// Counts a request in the in-flight gauge while it lives.
struct InFlight<'a>(&'a Gauge<i64, AtomicI64>);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge<i64, AtomicI64>) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let metrics = &app.metrics;
    for function in &app.functions {
        if let Backend::Vm(pool) = &function.backend {
            let stats = pool.stats();
            let labels = vec![("function", function.route.name.clone())];
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            metrics
                .pool_idle
                .get_or_create(&labels)
                .set(gauge(stats.idle as u64));
            metrics
                .pool_vms_created
                .get_or_create(&labels)
                .set(gauge(stats.created));
            metrics
                .pool_shells
                .get_or_create(&labels)
                .set(gauge(stats.shells.available as u64));
        }
    }
    metrics
        .queue_depth
        .set(i64::try_from(app.queue.len()).unwrap_or(i64::MAX));
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &metrics.registry) {
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, "metrics", &e.to_string());
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A worker thread: runs queued jobs until the queue is closed and empty.
fn worker(app: &App) {
    while let Some(job) = app.queue.pop() {
        // The handler gave up (deadline passed, client gone): skip the work.
        if job.reply.is_closed() || Instant::now() >= job.deadline {
            continue;
        }
        let function = &app.functions[job.function];
        let reply = match &function.backend {
            Backend::Native(f) => Reply::Output(f(&job.body)),
            Backend::Vm(pool) => match pool.get() {
                Ok(mut vm) => {
                    let result = vm.invoke(&function.route.function, &job.body);
                    let resets = vm.resets();
                    if resets > 0 {
                        app.metrics
                            .resets
                            .get_or_create(&vec![("function", function.route.name.clone())])
                            .inc_by(resets);
                    }
                    match result {
                        Ok(out) => Reply::Output(out),
                        Err(e) => failure(e.kind(), e.to_string()),
                    }
                }
                Err(e) => failure(e.kind(), format!("no VM: {e}")),
            },
        };
        let _ = job.reply.send(reply);
    }
}

/// The response for a failed call.
fn failure(kind: ErrorKind, message: String) -> Reply {
    let (status, kind) = match kind {
        ErrorKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        ErrorKind::GuestCrash | ErrorKind::Poisoned | ErrorKind::Cancelled => {
            (StatusCode::INTERNAL_SERVER_ERROR, "guest_crash")
        }
        ErrorKind::GuestError => (StatusCode::INTERNAL_SERVER_ERROR, "guest_error"),
        ErrorKind::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "host"),
    };
    Reply::Failed {
        status,
        kind,
        message,
    }
}

/// Boots each guest program once and builds one pool per route.
fn build_functions(settings: &Settings) -> Result<Vec<Function>, String> {
    let mut ready: HashMap<PathBuf, (VmConfig, Snapshot)> = HashMap::new();
    let mut functions = Vec::new();
    for route in &settings.routes {
        let backend = if settings.native {
            let Some(f) = native_function(&route.function) else {
                tracing::warn!(function = %route.name, "no native version: not served");
                continue;
            };
            Backend::Native(f)
        } else {
            if !ready.contains_key(&route.guest) {
                let program = GuestProgram::from_file(&route.guest)
                    .map_err(|e| format!("{}: {e}", route.guest.display()))?;
                let config = VmConfig::new(program)
                    .memory_size(settings.memory_size)
                    .dirty_tracking(true)
                    .timeout(Some(settings.deadline));
                let snapshot = VmInstance::new(&config)
                    .map_err(snapvm::Error::from)
                    .and_then(|mut vm| Ok(vm.snapshot()?))
                    .map_err(|e| format!("booting {}: {e}", route.guest.display()))?;
                ready.insert(route.guest.clone(), (config, snapshot));
            }
            let (config, snapshot) = &ready[&route.guest];
            let policy = route.policy;
            let pool = ReadyPool::new(config, snapshot.clone(), settings.workers, move || {
                policy.build()
            })
            .map_err(|e| format!("pool for {}: {e}", route.name))?;
            Backend::Vm(Box::new(pool))
        };
        functions.push(Function {
            route: route.clone(),
            backend,
        });
    }
    Ok(functions)
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Gateway {
    /// Builds the VM pools, starts the workers and the HTTP server on
    /// `listener`, and returns once it serves (signal handlers installed).
    pub fn start(settings: Settings, listener: std::net::TcpListener) -> Result<Self, String> {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("listener: {e}"))?;
        let functions = build_functions(&settings)?;
        let by_name = functions
            .iter()
            .enumerate()
            .map(|(i, f)| (f.route.name.clone(), i))
            .collect();
        let app = Arc::new(App {
            functions,
            by_name,
            queue: Queue {
                state: Mutex::default(),
                ready: Condvar::new(),
                capacity: settings.queue.max(1),
            },
            deadline: settings.deadline,
            metrics: Metrics::new(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.io_threads.max(1))
            .thread_name("gateway-io")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (started, is_started) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("gateway".into())
            .spawn(move || serve(runtime, app, listener, settings, stopped, started))
            .map_err(|e| e.to_string())?;
        match is_started.recv() {
            Ok(Ok(())) => Ok(Self {
                addr,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(thread
                .join()
                .map_err(|_| "the gateway thread panicked".to_string())
                .and_then(|r| r)
                .err()
                .unwrap_or_else(|| "the gateway stopped".into())),
        }
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops like SIGTERM does: no new connections, requests in flight
    /// finish.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits until the gateway stopped (after [`Self::stop`] or a signal)
    /// and every worker and VM is gone.
    pub fn join(mut self) -> Result<(), String> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err("the gateway thread panicked".into()),
            None => Ok(()),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs until stopped, then drains: the HTTP server first (requests in
/// flight get their answers), then the workers, then the VMs.
fn serve(
    runtime: tokio::runtime::Runtime,
    app: Arc<App>,
    listener: std::net::TcpListener,
    settings: Settings,
    stopped: tokio::sync::oneshot::Receiver<()>,
    started: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let workers: Vec<_> = (0..settings.workers.max(1))
        .map(|i| {
            let app = Arc::clone(&app);
            std::thread::Builder::new()
                .name(format!("gateway-worker-{i}"))
                .spawn(move || worker(&app))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("starting workers: {e}"))?;
    let router = Router::new()
        .route("/fn/{name}", post(call))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(settings.max_body))
        .with_state(Arc::clone(&app));
    let result = runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(|e| format!("listener: {e}"))?;
        let shutdown = shutdown_signal(settings.signals, stopped)?;
        tracing::info!(
            addr = %listener.local_addr().map_err(|e| e.to_string())?,
            workers = settings.workers,
            routes = settings.routes.len(),
            native = settings.native,
            "serving"
        );
        let _ = started.send(Ok(()));
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| format!("serving: {e}"))
    });
    tracing::info!("HTTP server stopped; draining workers");
    // Every handler finished (graceful shutdown waits for them): the queue
    // is empty; close it and let the workers go.
    drop(runtime);
    app.queue.close();
    for worker in workers {
        let _ = worker.join();
    }
    drop(app);
    tracing::info!("stopped");
    result
}

/// Resolves on `stop`, or on SIGTERM/SIGINT if `signals`. The signal
/// handlers are installed before this returns.
fn shutdown_signal(
    signals: bool,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<impl std::future::Future<Output = ()>, String> {
    use std::future::Future as _;
    use tokio::signal::unix::{signal, SignalKind};
    let mut handlers = Vec::new();
    if signals {
        for kind in [SignalKind::terminate(), SignalKind::interrupt()] {
            handlers.push(signal(kind).map_err(|e| format!("signal handler: {e}"))?);
        }
    }
    Ok(std::future::poll_fn(move |cx| {
        use std::task::Poll;
        if std::pin::Pin::new(&mut stop).poll(cx).is_ready()
            || handlers.iter_mut().any(|h| h.poll_recv(cx).is_ready())
        {
            tracing::info!("shutting down: finishing requests in flight");
            return Poll::Ready(());
        }
        Poll::Pending
    }))
}

fn parse_args() -> Result<(Settings, String), String> {
    let mut settings = Settings::default();
    let mut routes = Vec::new();
    let mut listen = "127.0.0.1:8080".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|e| format!("{flag}: {e}"))
                .map(|n| n.max(1))
        };
        match flag.as_str() {
            "--listen" => listen = value()?,
            "--fn" => routes.push(Route::parse(&value()?)?),
            "--workers" => settings.workers = number(value()?)? as usize,
            "--io-threads" => settings.io_threads = number(value()?)? as usize,
            "--queue" => settings.queue = number(value()?)? as usize,
            "--max-body" => settings.max_body = number(value()?)? as usize,
            "--deadline-ms" => settings.deadline = Duration::from_millis(number(value()?)?),
            "--memory-mib" => settings.memory_size = number(value()?)? << 20,
            "--native" => settings.native = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !routes.is_empty() {
        settings.routes = routes;
    }
    Ok((settings, listen))
}

fn main() {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let (settings, listen) = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    if !settings.native {
        if let Err(e) = snapvm::vm::check_kvm() {
            eprintln!("snapvm needs KVM: {e}");
            std::process::exit(2);
        }
    }
    let result = std::net::TcpListener::bind(&listen)
        .map_err(|e| format!("binding {listen}: {e}"))
        .and_then(|listener| Gateway::start(settings, listener))
        .and_then(Gateway::join);
    if let Err(e) = result {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
