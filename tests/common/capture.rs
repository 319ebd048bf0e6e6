//! Captures of a host interface with tcpdump, to read what crossed an underlay.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::lossy;

/// A running capture, stopped with SIGTERM (so it writes out what it holds) when dropped,
/// however the test ends.
pub struct Capture(Child);

impl Drop for Capture {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// Starts tcpdump on `iface` for UDP into `file` and returns once it is capturing.
pub fn capture(iface: &str, file: &Path) -> Capture {
    let mut child = Command::new("tcpdump")
        // `-Z root`: tcpdump would otherwise drop to its own user, who cannot write in the
        // test's private temporary directory.
        // `--immediate-mode` with `-U`: each packet reaches the file as it is seen, so the
        // file can be read while tcpdump still runs.
        .args(["-n", "-U", "--immediate-mode", "-Z", "root", "-i", iface, "-w"])
        .arg(file)
        .arg("udp")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    let stderr = child.stderr.take().expect("stderr");
    let capture = Capture(child);
    let mut lines = std::io::BufReader::new(stderr).lines();
    let ready = lines.by_ref().map_while(Result::ok).any(|l| l.contains("listening on"));
    assert!(ready, "tcpdump on {iface} did not start");
    // Keep draining, so its last words never block it.
    std::thread::spawn(move || lines.for_each(drop));
    capture
}

/// The packets in a capture file that match a tcpdump filter, printed with their payload.
pub fn packets(file: &Path, filter: &str) -> String {
    let out = Command::new("tcpdump").args(["-n", "-A", "-r"]).arg(file).arg(filter).output();
    lossy(&out.expect("tcpdump -r").stdout)
}

/// How many packets in a capture file match a tcpdump filter.
pub fn count(file: &Path, filter: &str) -> usize {
    let out = Command::new("tcpdump").args(["-n", "-r"]).arg(file).arg(filter).output();
    lossy(&out.expect("tcpdump -r").stdout).lines().count()
}
