//! `-p/--publish` is parsed by the CLI into the model's published port before any request is
//! made: a bad value is refused with the model's words and a usage exit code, with no agent
//! running at all (the socket named here does not exist), so nothing can have changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn shoal(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .env("SHOAL_HOST", "unix:///nonexistent/shoal-publish-flag.sock")
        .args(args)
        .output()
        .expect("running shoal");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_published_ports_are_refused_before_any_request() {
    for (value, why) in [
        ("8100", "want PUBLISHED:TARGET[/tcp|udp]"),
        ("0:80", "invalid port \"0\""),
        ("80:80/sctp", "invalid protocol \"sctp\""),
        ("published=80", "target is required"),
        (
            "published=53,target=53,protocol=udp,proxy-protocol=v1",
            "proxy-protocol is for TCP ports",
        ),
    ] {
        let (code, err) =
            shoal(&["service", "create", "--name", "web", "-p", value, "--", "sleep", "1"]);
        assert_eq!(code, Some(2), "create -p {value}: {err}");
        assert!(err.contains(why), "create -p {value}: {err}");
        let (code, err) = shoal(&["service", "update", "--publish-add", value, "web"]);
        assert_eq!(code, Some(2), "update --publish-add {value}: {err}");
        assert!(err.contains(why), "update --publish-add {value}: {err}");
    }
}

#[test]
fn a_good_port_gets_past_parsing_to_the_missing_agent() {
    let (code, err) = shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "-p",
        "published=8100,target=80,mode=host,proxy-protocol=v2",
        "--",
        "sleep",
        "1",
    ]);
    assert_ne!(code, Some(2), "a valid port was refused: {err}");
    assert!(!err.contains("invalid value"), "{err}");
}
