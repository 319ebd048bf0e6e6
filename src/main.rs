//! `shoal`: the agent daemon, its command line, and the namespace lab, in one binary.

fn main() -> std::process::ExitCode {
    shoal::cli::main()
}
