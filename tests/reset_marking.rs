//! Acceptance: what a process does between its `ResetBegin` and `ResetEnd` on the
//! control socket is logged as a reset; the pid marked is the one the kernel names
//! for the connection, and the mark ends with the connection.

mod support;

use store::Action;
use support::tracking::{actions, start};
use support::{Fixture, LowerSpec, in_private_mount_ns, need_root};
use tracker::control::{Client, Request, Response, RuntimeInfo, Server};

#[test]
fn a_reset_mark_is_the_callers_and_ends_with_its_connection() {
    if !need_root() {
        return;
    }
    in_private_mount_ns(|| {
        let fx = Fixture::new(&LowerSpec::new().file("f", "lower\n", 0o644));
        let t = std::sync::Arc::new(start(&fx));
        let socket = fx.scratch().join("control.sock");
        let here = RuntimeInfo {
            mount_point: fx.mnt().to_path_buf(),
            pid: std::process::id(),
            mount_ns: tracker::sys::own_mount_ns().unwrap_or(0),
        };
        let server = Server::start(t.clone(), &socket, 0, here).expect("server");

        // The client names another pid: the kernel's name for it wins.
        let mut client = Client::connect(&socket).expect("connect");
        assert!(matches!(
            client.call(&Request::ResetBegin(1)),
            Ok(Response::Done)
        ));
        std::fs::write(fx.mnt().join("by-reset"), "x").expect("write");
        let logged = actions(&t, "by-reset");
        assert!(
            !logged.is_empty() && logged.iter().all(|a| *a == Action::Reset),
            "{logged:?}"
        );

        // The connection ends without `ResetEnd`: what this process does next is
        // its own again, once the server has seen the connection end.
        drop(client);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            std::fs::write(fx.mnt().join("after"), "y").expect("write");
            let logged = actions(&t, "after");
            if logged.last() != Some(&Action::Reset) {
                break;
            }
            assert!(
                std::time::Instant::now() < until,
                "the mark outlived its connection: {logged:?}"
            );
            std::fs::remove_file(fx.mnt().join("after")).expect("remove");
        }
        drop(server);
    });
}
