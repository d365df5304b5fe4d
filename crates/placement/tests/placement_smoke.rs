mod support;

use support::*;
use yunbian_api::Placement;
use yunbian_placement::schedule;

#[test]
fn places_books_and_explains() {
    let mut c = cluster(vec![node("a"), node("b"), node("c")], vec![]);
    let p = Placement::default();
    let d = schedule(&mut c, &request("web", &p, 4));
    assert_eq!(created_nodes(&d), ["a", "b", "c", "a"]);
    assert_eq!(d.unplaced, 0);
    assert_eq!(d.create[0].reason, "least loaded (cpu 0%, memory 0%)");
    assert_eq!(c.node("a").map(|n| n.requested.cpu_millis), Some(200));
    eprintln!("{d:#?}");
}
