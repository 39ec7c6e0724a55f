//! vcore benchmarks: VM create to first exit, pause latency (1, 2, 4 vCPUs), PIO exit round
//! trip, state save + restore. Without a usable /dev/kvm they print one SKIP line.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use vinfra::vcore::guest::{
    self, Console, Dirtier, DirtierConfig, Hello, PIO_LOOP_PORT, PioLoop, WriteCounter,
};
use vinfra::vcore::{Vm, VmBuilder, VmConfig, VmSnapshot};

fn kvm_ok() -> bool {
    vinfra::vcore::testing::kvm_available("benches/vcore")
}

fn dirtier(vcpus: u16) -> Vm {
    let d = DirtierConfig { ws_pages: 256, ..Default::default() };
    let vm = VmBuilder::new(VmConfig { mem_mib: 32, vcpus, ..Default::default() })
        .payload(Dirtier(d))
        .build()
        .unwrap();
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm
}

fn create_to_first_exit(c: &mut Criterion) {
    c.bench_function("vm_create_to_first_exit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let vm = VmBuilder::new(VmConfig { mem_mib: 32, ..Default::default() })
                    .payload(Hello)
                    .build()
                    .unwrap();
                let console = Arc::new(Console::new());
                vm.pio_bus().insert(guest::CONSOLE_PORT.into(), 1, console.clone()).unwrap();
                vm.start().unwrap();
                assert!(console.wait_for(b"H", Duration::from_secs(10)));
                total += t.elapsed();
                vm.shutdown();
            }
            total
        })
    });
}

fn pause_latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("pause");
    for vcpus in [1u16, 2, 4] {
        let vm = dirtier(vcpus);
        g.bench_with_input(BenchmarkId::new("vcpus", vcpus), &vm, |b, vm| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    vm.pause().unwrap();
                    total += t.elapsed();
                    vm.resume().unwrap();
                    std::thread::sleep(Duration::from_micros(200));
                }
                total
            })
        });
    }
    g.finish();
}

fn pio_round_trip(c: &mut Criterion) {
    let vm = VmBuilder::new(VmConfig { mem_mib: 16, ..Default::default() }).payload(PioLoop).build().unwrap();
    let counter = Arc::new(WriteCounter::new());
    vm.pio_bus().insert(PIO_LOOP_PORT.into(), 4, counter.clone()).unwrap();
    vm.start().unwrap();
    c.bench_function("pio_exit_round_trip", |b| {
        b.iter_custom(|iters| {
            let start = counter.count();
            let t = Instant::now();
            while counter.count() - start < iters {
                std::hint::spin_loop();
            }
            t.elapsed()
        })
    });
}

fn save_restore(c: &mut Criterion) {
    let cfg = VmConfig { mem_mib: 32, ..Default::default() };
    let src = dirtier(1);
    src.pause().unwrap();
    c.bench_function("state_save_encode_decode_restore", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dst = VmBuilder::new(cfg.clone()).build().unwrap();
                let t = Instant::now();
                let bytes = src.save_state().unwrap().to_bytes();
                dst.restore_state(&VmSnapshot::from_bytes(&bytes).unwrap()).unwrap();
                total += t.elapsed();
            }
            total
        })
    });
}

fn benches(c: &mut Criterion) {
    if !kvm_ok() {
        return;
    }
    create_to_first_exit(c);
    pause_latency(c);
    pio_round_trip(c);
    save_restore(c);
}

criterion_group! {
    name = vcore;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    targets = benches
}
criterion_main!(vcore);
