//! The `DnsRedirectPort` contract suite: one set of cases over a [`World`] (the port, a
//! sandbox namespace, and a way to edit the table behind the port's back), run against
//! [`FakeDnsRedirect`] (module `fake`) and [`LinuxDnsRedirect`] (module `linux`).
//!
//! The Linux run is privileged (gated by `swarmnet_tests_netns::gate::privileged`) and never
//! touches the machine's root network namespace: each case runs on its own thread that first
//! `unshare(CLONE_NEWNET)`s; the sandbox is that thread's namespace, addressed by its
//! `/proc/<pid>/task/<tid>/ns/net` file, and dies with the thread. Foreign edits are `nft`
//! commands forked from that thread (a child inherits its namespace).

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use swarmnet_netd::dns::redirect::{DnsRedirect, DnsRedirectPort, RuleSeen, drift};
use swarmnet_netd::fake::dns_redirect::{FakeDnsRedirect, ForeignEdit};
use swarmnet_netd::linux::nft::dns_redirect::LinuxDnsRedirect;
use swarmnet_netd::port::ErrorKind;

fn want(udp: u16, tcp: u16) -> DnsRedirect {
    DnsRedirect {
        addr: Ipv4Addr::new(127, 0, 0, 11),
        udp_port: udp,
        tcp_port: tcp,
    }
}

/// What a case needs: the port, the sandbox's namespace file, and foreign edits.
trait World {
    fn port(&self) -> &dyn DnsRedirectPort;
    fn ns(&self) -> &Path;
    fn foreign(&self, edit: ForeignEdit);
}

fn read(w: &dyn World) -> Option<Vec<RuleSeen>> {
    w.port().read(w.ns()).expect("read")
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

fn ensure_is_exact_and_idempotent(w: &dyn World) {
    assert_eq!(read(w), None, "no table before the first ensure");
    let a = want(40001, 40002);
    w.port().ensure(w.ns(), &a).unwrap();
    assert_eq!(read(w), Some(a.rules()));
    w.port().ensure(w.ns(), &a).unwrap();
    assert_eq!(read(w), Some(a.rules()), "a second ensure adds nothing");
    // Other ports (a restarted resolver): replaced, not appended.
    let b = want(41001, 41002);
    w.port().ensure(w.ns(), &b).unwrap();
    assert_eq!(read(w), Some(b.rules()));
    assert_eq!(drift(&b, read(w).as_deref()), None);
    assert!(drift(&a, read(w).as_deref()).is_some());
}

fn delete_removes_and_tolerates_absence(w: &dyn World) {
    w.port().delete(w.ns()).unwrap();
    w.port().ensure(w.ns(), &want(40001, 40002)).unwrap();
    w.port().delete(w.ns()).unwrap();
    assert_eq!(read(w), None);
    w.port().delete(w.ns()).unwrap();
}

fn foreign_edits_are_drift_and_ensure_restores(w: &dyn World) {
    let a = want(40001, 40002);
    for edit in [
        ForeignEdit::DeleteTable,
        ForeignEdit::FlushChain,
        ForeignEdit::AppendRule(RuleSeen::Other("counter".into())),
    ] {
        w.port().ensure(w.ns(), &a).unwrap();
        w.foreign(edit.clone());
        let seen = read(w);
        let d = drift(&a, seen.as_deref()).unwrap_or_else(|| panic!("{edit:?}: no drift"));
        match edit {
            ForeignEdit::DeleteTable => {
                assert_eq!(seen, None);
                assert!(d.contains("missing"), "{d}");
            }
            ForeignEdit::FlushChain => {
                assert_eq!(seen, Some(vec![]));
                assert!(d.contains("add udp to 127.0.0.11:53"), "{d}");
            }
            ForeignEdit::AppendRule(_) => {
                let seen = seen.unwrap();
                assert_eq!(seen[..4], a.rules()[..]);
                assert!(matches!(seen[4], RuleSeen::Other(_)), "{seen:?}");
                assert!(d.contains("remove foreign rule"), "{d}");
            }
        }
        w.port().ensure(w.ns(), &a).unwrap();
        assert_eq!(read(w), Some(a.rules()), "{edit:?}: restored exactly");
    }
}

fn generation_moves_on_every_change_only(w: &dyn World) {
    let g0 = w.port().generation(w.ns()).unwrap();
    w.port().ensure(w.ns(), &want(40001, 40002)).unwrap();
    let g1 = w.port().generation(w.ns()).unwrap();
    assert_ne!(g0, g1, "ensure moves the generation");
    let _ = read(w);
    assert_eq!(w.port().generation(w.ns()).unwrap(), g1, "reading does not");
    w.foreign(ForeignEdit::FlushChain);
    assert_ne!(
        w.port().generation(w.ns()).unwrap(),
        g1,
        "a foreign edit does"
    );
}

fn missing_namespace_is_not_found(w: &dyn World) {
    let gone = Path::new("/run/swarmnet-no-such-netns/sb");
    let kind = |r: Result<(), swarmnet_netd::port::PortError>| r.unwrap_err().kind;
    assert_eq!(
        kind(w.port().ensure(gone, &want(1, 2))),
        ErrorKind::NotFound
    );
    assert_eq!(kind(w.port().delete(gone)), ErrorKind::NotFound);
    assert_eq!(
        w.port().read(gone).unwrap_err().kind,
        ErrorKind::NotFound,
        "read"
    );
}

// ---------------------------------------------------------------------------------------------
// Runners
// ---------------------------------------------------------------------------------------------

type Case = fn(&dyn World);

struct Fake {
    port: FakeDnsRedirect,
    ns: PathBuf,
}

impl World for Fake {
    fn port(&self) -> &dyn DnsRedirectPort {
        &self.port
    }
    fn ns(&self) -> &Path {
        &self.ns
    }
    fn foreign(&self, edit: ForeignEdit) {
        self.port.foreign(&self.ns, edit);
    }
}

fn run_fake(case: Case) {
    let port = FakeDnsRedirect::new();
    let ns = PathBuf::from("/run/netns/sb-fake");
    port.add_netns(&ns);
    case(&Fake { port, ns });
}

struct Linux {
    port: LinuxDnsRedirect,
    ns: PathBuf,
}

impl World for Linux {
    fn port(&self) -> &dyn DnsRedirectPort {
        &self.port
    }
    fn ns(&self) -> &Path {
        &self.ns
    }
    fn foreign(&self, edit: ForeignEdit) {
        let args: &[&str] = match &edit {
            ForeignEdit::DeleteTable => &["delete", "table", "ip", "swarmnet-dns"],
            ForeignEdit::FlushChain => &["flush", "chain", "ip", "swarmnet-dns", "output"],
            ForeignEdit::AppendRule(_) => {
                &["add", "rule", "ip", "swarmnet-dns", "output", "counter"]
            }
        };
        // Forked from this thread: the child is in the scratch namespace.
        let out = std::process::Command::new("nft")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn netns_inode() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}

fn run_linux(name: &'static str, case: Case) {
    if !swarmnet_tests_netns::gate::privileged(name) {
        return;
    }
    let result = std::thread::spawn(move || {
        let before = netns_inode();
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        assert_ne!(
            before,
            netns_inode(),
            "must never run in the caller's network namespace"
        );
        let ns = PathBuf::from(format!(
            "/proc/{}/task/{}/ns/net",
            std::process::id(),
            nix::unistd::gettid()
        ));
        case(&Linux {
            port: LinuxDnsRedirect,
            ns,
        });
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod fake {
            $( #[test] fn $case() { super::run_fake(super::$case); } )*
        }
        mod linux {
            $( #[test] fn $case() { super::run_linux(stringify!($case), super::$case); } )*
        }
    };
}

contract!(
    ensure_is_exact_and_idempotent,
    delete_removes_and_tolerates_absence,
    foreign_edits_are_drift_and_ensure_restores,
    generation_moves_on_every_change_only,
    missing_namespace_is_not_found,
);
