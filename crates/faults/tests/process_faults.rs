//! Killing processes, trees and sessions, with real child processes.

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use yunbian_faults::process::{kill_session, kill_with_descendants, processes, wait_dead, ProcInfo};
use yunbian_faults::{is_alive, kill_matching};

const GIVE_UP: Duration = Duration::from_secs(30);
const MARK: &str = "YUNBIAN_FAULTS_TEST_MARK";

/// A value no other test run uses.
fn unique() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").subsec_nanos();
    format!("{}{nanos}", std::process::id())
}

fn pid(child: &Child) -> i32 {
    i32::try_from(child.id()).expect("pid fits in i32")
}

/// Polls `/proc` until `condition` holds for the process list.
fn wait_for(what: &str, condition: impl Fn(&[ProcInfo]) -> bool) -> Vec<ProcInfo> {
    let deadline = Instant::now() + GIVE_UP;
    loop {
        let list = processes().expect("list processes");
        if condition(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn live_marked(list: &[ProcInfo], mark: &str) -> Vec<i32> {
    list.iter().filter(|p| !p.is_dead() && p.env(MARK) == Some(mark)).map(|p| p.pid).collect()
}

#[test]
fn kill_matching_by_cmdline() {
    // A distinct duration makes the command line unique to this test.
    let duration = format!("30.{}", unique());
    let mut children: Vec<Child> =
        (0..3).map(|_| Command::new("sleep").arg(&duration).spawn().expect("spawn sleep")).collect();
    let pids: Vec<i32> = children.iter().map(pid).collect();
    let matches = |p: &ProcInfo| p.cmdline == ["sleep", duration.as_str()];
    wait_for("sleeps exec'd", |list| list.iter().filter(|p| matches(p)).count() == 3);
    assert!(pids.iter().all(|&p| is_alive(p)));

    let mut killed = kill_matching(matches).expect("kill");
    killed.sort_unstable();
    let mut expected = pids.clone();
    expected.sort_unstable();
    assert_eq!(killed, expected);

    // Zombies (killed, not yet reaped) count as dead.
    assert!(wait_dead(&pids, GIVE_UP));
    for child in &mut children {
        let status = child.wait().expect("reap");
        assert_eq!(status.signal(), Some(9));
    }
}

#[test]
fn kill_with_descendants_follows_parents_and_the_predicate() {
    let mark = unique();
    // One sleep stays a child of the shell; the other is orphaned by a
    // subshell that exits, so only the predicate can find it.
    let mut shell =
        Command::new("sh").args(["-c", "(sleep 30 &); sleep 30 & wait"]).env(MARK, &mark).spawn().expect("spawn sh");
    let shell_pid = pid(&shell);
    let is_sleep = |p: &ProcInfo| p.cmdline == ["sleep", "30"];
    // Orphaned: its parent is no longer one of the marked processes.
    let find_orphan = |list: &[ProcInfo]| {
        let marked = live_marked(list, &mark);
        list.iter().find(|p| marked.contains(&p.pid) && is_sleep(p) && !marked.contains(&p.ppid)).map(|p| p.pid)
    };
    let list = wait_for("shell, its sleep and an orphaned sleep", |list| {
        let marked = live_marked(list, &mark);
        let own_sleep = list.iter().any(|p| marked.contains(&p.pid) && is_sleep(p) && p.ppid == shell_pid);
        marked.len() == 3 && own_sleep && find_orphan(list).is_some()
    });
    let orphan = find_orphan(&list).expect("orphaned sleep");

    let tree_only = kill_with_descendants(shell_pid, |_| false).expect("kill tree");
    assert_eq!(tree_only.len(), 2, "shell and its own sleep: {tree_only:?}");
    // SIGKILL is asynchronous: wait until they are gone before looking again.
    assert!(wait_dead(&tree_only, GIVE_UP), "the tree died");
    assert!(is_alive(orphan), "the orphan has no parent link to follow");

    let rest = kill_with_descendants(shell_pid, |p| p.env(MARK) == Some(mark.as_str())).expect("kill marked");
    assert_eq!(rest, vec![orphan]);
    assert!(wait_dead(&[orphan, shell_pid], GIVE_UP));
    shell.wait().expect("reap");
}

#[test]
fn kill_session_kills_every_member() {
    let mark = unique();
    let mut leader = Command::new("setsid")
        .args(["sh", "-c", "sleep 30 & sleep 30 & wait"])
        .env(MARK, &mark)
        .spawn()
        .expect("spawn setsid");
    let sid = pid(&leader);
    let list = wait_for("session of three", |list| {
        list.iter().filter(|p| p.sid == sid && p.env(MARK) == Some(mark.as_str()) && !p.is_dead()).count() == 3
    });
    let members = live_marked(&list, &mark);

    let killed = kill_session(sid).expect("kill session");
    assert_eq!(killed.len(), 3, "{killed:?}");
    assert!(wait_dead(&members, GIVE_UP));
    assert_eq!(leader.wait().expect("reap").signal(), Some(9));
}
