//! One call surface (`Invoke`) over every VM wrapper, and functions
//! resolved once (`Func`, `TypedFunc`), on real KVM: real outputs, typed
//! calls, call data reaching host functions, cancels, and handles used on
//! VMs of other programs.

mod common;

use std::time::Duration;

use snapvm::policy::{Always, ManagedVm, Never, PollConfig, PollingVm};
use snapvm::{
    CancelToken, ErrorKind, Invoke, InvokeError, ReadyPool, RestorePolicy, Snapshot, VmConfig,
    VmError, VmInstance, VmState,
};

#[cfg(feature = "serde")]
#[derive(serde::Serialize)]
struct Order {
    items: u32,
    price_cents: u64,
    note: String,
}

#[cfg(feature = "serde")]
#[derive(serde::Deserialize, Debug, PartialEq)]
struct Total {
    cents: u64,
    note_len: usize,
}

#[cfg(feature = "serde")]
/// The input of the quickstart guest's typed `sum_point`.
#[derive(serde::Serialize)]
struct Point {
    x: i32,
    y: i32,
}

/// A request's call data: the host function `request_id` counts it up.
#[derive(Debug)]
struct RequestId(u64);

#[cfg(feature = "serde")]
fn order() -> Order {
    Order {
        items: 3,
        price_cents: 250,
        note: "gift".into(),
    }
}

/// The test guest with a host function that answers with the call data it
/// sees (`none` without any), after counting it up.
fn config() -> VmConfig {
    common::config("testguest")
        .dirty_tracking(true)
        .timeout(Some(Duration::from_secs(5)))
        .host_function_with_caller("request_id", |caller, _| {
            let Some(request) = caller.call_data::<RequestId>() else {
                return Ok(b"none".to_vec());
            };
            request.0 += 1;
            Ok(request.0.to_string().into_bytes())
        })
}

fn ready(config: &VmConfig) -> Snapshot {
    VmInstance::new(config).unwrap().snapshot().unwrap()
}

fn managed<P: RestorePolicy>(config: &VmConfig, policy: P) -> ManagedVm<P> {
    let ready = ready(config);
    let vm = VmInstance::restore(config, &ready).unwrap();
    ManagedVm::new(vm, ready, policy).unwrap()
}

fn polling<P: RestorePolicy>(config: &VmConfig, policy: P) -> PollingVm<P> {
    let window = PollConfig::new().window(Duration::from_millis(300));
    PollingVm::new(managed(config, policy), window).unwrap()
}

fn vm_error<E: InvokeError>(e: &E) -> &VmError {
    e.vm_error()
        .unwrap_or_else(|| panic!("expected a VM error, got {e}"))
}

/// Every call the trait offers, on any wrapper. Ends with a call whose
/// token was cancelled before it started, and returns the result of the
/// next call (a wrapper resets its VM first; a bare `VmInstance` stays
/// poisoned).
fn exercise<V: Invoke>(vm: &mut V) -> Result<Vec<u8>, V::Error> {
    // Untyped.
    assert_eq!(vm.invoke("echo", b"hello").unwrap(), b"hello");
    // Typed, by name and through a handle.
    #[cfg(feature = "serde")]
    {
        let expected = Total {
            cents: 750,
            note_len: 4,
        };
        let total: Total = vm.call("total", &order()).unwrap();
        assert_eq!(total, expected);
        let total = vm.typed_func::<Order, Total>("total").unwrap();
        assert_eq!(total.call(vm, &order()).unwrap(), expected);
    }
    let echo = vm.func("echo").unwrap();
    assert_eq!(echo.invoke(vm, b"by handle").unwrap(), b"by handle");
    assert_eq!(vm.invoke_func(&echo, b"again").unwrap(), b"again");
    // Unknown names, at resolution and at the call; the VM stays usable.
    for err in [
        vm.func("nope").unwrap_err(),
        vm.invoke("nope", b"").unwrap_err(),
    ] {
        assert!(
            matches!(vm_error(&err), VmError::UnknownFunction { name } if name == "nope"),
            "{err}"
        );
        assert_eq!(err.kind(), ErrorKind::BadRequest);
    }
    // Call data reaches the host function, which changes it, and the
    // guest's output carries what the host function answered.
    let mut request = RequestId(41);
    let out = vm
        .invoke_with("host_call", b"request_id\n", &mut request)
        .unwrap();
    assert_eq!(out, b"ok:42");
    assert_eq!(request.0, 42);
    // A call without call data has none.
    assert_eq!(vm.invoke("host_call", b"request_id\n").unwrap(), b"ok:none");
    // A token cancelled before the call: nothing runs, the call fails.
    let token = CancelToken::new();
    assert!(token.cancel());
    let err = vm.invoke_cancellable("echo", b"x", &token).unwrap_err();
    assert!(matches!(vm_error(&err), VmError::Cancelled), "{err}");
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    vm.invoke("echo", b"after")
}

#[test]
fn a_vm_instance_serves_every_call_of_the_trait() {
    require_kvm!();
    let config = config();
    let ready = ready(&config);
    let mut vm = VmInstance::restore(&config, &ready).unwrap();
    let after = exercise(&mut vm).unwrap_err();
    // A cancel poisons a bare VM, and nothing resets it.
    assert!(matches!(after, VmError::Poisoned { .. }), "{after}");
    assert_eq!(vm.state(), VmState::Poisoned);
    let echo = ready.func("echo").unwrap();
    assert!(matches!(
        echo.invoke(&mut vm, b"x"),
        Err(VmError::Poisoned { .. })
    ));
    // A fresh VM from the same snapshot works.
    let mut fresh = VmInstance::restore(&config, &ready).unwrap();
    assert_eq!(echo.invoke(&mut fresh, b"fresh").unwrap(), b"fresh");
}

#[test]
fn a_managed_vm_serves_every_call_of_the_trait() {
    require_kvm!();
    let mut vm = managed(&config(), Never);
    assert_eq!(exercise(&mut vm).unwrap(), b"after");
    // Only the cancelled call reset it.
    assert_eq!(vm.resets(), 1);
}

#[test]
fn a_polling_vm_serves_every_call_of_the_trait() {
    require_kvm!();
    let mut vm = polling(&config(), Never);
    assert_eq!(exercise(&mut vm).unwrap(), b"after");
    // The cancelled call reset it (and on a loaded host, a hot guest that
    // took too long to stop for the call with call data may have been
    // stopped by force and reset too).
    assert!(vm.resets() >= 1);
}

#[test]
fn a_pooled_vm_serves_every_call_of_the_trait() {
    require_kvm!();
    let config = config();
    let pool = ReadyPool::new(&config, ready(&config), 1, || Never).unwrap();
    let mut vm = pool.get().unwrap();
    assert_eq!(exercise(&mut vm).unwrap(), b"after");
    assert_eq!(vm.resets(), 1);
    drop(vm);
    // Given back ready, and lent again.
    let mut vm = pool.get().unwrap();
    assert_eq!(Invoke::invoke(&mut vm, "echo", b"next").unwrap(), b"next");
    assert_eq!(pool.stats().discarded, 0);
}

/// The host data of the tests below: which tenant a VM serves, and how
/// many host calls it made for it.
#[derive(Debug, Default)]
struct Tenant {
    name: Option<&'static str>,
    calls: u64,
}

/// The test guest with a host function that answers with the VM's tenant
/// and counts the call in it (typed: no downcast can come back empty).
fn tenant_config() -> VmConfig<Tenant> {
    common::config("testguest")
        .dirty_tracking(true)
        .timeout(Some(Duration::from_secs(5)))
        .data_type::<Tenant>()
        .host_function_with_caller("tenant", |caller, _| {
            let tenant = caller.data();
            tenant.calls += 1;
            Ok(format!("{}/{}", tenant.name.unwrap_or("none"), tenant.calls).into_bytes())
        })
}

/// Host data is typed by the config and reaches host functions on every
/// call path: a bare VM, a managed VM across its resets, a polling VM
/// whose host functions run on the vCPU thread, and a pooled VM, which a
/// pool gives to the next borrower with the default data, never the last
/// borrower's.
#[test]
fn typed_host_data_reaches_host_functions_through_every_wrapper() {
    require_kvm!();
    let config = tenant_config();
    let ready = VmInstance::new(&config).unwrap().snapshot().unwrap();

    // A new VM starts with the default; restores in place keep the data.
    let mut vm = VmInstance::restore(&config, &ready).unwrap();
    assert_eq!(vm.invoke("host_call", b"tenant\n").unwrap(), b"ok:none/1");
    vm.data_mut().name = Some("acme");
    assert_eq!(vm.invoke("host_call", b"tenant\n").unwrap(), b"ok:acme/2");
    vm.restore_in_place(&ready).unwrap();
    assert_eq!(vm.invoke("host_call", b"tenant\n").unwrap(), b"ok:acme/3");
    assert_eq!(vm.data().calls, 3);

    // Resets after every call keep the host's data (it is not the guest's).
    let vm = VmInstance::restore(&config, &ready).unwrap();
    let mut managed = ManagedVm::new(vm, ready.clone(), Always).unwrap();
    managed.data_mut().name = Some("globex");
    for n in 1..=3 {
        let out = managed.invoke("host_call", b"tenant\n").unwrap();
        assert_eq!(out, format!("ok:globex/{n}").into_bytes());
    }
    assert_eq!(managed.resets(), 3);

    // Polled calls run the host function on the vCPU thread, with the data.
    let window = PollConfig::new().window(Duration::from_millis(300));
    let mut hot = PollingVm::new(managed, window).unwrap();
    assert_eq!(
        hot.invoke("host_call", b"tenant\n").unwrap(),
        b"ok:globex/4"
    );
    hot.data_mut().name = Some("initech");
    assert_eq!(
        hot.invoke("host_call", b"tenant\n").unwrap(),
        b"ok:initech/5"
    );
    assert_eq!(hot.data_mut().calls, 5);

    // A pool: each borrower sets its tenant; the next one starts clean.
    let pool = ReadyPool::new(&config, ready, 1, || Never).unwrap();
    let mut lent = pool.get().unwrap();
    lent.data_mut().name = Some("acme");
    assert_eq!(lent.invoke("host_call", b"tenant\n").unwrap(), b"ok:acme/1");
    drop(lent);
    let mut lent = pool.get().unwrap();
    assert_eq!(lent.invoke("host_call", b"tenant\n").unwrap(), b"ok:none/1");
    assert_eq!(pool.stats().created, 1, "the same VM, lent again");
}

/// Untyped and typed calls through `dyn Invoke` (handles resolved on
/// `ready`, the snapshot behind `vm`).
fn through_dyn(vm: &mut dyn Invoke<Error = snapvm::Error>, ready: &Snapshot) {
    assert_eq!(vm.invoke("echo", b"dyn").unwrap(), b"dyn");
    let echo = ready.func("echo").unwrap();
    assert_eq!(echo.invoke(vm, b"dyn handle").unwrap(), b"dyn handle");
    #[cfg(feature = "serde")]
    {
        let total = ready.typed_func::<Order, Total>("total").unwrap();
        assert_eq!(total.call(vm, &order()).unwrap().cents, 750);
    }
    let mut request = RequestId(0);
    let out = vm
        .invoke_with("host_call", b"request_id\n", &mut request)
        .unwrap();
    assert_eq!((out.as_slice(), request.0), (&b"ok:1"[..], 1));
}

#[test]
fn the_wrappers_serve_calls_through_dyn_invoke() {
    require_kvm!();
    let config = config();
    let mut managed = managed(&config, Always);
    let ready = managed.ready().clone();
    through_dyn(&mut managed, &ready);
    let mut hot = polling(&config, Never);
    let ready = hot.ready().clone();
    through_dyn(&mut hot, &ready);
}

#[cfg(feature = "serde")]
#[test]
fn a_typed_func_resolved_once_serves_every_vm_of_its_snapshot() {
    require_kvm!();
    let config = config();
    let mut booted = VmInstance::new(&config).unwrap();
    let ready = booted.snapshot().unwrap();
    let from_snapshot = ready.typed_func::<Order, Total>("total").unwrap();
    let from_vm = booted.typed_func::<Order, Total>("total").unwrap();
    let expected = Total {
        cents: 750,
        note_len: 4,
    };
    for total in [&from_snapshot, &from_vm] {
        assert_eq!(total.call(&mut booted, &order()).unwrap(), expected);
        for _ in 0..2 {
            let mut copy = VmInstance::restore(&config, &ready).unwrap();
            assert_eq!(total.call(&mut copy, &order()).unwrap(), expected);
            copy.restore_in_place(&ready).unwrap();
            assert_eq!(total.call(&mut copy, &order()).unwrap(), expected);
        }
        // A reset after every call.
        let mut managed = managed(&config, Always);
        for _ in 0..3 {
            assert_eq!(total.call(&mut managed, &order()).unwrap(), expected);
        }
        // The guest's own error and a decode failure are typed, as by name.
        let overflow = Order {
            items: 2,
            price_cents: u64::MAX,
            note: String::new(),
        };
        match total.call(&mut booted, &overflow) {
            Err(VmError::GuestError { code: 422, .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
        let wrong = booted.typed_func::<Order, String>("total").unwrap();
        assert!(matches!(
            wrong.call(&mut booted, &order()),
            Err(VmError::Decode { .. })
        ));
        assert_eq!(booted.state(), VmState::Ready);
    }
}

#[test]
fn an_unknown_function_fails_at_resolution() {
    require_kvm!();
    let config = config();
    let mut vm = VmInstance::new(&config).unwrap();
    let ready = vm.snapshot().unwrap();
    let untyped = [vm.func("nope").map(drop), ready.func("nope").map(drop)];
    #[cfg(feature = "serde")]
    let typed = [
        vm.typed_func::<Order, Total>("nope").map(drop),
        ready.typed_func::<Order, Total>("nope").map(drop),
    ];
    #[cfg(not(feature = "serde"))]
    let typed = [];
    for result in untyped.into_iter().chain(typed) {
        match result {
            Err(VmError::UnknownFunction { name }) => assert_eq!(name, "nope"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(vm.state(), VmState::Ready);
}

/// Handles resolved on one program and used on a VM restored from a
/// snapshot of another never run the function at their index there: the
/// quickstart guest exports `empty, echo, reverse, greet, sum_point` (in
/// that order), the test guest `random, token, generation, restores,
/// state_dump, …, echo, …` — by index, quickstart's `echo` would run the
/// test guest's `token`, and its `reverse` the test guest's `generation`.
/// They go by name instead: the right function, or `UnknownFunction`.
#[test]
fn a_handle_never_runs_another_programs_function() {
    require_kvm!();
    let quick_config = common::config("quickstart").dirty_tracking(true);
    let mut quick = VmInstance::new(&quick_config).unwrap();
    let echo = quick.func("echo").unwrap();
    let reverse = quick.func("reverse").unwrap();
    assert_eq!(reverse.invoke(&mut quick, b"abc").unwrap(), b"cba");

    let config = config();
    let test_ready = ready(&config);
    let mut vm = VmInstance::restore(&config, &test_ready).unwrap();
    assert_eq!(echo.invoke(&mut vm, b"abc").unwrap(), b"abc");
    match reverse.invoke(&mut vm, b"abc") {
        Err(VmError::UnknownFunction { name }) => assert_eq!(name, "reverse"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Ready);

    // Through the wrappers, whose calls take other paths.
    let mut managed = managed(&config, Never);
    assert_eq!(echo.invoke(&mut managed, b"managed").unwrap(), b"managed");
    let err = reverse.invoke(&mut managed, b"abc").unwrap_err();
    assert!(
        matches!(vm_error(&err), VmError::UnknownFunction { .. }),
        "{err}"
    );
    let mut hot = polling(&config, Never);
    assert_eq!(echo.invoke(&mut hot, b"hot").unwrap(), b"hot");
    let err = reverse.invoke(&mut hot, b"abc").unwrap_err();
    assert!(
        matches!(vm_error(&err), VmError::UnknownFunction { .. }),
        "{err}"
    );

    // And the other way round: the test guest's `token` (index 1) on the
    // quickstart guest (whose index 1 is `echo`).
    let token = test_ready.func("token").unwrap();
    let quick_ready = quick.snapshot().unwrap();
    let mut quick_copy = VmInstance::restore(&quick_config, &quick_ready).unwrap();
    for quick_vm in [&mut quick, &mut quick_copy] {
        assert!(matches!(
            token.invoke(quick_vm, b"abc"),
            Err(VmError::UnknownFunction { .. })
        ));
        assert_eq!(quick_vm.invoke("echo", b"still").unwrap(), b"still");
    }
}

/// Typed handles of one program on another's VMs: by name, so
/// `UnknownFunction` (the quickstart guest's `sum_point` is index 4, the
/// test guest's `state_dump` there).
#[cfg(feature = "serde")]
#[test]
fn a_typed_func_never_runs_another_programs_function() {
    require_kvm!();
    let quick_config = common::config("quickstart");
    let mut quick = VmInstance::new(&quick_config).unwrap();
    let sum_point = quick.typed_func::<Point, i64>("sum_point").unwrap();
    let point = Point { x: 40, y: 2 };
    assert_eq!(sum_point.call(&mut quick, &point).unwrap(), 42);

    let config = config();
    let test_ready = ready(&config);
    let mut vm = VmInstance::restore(&config, &test_ready).unwrap();
    match sum_point.call(&mut vm, &point) {
        Err(VmError::UnknownFunction { name }) => assert_eq!(name, "sum_point"),
        other => panic!("unexpected {other:?}"),
    }
    let mut managed = managed(&config, Never);
    let err = sum_point.call(&mut managed, &point).unwrap_err();
    assert!(
        matches!(vm_error(&err), VmError::UnknownFunction { .. }),
        "{err}"
    );
    assert_eq!(vm.state(), VmState::Ready);

    let total = test_ready.typed_func::<Order, Total>("total").unwrap();
    match total.call(&mut quick, &order()) {
        Err(VmError::UnknownFunction { name }) => assert_eq!(name, "total"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(sum_point.call(&mut quick, &point).unwrap(), 42);
}
