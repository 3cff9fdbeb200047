mod common;

#[test]
fn smoke() {
    require_kvm!();
    let config = common::config("quickstart").host_function("greeting", |_| Ok(b"Hi".to_vec()));
    let mut vm = snapvm::VmInstance::new(&config).unwrap();
    assert_eq!(vm.invoke("reverse", b"hello").unwrap(), b"olleh");
    assert_eq!(vm.invoke("greet", b"bob").unwrap(), b"Hi, bob!");
    let t = std::time::Instant::now();
    for _ in 0..1000 { vm.invoke("empty", b"").unwrap(); }
    eprintln!("per invoke {:?}", t.elapsed() / 1000);
}
