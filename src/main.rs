//! `shoal`: the agent daemon, its command line, and the namespace lab, in one binary.

fn main() -> std::process::ExitCode {
    // Each task's supervisor is this binary re-executed (see `shoal_runtime::shim`): it takes
    // no flags and sets up no logging, so it does not go through the command line parser.
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == shoal_runtime::shim::ARG) {
        return shoal_runtime::shim::main(args);
    }
    shoal::cli::main()
}
