//! The benchmark's workload stays meaningful: it asks for the placements
//! it says, places them, and does so identically every time.

use yunbian_placement::synthetic::{Mix, Workload};

#[test]
fn the_bench_workload_places_what_it_asks_for_deterministically() {
    for mix in [Mix::Balanced, Mix::Latency, Mix::Cost, Mix::Reliability, Mix::Mixed] {
        let w = Workload::new(600, 1500, mix);
        let asked: u32 = w.apps.iter().flat_map(|a| &a.targets).map(|t| t.count).sum();
        assert_eq!(asked, 1500, "{mix:?}");
        let a = w.schedule_all(&mut w.cluster());
        let b = w.schedule_all(&mut w.cluster());
        assert_eq!(a, b, "{mix:?}");
        assert_eq!(a.placed + a.unplaced, 1500, "{mix:?}");
        assert_eq!(a.unplaced, 0, "{mix:?}: {a:?}");
    }
    assert_eq!("cost".parse::<Mix>(), Ok(Mix::Cost));
    assert!("fastest".parse::<Mix>().is_err());
}
